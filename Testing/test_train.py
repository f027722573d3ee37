"""Training: checkpoints and --resume reproduce an uninterrupted run; a short real run yields a loadable bundle."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from latentharmonize.errors import InputError, OutputError
from latentharmonize.training import TrainConfig, train
from latentharmonize.training.encoder_fit import fit_encoder
from latentharmonize.training.posthoc import TECHNICAL_WEIGHTS
from latentharmonize.training.samples import sample_paired_patches

from test_patches import patient_scans

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def samples():
    return sample_paired_patches(patient_scans("a") + patient_scans("b"), per_patient=48, seed=0)


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_resume_reproduces_an_uninterrupted_run(samples, tmp_path, kind):
    config = TrainConfig(encoder=kind, latent_dim=6, width=8, batch_size=32, epochs=2)
    fp = {"run": "x"}
    straight, hist, done = fit_encoder(samples, config, CPU, tmp_path / "a", fp, resume=False)
    assert done == 2 and len(hist) == 2
    fit_encoder(samples, replace(config, epochs=1), CPU, tmp_path / "b", fp, resume=False)
    resumed, hist_b, done_b = fit_encoder(samples, config, CPU, tmp_path / "b", fp, resume=True)
    assert done_b == 2 and hist_b == hist
    for key, value in weights(straight).items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert (tmp_path / "b" / "state.safetensors").exists() and (tmp_path / "b" / "state.json").exists()


def test_resume_refuses_other_settings_and_damaged_checkpoints(samples, tmp_path):
    config = TrainConfig(latent_dim=6, width=8, batch_size=32, epochs=1)
    fit_encoder(samples, config, CPU, tmp_path, {"seed": 0}, resume=False)
    with pytest.raises(InputError, match=r"different settings \(seed\)"):
        fit_encoder(samples, replace(config, epochs=2), CPU, tmp_path, {"seed": 1}, resume=True)
    blob = (tmp_path / "state.safetensors").read_bytes()
    (tmp_path / "state.safetensors").write_bytes(blob[:-10])
    with pytest.raises(InputError, match="damaged"):
        fit_encoder(samples, replace(config, epochs=2), CPU, tmp_path, {"seed": 0}, resume=True)


def test_time_budget_stops_training(samples, tmp_path):
    config = TrainConfig(latent_dim=6, width=8, batch_size=8, max_minutes=1e-4)
    _, hist, done = fit_encoder(samples, config, CPU, tmp_path, {}, resume=False)
    assert done == 0 and len(hist) == 1  # stopped inside the first epoch, checkpoint still written
    assert (tmp_path / "state.json").exists()


def test_bad_options_are_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="--encoder"):
        TrainConfig(encoder="gan")
    with pytest.raises(InputError, match="either --epochs or --max-minutes"):
        TrainConfig(epochs=2, max_minutes=1.0)
    with pytest.raises(InputError, match="--n-technical must be 'auto' or an integer in 0..23"):
        TrainConfig(n_technical=24)
    with pytest.raises(InputError, match="context_radius"):
        TrainConfig(context_radius=-1)
    with pytest.raises(InputError, match="lowpass_mm"):
        TrainConfig(lowpass_mm=-1.0)
    with pytest.raises(InputError, match="lowpass_noise_hu"):
        TrainConfig(lowpass_noise_hu=0.0)
    for bad in ({"second_stage": 4}, {"second_stage": 1, "densitometry": 1.0}):  # it reads the harmonized statistics
        with pytest.raises(InputError, match="--second-stage must be"):
            TrainConfig(**bad)
    for bad in ({"depth_contrast_hu": 50.0, "densitometry": 1.0},  # it tests the second stage's names
                {"depth_contrast_hu": -1.0, "densitometry": 1.0, "second_stage": 4}):
        with pytest.raises(InputError, match="--depth-contrast must be"):
            TrainConfig(**bad)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{}")
    with pytest.raises(OutputError, match="--overwrite"):
        train(tmp_path / "none.csv", tmp_path / "m", TrainConfig())


def test_command_line_defaults_are_the_config_defaults_and_the_fingerprint_covers_the_spec():
    import argparse

    from latentharmonize.training import add_arguments
    from latentharmonize.training.command import config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["cohort.csv", "--out", "m"])) == TrainConfig()
    assert TrainConfig().epoch_budget == 20 and TrainConfig(max_minutes=5.0).epoch_budget is None
    plain, calibrated = TrainConfig().fingerprint(), TrainConfig(calibrate=True).fingerprint()
    assert plain["patch_spec"]["calibration"] is None and calibrated["patch_spec"]["calibration"] == "air_fat"
    blurred = config_from_args(parser.parse_args(["cohort.csv", "--out", "m", "--lowpass", "1"]))
    assert blurred.patch_spec().lowpass_mm == 1.0 and blurred.fingerprint()["patch_spec"]["lowpass_mm"] == 1.0
    matched = config_from_args(parser.parse_args(["cohort.csv", "--out", "m", "--lowpass", "1", "--lowpass-noise", "1.5"]))
    assert matched.patch_spec().lowpass_noise_hu == 1.5 and matched.fingerprint() != blurred.fingerprint()
    assert TrainConfig().patch_spec().lowpass_noise_hu is None
    # the budget and where the run goes are not settings of the weights: --resume --epochs 30 extends a run
    assert TrainConfig(epochs=30, device="cpu", workers=2).fingerprint() == plain


def _two_patient_cohort(tmp_path_factory, name: str, seed: int) -> Path:
    """Two phantom patients (phenotypes by the seed) under a soft thin and a sharp thick acquisition."""
    from latentharmonize.phantom import generate_cohort

    folder = tmp_path_factory.mktemp(name)
    generate_cohort(folder, n_patients=2, seed=seed, acquisitions=["a_soft_thin", "c_sharp_thick"])
    return folder / "cohort.csv"


@pytest.fixture(scope="module")
def tiny_phantom_cohort(tmp_path_factory) -> Path:
    return _two_patient_cohort(tmp_path_factory, "cohort", 5)


def test_short_real_training_run_produces_a_loadable_bundle(tiny_phantom_cohort, tmp_path, capsys):
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cli import main

    out = tmp_path / "model"
    code = main(["train", str(tiny_phantom_cohort), "--out", str(out), "--epochs", "1", "--clusters", "3",
                 "--patches-per-patient", "60", "--latent-dim", "8", "--device", "cpu", "--seed", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    bundle = load_bundle(out)
    k = bundle.clusters.n_clusters_  # the 3 components merged by the names of their HU profiles
    assert bundle.clusters.n_components_ == 3 and 1 <= k <= 3 and len(bundle.names) == k
    assert "Acquisition probe accuracy" in printed and "ARI" in printed
    # the cohort has cross-acquisition pairs, so the components are widened by their acquisition scatter
    widening = bundle.manifest["training"]["acquisition_widening"]
    assert widening > 0
    assert (f"3 mixture components, widened by the training pairs' acquisition scatter ({100 * widening:.1f} % of a "
            f"component's spread), named from their patches' HU and merged by name into {k} tissue cluster") in printed
    assert bundle.manifest["encoder"]["kind"] == "ae" and bundle.manifest["encoder"]["latent_dim"] == 8
    assert bundle.rotation.rotation_.shape == (8, 8)
    training = bundle.manifest["training"]
    assert training["n_patients"] == 2 and training["n_pairs"] == 120 and training["epochs"] == 1
    assert 0.0 <= bundle.manifest["probe"]["biological"] <= 1.0 and 0.0 <= bundle.manifest["probe"]["clusters"] <= 1.0
    # the technical weight is the candidate whose clusters agree best across the training pairs
    scores = training["technical_weight_pair_ari"]
    assert set(scores) == {f"{w:g}" for w in TECHNICAL_WEIGHTS}
    assert scores[f"{training['technical_weight']:g}"] == max(scores.values())
    assert bundle.rotation.technical_weight == training["technical_weight"]
    assert bundle.clusters.means_.shape[1] == bundle.rotation.n_cluster_features_
    assert (out / ".checkpoints" / "state.json").exists()
    # the bundle's encoder works on a patch and matches the stored spec
    patch = torch.rand(2, 3, bundle.spec.patch_size, bundle.spec.patch_size)
    assert bundle.encoder("cpu").encode(patch).shape == (2, 8)
    # refusing to overwrite happens before any training
    assert main(["train", str(tiny_phantom_cohort), "--out", str(out), "--epochs", "1"]) == OutputError.exit_code


def test_low_attenuation_channel_option_reaches_the_bundle(tiny_phantom_cohort, tmp_path):
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cli import main

    out = tmp_path / "model"
    code = main(["train", str(tiny_phantom_cohort), "--out", str(out), "--epochs", "1", "--clusters", "2",
                 "--patches-per-patient", "40", "--latent-dim", "6", "--device", "cpu", "--low-attenuation-channel"])
    assert code == 0
    bundle = load_bundle(out)
    assert bundle.manifest["encoder"]["config"]["low_attenuation_hu"] == -950.0
    model = bundle.encoder("cpu")
    assert model.encoder.body[0].in_channels == 6
    assert bundle.decoder("cpu")(torch.zeros(1, 6)).shape == (1, 3, 16, 16)
    with pytest.raises(InputError, match="--low-attenuation-channel works with --encoder ae only"):
        TrainConfig(encoder="vae", low_attenuation_channel=True)


def test_calibrate_option_reaches_the_bundle_and_every_analysis(tiny_phantom_cohort, tmp_path):
    import json

    import pandas as pd

    from latentharmonize import analyze
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cli import main
    from latentharmonize.phantom import VENDORS

    out = tmp_path / "model"
    code = main(["train", str(tiny_phantom_cohort), "--out", str(out), "--epochs", "1", "--clusters", "2",
                 "--patches-per-patient", "40", "--latent-dim", "6", "--device", "cpu", "--calibrate"])
    assert code == 0
    assert load_bundle(out).spec.calibration == "air_fat"
    row = pd.read_csv(tiny_phantom_cohort).query("vendor == 'C'").iloc[0]
    analyze(tiny_phantom_cohort.parent / row["image"], tmp_path / "analysis", model=out, device="cpu",
            write_report=False)
    record = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["hu_calibration"]
    scale, offset = VENDORS["C"]
    for hu in (-1000.0, -905.0):  # the measured map matches vendor C's over the lung range
        assert record["scale"] * hu + record["offset"] == pytest.approx(scale * hu + offset, abs=3.0)


def test_densitometry_option_appends_scaled_statistics_and_reaches_every_analysis(tiny_phantom_cohort, tmp_path):
    import json

    from latentharmonize import analyze
    from latentharmonize.densitometry import HU_STATISTIC_NAMES
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cli import main
    from latentharmonize.cohort import read_cohort
    from latentharmonize.patches import encode_dense
    from latentharmonize.scans import load_scan

    out = tmp_path / "model"
    code = main(["train", str(tiny_phantom_cohort), "--out", str(out), "--epochs", "1", "--clusters", "2",
                 "--patches-per-patient", "40", "--latent-dim", "6", "--device", "cpu", "--densitometry", "2",
                 "--densitometry-smooth", "2", "--densitometry-smooth-total", "--densitometry-read-z", "1.5"])
    assert code == 0
    bundle = load_bundle(out)
    entry = bundle.spec.densitometry
    assert entry.weight == 2.0 and len(entry.center) == len(entry.scale) == len(HU_STATISTIC_NAMES)
    assert entry.smooth_mm == 2.0 and entry.smooth_total and bundle.manifest["training"]["densitometry_smooth_total"]
    assert entry.z_total_mm == 1.5 and bundle.manifest["training"]["densitometry_read_z_mm"] == 1.5
    n = 6 + len(HU_STATISTIC_NAMES)
    assert bundle.rotation.rotation_.shape == (n, n) and bundle.manifest["training"]["densitometry"] == 2.0
    # trained on the scans as acquired: there the appended columns are centred, with twice the latent's mean SD
    row = read_cohort(tiny_phantom_cohort).iloc[0]
    scan = load_scan(row, bundle.spec)
    as_acquired = replace(bundle.spec, densitometry=replace(entry, z_total_mm=None))
    dense = encode_dense(bundle.encoder("cpu"), scan.hu, scan.lung, scan.grid, as_acquired).latents
    appended = dense[:, 6:]
    assert np.all(np.abs(appended.mean(axis=0)) < 1.5 * appended.std(axis=0).max())
    ratio = appended.std(axis=0).mean() / dense[:, :6].std(axis=0).mean()
    assert 1.0 < ratio < 3.0
    # analysis reads this scan's thinner slices blurred along z: the statistics change, the encoder's latent does not
    read = encode_dense(bundle.encoder("cpu"), scan.hu, scan.lung, scan.grid, bundle.spec).latents
    assert scan.grid.scan_z_mm / 2 < entry.z_total_mm
    np.testing.assert_array_equal(read[:, :6], dense[:, :6])
    assert np.abs(read[:, 6:] - appended).max() > 0.05 * appended.std()
    analyze(row["image"], tmp_path / "analysis", model=out, device="cpu", write_report=False)
    # analyze encodes the parenchyma: the lung's patches less those centred on a vessel or airway
    parenchyma = encode_dense(bundle.encoder("cpu"), scan.hu, scan.parenchyma, scan.grid, bundle.spec).latents
    assert json.loads((tmp_path / "analysis" / "analysis.json").read_text())["n_patches"] == len(parenchyma)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(InputError, match="--densitometry must be a positive weight"):
            TrainConfig(densitometry=bad)
    for smooth, weight in ((-1.0, 1.0), (float("nan"), 1.0), (2.0, None)):
        with pytest.raises(InputError, match="--densitometry-smooth"):
            TrainConfig(densitometry=weight, densitometry_smooth_mm=smooth)
    for smooth, total in ((0.0, True), (2.5, "yes")):
        with pytest.raises(InputError, match="--densitometry-smooth-total"):
            TrainConfig(densitometry=1.0, densitometry_smooth_mm=smooth, densitometry_smooth_total=total)
    for z, weight in ((-1.0, 1.0), (float("nan"), 1.0), (1.5, None)):
        with pytest.raises(InputError, match="--densitometry-read-z"):
            TrainConfig(densitometry=weight, densitometry_read_z_mm=z)


def test_densitometry_clusters_read_the_harmonized_statistics_in_training_and_every_analysis(tiny_phantom_cohort,
                                                                                             tmp_path, capsys):
    import SimpleITK as sitk

    from latentharmonize import analyze_image
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cli import main
    from latentharmonize.cohort import read_cohort
    from latentharmonize.densitometry import HU_STATISTIC_NAMES

    out = tmp_path / "model"
    code = main(["train", str(tiny_phantom_cohort), "--out", str(out), "--epochs", "1", "--clusters", "3",
                 "--patches-per-patient", "40", "--latent-dim", "6", "--device", "cpu", "--densitometry",
                 "--technical-weight", "0.2", "--n-technical", "2"])
    assert code == 0
    assert "the clusters read it with the technical coordinates removed" in capsys.readouterr().out
    bundle = load_bundle(out)
    n = len(HU_STATISTIC_NAMES)
    rotation, trained = bundle.rotation, bundle.manifest["training"]
    assert rotation.harmonized_columns == n and rotation.technical_weight == 0.2 and rotation.n_technical_ == 2
    assert trained["technical_weight_fixed"] and trained["technical_weight_pair_ari"] == {}
    assert bundle.clusters.means_.shape[1] == 2 + n
    # analyze labels each patch from its statistics with the technical coordinates removed and those coordinates,
    # re-centred on the scan's median, beside them: computed here anew
    image = sitk.ReadImage(str(read_cohort(tiny_phantom_cohort).iloc[0]["image"]))
    result = analyze_image(image, bundle, device="cpu")
    rotated = rotation.transform(result.patches.latents)
    technical = rotated[:, :2] - np.median(rotated[:, :2], axis=0)
    rotated[:, :2] = 0.0
    features = np.hstack([0.2 * technical, rotation.inverse_transform(rotated)[:, -n:]])
    np.testing.assert_array_equal(result.patch_labels, bundle.clusters.predict(features))
    for bad in (-0.1, float("nan"), 101.0):
        with pytest.raises(InputError, match="--technical-weight must be"):
            TrainConfig(technical_weight=bad)


@pytest.fixture(scope="module")
def fibrosis_cohort(tmp_path_factory) -> Path:
    """Two patients with raised tissue (fibrosis, inflammatory)."""
    return _two_patient_cohort(tmp_path_factory, "fibrosis", 2)


def test_second_stage_option_reaches_the_bundle_and_every_analysis(fibrosis_cohort, tmp_path, capsys):
    """``--second-stage`` trains two-stage clusters; analyze computes each patch's core statistics and labels it by
    both stages. The same second stage added to a one-stage bundle keeps its encoder, rotation and first stage.
    (A one-epoch encoder's latent barely varies; a large densitometry weight gives its statistics room enough
    for the mixture to separate raised lung.)"""
    import SimpleITK as sitk

    from latentharmonize import analyze_image
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cli import main
    from latentharmonize.cohort import read_cohort
    from latentharmonize.training.second_stage import add_second_stage
    from latentharmonize.training.summary import recipe_options
    from latentharmonize.two_stage import reads_core, with_core

    # the shipped recipe reads analysed scans' statistics at 5 mm slices, but fits on the training scans as acquired
    common = ["--epochs", "1", "--clusters", "3", "--patches-per-patient", "150", "--latent-dim", "6", "--device",
              "cpu", "--densitometry", "100", "--technical-weight", "0.1", "--seed", "3",
              "--densitometry-read-z", "2.5"]
    assert main(["train", str(fibrosis_cohort), "--out", str(tmp_path / "two"), *common, "--second-stage", "2",
                 "--depth-contrast", "40"]) == 0
    assert "second stage that reads each patch's core" in capsys.readouterr().out
    two = load_bundle(tmp_path / "two")
    assert reads_core(two.clusters) and two.clusters.second_ is not None and two.manifest["training"]["second_stage"] == 2
    assert list(two.names.values()) == two.clusters.names_ and two.clusters.n_clusters_ == len(two.names)
    assert two.clusters.min_above_depth_hu == 40.0
    image = sitk.ReadImage(str(read_cohort(fibrosis_cohort).iloc[0]["image"]))
    result = analyze_image(image, two, device="cpu")
    core = result.patches.core
    assert core.shape == (len(result.patches.latents), 9)  # the eight statistics and above_depth
    features = two.rotation.cluster_features(result.patches.latents)
    np.testing.assert_array_equal(result.patch_labels, two.clusters.predict(with_core(features, core)))

    recipe = recipe_options(two)  # what a bundle of its kind is trained with, the depth test included
    assert {k: recipe[k] for k in ("densitometry", "technical_weight", "clusters", "second_stage",
                                   "depth_contrast_hu")} == {"densitometry": 100.0, "technical_weight": 0.1,
                                                             "clusters": 3, "second_stage": 2,
                                                             "depth_contrast_hu": 40.0}

    assert main(["train", str(fibrosis_cohort), "--out", str(tmp_path / "one"), *common]) == 0
    one = load_bundle(tmp_path / "one")
    added = add_second_stage(one, fibrosis_cohort, 2, seed=3, per_patient=150, depth_contrast_hu=40.0)
    assert added.sha256 != one.sha256 and added.manifest["training"]["second_stage_of"] == one.sha256
    np.testing.assert_array_equal(added.clusters.first_.predict(features), one.clusters.predict(features))
    # the same encoder, rotation, first stage, samples and seed: the second stage train fits
    np.testing.assert_array_equal(added.clusters.predict(with_core(features, core)),
                                  two.clusters.predict(with_core(features, core)))
    with pytest.raises(InputError, match="already have a second stage"):
        add_second_stage(two, fibrosis_cohort, 2, seed=3)
    # refitted on a two-stage bundle: its first stage kept, and the same rows and seed give train's second stage
    refitted = add_second_stage(two, fibrosis_cohort, 2, seed=3, per_patient=150, depth_contrast_hu=40.0, refit=True)
    assert refitted.manifest["training"]["second_stage_of"] == two.sha256 and refitted.names == two.names
    np.testing.assert_array_equal(refitted.clusters.first_.means_, two.clusters.first_.means_)
    np.testing.assert_array_equal(refitted.clusters.predict(with_core(features, core)),
                                  two.clusters.predict(with_core(features, core)))
    # the same labels; the mixture's probabilities agree to 1e-5, not bit for bit, as for the added stage above
    np.testing.assert_allclose(refitted.clusters.predict_proba(with_core(features, core)),
                               two.clusters.predict_proba(with_core(features, core)), atol=1e-5)


def test_the_default_bundle_recipe_is_a_valid_training_config_with_its_depth_test():
    """``scripts/evaluate_phantom.py --drawn-settings`` trains a bundle of the default's kind from this recipe; the
    manifest's summary does not record the depth test, so it comes from the clusters."""
    from latentharmonize.bundle import default_bundle_path, load_bundle
    from latentharmonize.training.summary import recipe_options

    default = load_bundle(default_bundle_path())
    config = TrainConfig(**recipe_options(default))
    assert config.depth_contrast_hu == default.clusters.min_above_depth_hu == 50.0
    assert config.second_stage == default.clusters.n_second
    assert config.patch_spec().lowpass_noise_hu == default.spec.lowpass_noise_hu
    assert config.densitometry_read_z_mm == default.spec.densitometry.z_total_mm


def test_workers_option_samples_patches_on_the_cluster_path(tiny_phantom_cohort, tmp_path, monkeypatch):
    """--workers routes patch sampling through training.distributed.sample_cohort_patches (proven equal to the serial path in
    test_batch); the bundle then matches a serial run's."""
    from latentharmonize.training import samples as samples_module
    from latentharmonize.training import trainer as train_module
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cli import main

    calls = []

    def on_cluster(cohort_csv, config, spec, scheduler=None, workers=None, progress=None):
        calls.append((scheduler, workers))
        return samples_module.load_cohort_samples(cohort_csv, config, spec, progress)

    monkeypatch.setattr(train_module, "sample_cohort_patches", on_cluster)
    args = ["--epochs", "1", "--clusters", "3", "--patches-per-patient", "40", "--latent-dim", "8", "--device", "cpu",
            "--seed", "2"]
    assert main(["train", str(tiny_phantom_cohort), "--out", str(tmp_path / "dist"), "--workers", "2", *args]) == 0
    assert main(["train", str(tiny_phantom_cohort), "--out", str(tmp_path / "serial"), *args]) == 0
    assert calls == [(None, 2)]
    dist, serial = load_bundle(tmp_path / "dist"), load_bundle(tmp_path / "serial")
    assert dist.manifest["files"] == serial.manifest["files"]


def test_resume_refuses_a_checkpoint_of_other_inputs_and_resumes_a_matching_one(tiny_phantom_cohort, tmp_path, capsys):
    """The fingerprint covers the patch spec: weights trained on uncalibrated HU are not resumed by --calibrate."""
    import json

    from latentharmonize.cli import main

    out = tmp_path / "model"
    args = ["train", str(tiny_phantom_cohort), "--out", str(out), "--epochs", "1", "--clusters", "2",
            "--patches-per-patient", "40", "--latent-dim", "6", "--device", "cpu"]
    assert main(args) == 0
    state = (out / ".checkpoints" / "state.json").read_bytes()
    first = json.loads((out / "manifest.json").read_text())["files"]
    capsys.readouterr()
    assert main([*args, "--resume", "--overwrite", "--calibrate"]) == InputError.exit_code
    assert "different settings (calibrate, patch_spec)" in capsys.readouterr().err
    assert (out / ".checkpoints" / "state.json").read_bytes() == state  # the checkpoint is left as it was
    assert main([*args, "--resume", "--overwrite"]) == 0
    assert "Resuming from the checkpoint after epoch 1." in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["files"] == first


def test_lowpass_noise_option_blurs_the_sharp_scan_more_in_every_analysis(tiny_phantom_cohort, tmp_path):
    import json

    from latentharmonize import analyze
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cli import main
    from latentharmonize.cohort import read_cohort
    from latentharmonize.grid import MAX_LOWPASS_MM, soft_tissue_noise
    from latentharmonize.patches import NOISY_SCAN, PatchSpec
    from latentharmonize.scans import load_scan

    rows = read_cohort(tiny_phantom_cohort).query("patient == 'P000'")
    rows = {row["acquisition"]: row for _, row in rows.iterrows()}
    soft = load_scan(rows["a_soft_thin"], PatchSpec())
    target = soft_tissue_noise(soft.hu, soft.grid.spacing, 1.0)  # the soft kernel at the floor meets it
    out = tmp_path / "model"
    code = main(["train", str(tiny_phantom_cohort), "--out", str(out), "--epochs", "1", "--clusters", "2",
                 "--patches-per-patient", "40", "--latent-dim", "6", "--device", "cpu", "--lowpass", "1",
                 "--lowpass-noise", f"{target + 0.01:.3f}"])
    assert code == 0 and load_bundle(out).spec.lowpass_noise_hu == pytest.approx(target + 0.01, abs=1e-3)
    records = {}
    for acquisition in ("a_soft_thin", "c_sharp_thick"):
        analyze(rows[acquisition]["image"], tmp_path / acquisition, model=out, device="cpu", write_report=False)
        records[acquisition] = json.loads((tmp_path / acquisition / "analysis.json").read_text())
    assert records["a_soft_thin"]["encoder_lowpass_mm"] == 1.0 and records["c_sharp_thick"]["encoder_lowpass_mm"] > 1.0
    assert all(NOISY_SCAN not in [w["code"] for w in r["warnings"]] for r in records.values())
    # a target no blur reaches: the largest blur, and a warning that the clusters may follow the noise
    code = main(["train", str(tiny_phantom_cohort), "--out", str(tmp_path / "strict"), "--epochs", "1", "--clusters",
                 "2", "--patches-per-patient", "40", "--latent-dim", "6", "--device", "cpu", "--lowpass", "1",
                 "--lowpass-noise", "0.01"])
    assert code == 0
    analyze(rows["c_sharp_thick"]["image"], tmp_path / "noisy", model=tmp_path / "strict", device="cpu",
            write_report=False)
    record = json.loads((tmp_path / "noisy" / "analysis.json").read_text())
    assert record["encoder_lowpass_mm"] == MAX_LOWPASS_MM
    assert [w for w in record["warnings"] if w["code"] == NOISY_SCAN][0]["message"].startswith("This scan is noisier")
