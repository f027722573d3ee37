"""Evaluation: measurements on synthetic encoded scans, and an end-to-end run on a tiny phantom cohort."""
from __future__ import annotations

import numpy as np
import pytest

from latentharmonize.errors import InputError
from latentharmonize.evaluation.consistency import consistency, consistency_per_patient, probe, truth_agreement
from latentharmonize.evaluation.encoding import Encoders, ScanLatents, encode_row, load_volumes, training_rows
from latentharmonize.evaluation.evaluate import FIGURES, evaluate
from latentharmonize.evaluation.figures import plot_traversals
from latentharmonize.evaluation.goals import (PAPER_GAIN_PERCENT, goal_check, paired_verdict, paired_versus,
                                              relative_gains)
from latentharmonize.evaluation.representations import LabelBaseline, assign_clusters, feature_names, of_kind
from latentharmonize.evaluation.survival_comparison import (SURVIVAL_ONLY, outcome_redraws, patient_profiles,
                                                            risk_reproducibility, tissue_readout)

REPRESENTATIONS = feature_names()
LABEL_BASELINES = [r.name for r in of_kind(LabelBaseline)]


def _scan(patient, acquisition, keys, labels, truth=None, latents=None, time=1.0, event=1):
    n = len(keys)
    return ScanLatents(patient=patient, acquisition=acquisition, split="eval", keys=np.asarray(keys, np.int64),
                       positions=np.asarray(keys, np.int64), latents={"entangled": latents if latents is not None else np.zeros((n, 2))},
                       truth=truth, densitometry={"laa950": 1.0, "haa700": 2.0, "mld": -850.0, "perc15": -900.0},
                       clinical={"time": time, "event": event}, labels=labels)


def _grid_keys(n, shift=0):
    return [(0, i + shift, 0) for i in range(n)]


def test_consistency_compares_labels_at_common_points_only():
    rng = np.random.default_rng(0)
    scans = []
    for p in range(3):
        truth = rng.integers(1, 4, 40)
        # acquisition b covers points 5..44: only 5..39 are shared with a
        a = _scan(f"p{p}", "a", _grid_keys(40), {"stable": truth.copy(), "noisy": truth.copy()})
        b_truth = np.concatenate([truth[5:], rng.integers(1, 4, 5)])
        noisy = np.where(rng.random(40) < 0.5, rng.integers(1, 4, 40), b_truth)
        b = _scan(f"p{p}", "b", _grid_keys(40, shift=5), {"stable": (b_truth % 3) + 7, "noisy": noisy})  # renamed labels
        scans += [a, b]
    out = consistency(consistency_per_patient(scans, ["stable", "noisy"]), n_boot=100, seed=0)
    assert out["stable"]["ari"] == pytest.approx(1.0)
    assert out["stable"]["dice"] == pytest.approx(1.0)
    assert out["noisy"]["ari"] < 0.7
    assert out["stable"]["n_patients"] == 3
    assert out["stable"]["mean_common_points"] == 35


def test_training_acquisition_covariance_pairs_each_patients_acquisitions_at_shared_points():
    """The widening evaluate gives each representation: its features' scatter between two acquisitions of a
    patient, at the points both hold (shifted lattices must be matched by key, not by row)."""
    from latentharmonize.clusters import acquisition_covariance
    from latentharmonize.evaluation.representations import training_acquisition_covariance

    rng = np.random.default_rng(0)
    scans, first, second = [], [], []
    for p in range(2):
        tissue = rng.normal(size=(45, 2)) * 4.0
        read = [tissue + rng.normal(size=(45, 2)) * [0.1, 1.0] for _ in range(2)]
        scans += [_scan(f"p{p}", "a", _grid_keys(40), {}, latents=read[0][:40]),
                  _scan(f"p{p}", "b", _grid_keys(40, shift=5), {}, latents=read[1][5:])]
        first.append(read[0][5:40])
        second.append(read[1][5:40])
    scans.append(_scan("alone", "a", _grid_keys(40), {}, latents=rng.normal(size=(40, 2)) * 50.0))  # no pair: no part
    got = training_acquisition_covariance(scans, [s.latents["entangled"] for s in scans])
    np.testing.assert_allclose(got, acquisition_covariance(np.concatenate(first), np.concatenate(second)))
    assert got[1, 1] > 10 * got[0, 0]  # the scanner moved points along the second feature
    assert training_acquisition_covariance(scans[-1:], [scans[-1].latents["entangled"]]) is None


def test_batch_harmonizers_are_left_out_on_acquisitions_unseen_in_training():
    """Held-out scanner settings: ComBat and Harmony can only correct acquisitions they were fitted on (their
    transform refuses the others), so evaluate leaves them out with the reason; LEACE needs no label and stays."""
    from latentharmonize.evaluation.harmonizers import ComBatHarmonizer, HarmonyHarmonizer
    from latentharmonize.evaluation.representations import REGISTRY

    by_name = {r.name: r for r in REGISTRY}
    seen, held_out = {"a_soft", "b_sharp"}, {"a_soft", "c_unseen"}
    for name in ("combat", "harmony"):
        assert by_name[name].unfit_for(seen, held_out) == ("corrects only acquisitions seen in training; 1 held-out "
                                                           "acquisitions are not (e.g. 'c_unseen')")
        assert by_name[name].unfit_for(seen, {"a_soft"}) is None
    assert by_name["leace"].unfit_for(seen, held_out) is None
    assert by_name["rotated"].unfit_for(seen, held_out) is None
    rng = np.random.default_rng(0)
    X, batch = rng.normal(size=(200, 4)), np.repeat(sorted(seen), 100)
    for harmonizer in (ComBatHarmonizer(), HarmonyHarmonizer(random_state=0)):
        fitted = harmonizer.fit(X, batch)
        with pytest.raises(InputError, match="cannot correct unseen"):
            fitted.transform(X[:5], np.full(5, "c_unseen"))


def test_paired_versus_pairs_patients_and_judges_by_the_ci():
    import pandas as pd

    rng = np.random.default_rng(4)
    base = rng.uniform(0.3, 0.7, 30)  # patients differ a lot; rotated is always a little better than "worse"
    per_patient = {"rotated": [{"ari": b + 0.05, "nmi": b, "dice": b} for b in base],
                   "worse": [{"ari": b, "nmi": b, "dice": b + 0.01 * rng.normal()} for b in base],
                   "bundle_clusters": [{"ari": b + 0.08, "nmi": b - 0.05, "dice": b} for b in base]}
    time = np.arange(1.0, 41.0)
    event = np.ones(40)
    risks = {"rotated": -time + rng.normal(0, 3, 40), "reversed": time.copy()}  # reversed ranks every pair wrongly
    table = pd.DataFrame({"time": time, "event": event})
    versus = paired_versus("rotated", per_patient, table, risks, n_boot=300, seed=0)
    bundle = paired_versus("bundle_clusters", per_patient, table, risks, n_boot=300, seed=0)
    assert set(versus) == {"worse", "bundle_clusters", "reversed"} and set(bundle) == {"worse", "rotated"}
    assert bundle["rotated"]["ari"]["difference"] == pytest.approx(0.03) and "c_index" not in bundle["rotated"]
    assert versus["worse"]["ari"]["difference"] == pytest.approx(0.05)
    assert versus["worse"]["ari"]["ci"][0] > 0  # a clear paired gain although the two means' own CIs overlap
    assert versus["worse"]["nmi"] == {"difference": 0.0, "ci": [0.0, 0.0]}
    assert versus["reversed"]["c_index"]["difference"] > 0.8 and versus["reversed"]["c_index"]["ci"][0] > 0.5
    goal = goal_check({"consistency": {"entangled": {"ari": 0.5, "nmi": 0.5, "dice": 0.5}, "rotated": {"ari": 0.6, "nmi": 0.6, "dice": 0.6}},
                       "relative_gain": relative_gains({"entangled": {"ari": 0.5, "nmi": 0.5, "dice": 0.5},
                                                        "rotated": {"ari": 0.6, "nmi": 0.6, "dice": 0.6}}),
                       "probe": {"rotated": 0.5, "chance": 0.5}, "rotated_versus": versus, "bundle_versus": bundle})
    assert goal["paired_verdict"]["worse"]["ari"] == "better"
    assert goal["bundle_paired_verdict"]["worse"]["ari"] == "better"
    assert goal["bundle_paired_verdict"]["worse"]["nmi"] == "worse"
    assert goal["paired_verdict"]["worse"]["nmi"] == "tie"
    assert goal["paired_verdict"]["reversed"]["c_index"] == "better"


def test_truth_agreement_and_profiles():
    truth = np.array([1, 1, 2, 2, 0, 3])
    s1 = _scan("p0", "a", _grid_keys(6), {"r": np.array([2, 2, 1, 1, 1, 3])}, truth=truth)
    s2 = _scan("p0", "b", _grid_keys(6), {"r": np.array([2, 2, 1, 3, 1, 3])}, truth=truth)
    agreement = truth_agreement([s1, s2], ["r"], n_boot=50, seed=0)
    assert agreement["r"]["ari"] < 1.0
    assert truth_agreement([s1], ["r"], n_boot=50, seed=0)["r"]["ari"] == pytest.approx(1.0)  # background excluded
    table = patient_profiles([s1, s2], ["r"], n_clusters=3)
    assert table.loc[0, "r:frac_1"] == pytest.approx(np.mean([3 / 6, 2 / 6]))
    assert table.loc[0, "laa950"] == 1.0 and table.loc[0, "time"] == 1.0


def _labels_with_share(share, n, rng):
    """n points, a ``share`` of them in cluster 2 (the one that carries the hazard), the rest in cluster 1."""
    labels = np.ones(n, np.int64)
    labels[rng.choice(n, int(round(share * n)), replace=False)] = 2
    return labels


def test_risk_reproducibility_separates_stable_from_acquisition_driven_risk():
    rng = np.random.default_rng(3)
    survivors = []
    for p in range(80):  # hazard rises with the share of cluster 2; one scan per patient
        share = rng.uniform(0.0, 0.5)
        labels = _labels_with_share(share, 100, rng)
        survivors.append(_scan(f"s{p}", "a", _grid_keys(100), {"rotated": labels, "entangled": labels.copy()},
                               time=float(rng.exponential(1 / np.exp(6 * share))), event=1))
    table = patient_profiles(survivors, ["rotated", "entangled"], n_clusters=2)
    evals = []
    for p in range(10):
        labels = _labels_with_share(rng.uniform(0.0, 0.5), 100, rng)
        for acquisition, inflation in (("a", 0.0), ("b", 0.0), ("c", 0.3)):
            drifting = labels.copy()  # acquisition c moves 30 % of cluster-1 points into cluster 2
            ones = np.flatnonzero(drifting == 1)
            drifting[ones[:int(inflation * len(ones))]] = 2
            evals.append(_scan(f"e{p}", acquisition, _grid_keys(100), {"rotated": labels, "entangled": drifting}))
    skipped = {}
    summary, data = risk_reproducibility(table, evals, ["rotated", "entangled"], 2, n_boot=200, seed=0, skipped=skipped)
    assert summary["rotated"]["icc"] == pytest.approx(1.0)
    assert summary["entangled"]["icc"] < 0.8
    assert summary["rotated"]["acquisitions"] == ["a", "b", "c"] and summary["rotated"]["n_patients"] == 10
    assert data["risks"]["entangled"].shape == (10, 3)
    assert np.all(data["risks"]["entangled"][:, 2] > data["risks"]["entangled"][:, 0])  # c raises everyone's risk
    versus = data["versus"]["entangled"]
    assert versus["difference"] == pytest.approx(summary["rotated"]["icc"] - summary["entangled"]["icc"])
    assert versus["ci"][0] > 0
    assert "constant" in skipped["risk_reproducibility:hu_thresholds"]  # the test scans share one densitometry
    skipped = {}
    assert risk_reproducibility(table, evals[:6], ["rotated"], 2, n_boot=50, seed=0, skipped=skipped) == ({}, {})
    assert "at least 3 evaluation patients" in skipped["risk_reproducibility"]


def test_outcome_redraws_tell_a_true_risk_from_noise():
    """Fresh phantom outcomes for the same patients: the true hazard's ranking leads noise in nearly every draw."""
    import pandas as pd

    from latentharmonize.phantom import log_hazard
    from latentharmonize.tissue import TISSUES

    rng = np.random.default_rng(0)
    disease = rng.uniform(0, 0.15, (300, len(TISSUES) - 1))
    table = pd.DataFrame(np.column_stack([1 - disease.sum(1), disease]), columns=[f"frac_{t}" for t in TISSUES])
    table["age"] = rng.normal(66, 8, 300)
    truth = np.array([log_hazard(dict(zip(TISSUES, row)), 65.0) for row in table[[f"frac_{t}" for t in TISSUES]].to_numpy()])
    risks = {"rotated": truth, "entangled": rng.normal(size=300), "inverted": -truth}
    out = outcome_redraws(table, risks, n_draws=40, seed=1)
    c = out["c_index"]
    assert out["n_draws"] == 40 and set(c) == set(risks)
    assert c["rotated"]["mean"] > 0.6 and abs(c["entangled"]["mean"] - 0.5) < 0.03
    assert c["inverted"]["mean"] == pytest.approx(1 - c["rotated"]["mean"], abs=0.01)  # ties aside, C(-r) = 1 - C(r)
    assert c["rotated"]["sd"] > 0  # the draws differ
    assert out["rotated_ahead_share"] == {"entangled": 1.0, "inverted": 1.0}
    assert outcome_redraws(table, risks, n_draws=40, seed=1) == out  # seeded
    assert outcome_redraws(table.drop(columns=["age"]), risks, n_draws=40, seed=1) == {}  # not a phantom table
    assert outcome_redraws(table, {"entangled": truth}, n_draws=40, seed=1) == {}


def test_probe_detects_acquisition_signal():
    rng = np.random.default_rng(1)
    scans = []
    for p in range(4):
        for acq, shift in (("soft", 0.0), ("sharp", 2.0)):
            X = rng.normal(size=(200, 3))
            s = _scan(f"p{p}", acq, _grid_keys(200), {}, latents=X)
            s.latents["shifted"] = X + shift
            scans.append(s)
    acc = probe(scans, {"clean": lambda s: s.latents["entangled"], "shifted": lambda s: s.latents["shifted"]}, 800, 0)
    assert acc["chance"] == pytest.approx(0.5)
    assert acc["shifted"] > 0.9
    assert abs(acc["clean"] - 0.5) < 0.1


def test_tissue_readout_tells_informative_from_blind_features():
    """Features that encode the tissue read it out (and the outcome it drives); features that do not, read chance."""
    from latentharmonize.progress import Progress

    rng = np.random.default_rng(3)

    def patient(name, split):
        emphysema = rng.uniform(0.05, 0.6)
        truth = np.where(rng.random(300) < emphysema, 2, 1)
        informative = np.stack([truth + 0.3 * rng.normal(size=300), rng.normal(size=300)], axis=1)
        time = float(np.exp(-4.0 * emphysema + 0.1 * rng.normal()))  # more emphysema, earlier death
        scan = _scan(name, "a", _grid_keys(300), {}, truth=truth, latents=informative, time=time, event=1)
        scan.split = split
        scan.latents["blind"] = rng.normal(size=(300, 2))
        # the patch HU the clusters are named from: emphysema's median and share below -950 HU, normal lung's
        median, low = np.where(truth == 2, -960.0, -860.0), np.where(truth == 2, 0.6, 0.02)
        scan.latents["hu_statistics"] = np.stack([median - 60, median - 30, median, median + 30, median + 60, low,
                                                  np.full(300, 0.05), np.full(300, 0.01)], axis=1)
        scan.latents["patch_mean_hu"] = median[:, None]
        return scan

    train = [patient(f"t{i}", "train") for i in range(6)]
    evals = [patient(f"e{i}", "eval") for i in range(60)]
    funcs = {"informative": lambda s: s.latents["entangled"], "blind": lambda s: s.latents["blind"]}
    rows = {i: np.arange(300) for i in range(len(train))}
    skipped = {}
    assign_clusters(funcs, train + evals, train, rows, n_clusters=2, seed=0, progress=Progress(quiet=True), skipped=skipped)
    assert skipped == {}
    table = patient_profiles(evals, list(funcs), n_clusters=2)
    assert (table["readout:informative:frac_normal"] + table["readout:informative:frac_emphysema"]).to_numpy() == pytest.approx(1.0)
    out = tissue_readout(evals, table, list(funcs), seed=0, n_boot=100, skipped=skipped)
    assert out["chance"]["balanced_accuracy"] == pytest.approx(0.5)
    assert out["informative"]["balanced_accuracy"] > 0.9
    # one acquisition here, so its balanced accuracy is the pooled one; per tissue, informative finds each
    assert out["informative"]["balanced_accuracy_worst_acquisition"] == pytest.approx(out["informative"]["balanced_accuracy"])
    assert set(out["informative"]["recall"]) == {"normal", "emphysema"}
    assert min(out["informative"]["recall"].values()) > 0.85
    assert out["informative"]["balanced_accuracy"] == pytest.approx(np.mean(list(out["informative"]["recall"].values())))
    assert abs(out["blind"]["balanced_accuracy"] - 0.5) < 0.05
    assert out["informative"]["c_index_ci"][0] > 0.8
    assert out["blind"]["c_index"] < 0.65


def test_gains_and_goal_check():
    cons = {"entangled": {"ari": 0.5, "nmi": 0.5, "dice": 0.6}, "rotated": {"ari": 0.65, "nmi": 0.55, "dice": 0.7},
            "combat": {"ari": 0.6, "nmi": 0.6, "dice": 0.6}, "hu_statistics": {"ari": 0.7, "nmi": 0.7, "dice": 0.7}}
    gains = relative_gains(cons)
    assert gains["rotated_vs_entangled_percent"]["ari"] == pytest.approx(30.0)
    assert gains["paper_percent"] == PAPER_GAIN_PERCENT
    goal = goal_check({"consistency": cons, "relative_gain": gains, "probe": {"rotated": 0.52, "chance": 0.5},
                       "survival": {"rotated": {"c_index": 0.7}, "entangled": {"c_index": 0.6}, "hu_thresholds": {"c_index": 0.75}}})
    assert goal["gain_at_least_paper"] == {"ari": True, "nmi": False, "dice": True}
    assert goal["rotated_beats_baselines"] == {"combat": False}  # hu_statistics is a reference, not a harmonizer
    assert goal["probe_near_chance"] is True
    assert goal["survival_rotated_beats"] == {"entangled": True, "hu_thresholds": False}


# ----------------------------------------------------------------------------- end to end on a tiny cohort
def _write_scan(folder, patient, acquisition, blocks, rng):
    """A small chest-like CT: air, a body wall, a lung box of 8 x 8 px tissue blocks; mask and truth beside it."""
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter

    shape = (14, 56, 56)
    truth = np.zeros(shape, np.uint8)
    truth[1:13, 8:48, 8:48] = np.kron(blocks, np.ones((8, 8), np.uint8))[None]
    hu = np.full(shape, -1000.0)
    hu[:, 3:53, 3:53] = 40.0
    means = {1: -850.0, 2: -960.0, 4: -700.0}
    noise = rng.normal(size=shape)
    if acquisition == "soft":
        noise, offset = gaussian_filter(noise, 1.0) * 25.0, 0.0
    else:
        noise, offset = noise * 45.0, 30.0
    for label, mean in means.items():
        hu[truth == label] = mean + offset + noise[truth == label]
    lung = (truth > 0).astype(np.uint8)
    lung[:, :, 28:] *= 2  # left lung
    paths = {}
    for name, array, kind in (("image", hu.astype(np.int16), "ct"), ("mask", lung, "mask"), ("truth", truth, "truth")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.25, 1.25, 2.5))
        paths[name] = folder / f"{patient}_{acquisition}_{kind}.nrrd"
        sitk.WriteImage(image, str(paths[name]))
    return {k: v.name for k, v in paths.items()}


def _write_cohort(folder, n_patients, seed):
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        emphysema = 0.1 + 0.5 * rng.random()
        blocks = rng.choice([1, 2, 4], size=(5, 5), p=[0.8 - emphysema, emphysema, 0.2]).astype(np.uint8)
        time, event = rng.exponential(1.0 / np.exp(3 * emphysema)), int(rng.random() < 0.8)
        for acq in ("soft", "sharp"):
            paths = _write_scan(folder, f"s{seed}p{p}", acq, blocks, rng)
            rows.append({**paths, "patient": f"s{seed}p{p}", "acquisition": acq, "kernel": acq, "vendor": "A",
                         "time": time, "event": event,
                         "age": 60 + p, "sex": "MF"[p % 2], "frac_normal": float(np.mean(blocks == 1)),
                         "frac_emphysema": float(np.mean(blocks == 2)), "frac_reticulation": float(np.mean(blocks == 4)),
                         "frac_ground_glass": 0.0, "frac_honeycombing": 0.0, "frac_consolidation": 0.0})
    pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)
    return folder / "cohort.csv"


def _tiny_bundle(folder, kind, cohort_csv, spec=None):
    """A bundle with an untrained tiny encoder, and a rotation and clusters fitted on its latents of the cohort."""
    from latentharmonize.bundle import ModelBundle, save_bundle
    from latentharmonize.clusters import TissueClusters
    from latentharmonize.cohort import read_cohort
    from latentharmonize.networks import build_model
    from latentharmonize.patches import encode_dense, PatchSpec
    from latentharmonize.rotation import LatentRotation

    spec = PatchSpec.from_dict(spec)
    model = build_model(kind, seed=len(kind), latent_dim=6, width=8)
    latents, acquisitions = [], []
    for _, row in read_cohort(cohort_csv).iterrows():
        hu, lung, grid, _, _ = load_volumes(row, spec)
        dense = encode_dense(model, hu, lung, grid, spec)
        latents.append(dense.latents)
        acquisitions += [row["acquisition"]] * len(dense.latents)
    X = np.concatenate(latents)
    rotation = LatentRotation(n_technical=1, method="labels").fit(X, np.array(acquisitions))
    clusters = TissueClusters(n_clusters=3, random_state=0).fit(rotation.biological(X))
    bundle = ModelBundle.create(name=f"tiny-{kind}", encoder_config=model.config, encoder_state=model.state_dict(),
                                spec=spec, rotation=rotation, clusters=clusters, names=["a", "b", "c"])
    save_bundle(bundle, folder)
    return folder


def test_bundle_clusters_label_each_scan_as_analyze_does_while_rotated_refits(tmp_path):
    from types import SimpleNamespace

    from latentharmonize.bundle import load_bundle
    from latentharmonize.cohort import read_cohort
    from latentharmonize.evaluation.representations import REGISTRY, Training, own_clusters, patch_statistics
    from latentharmonize.pipeline import patch_clusters
    from latentharmonize.progress import Progress

    train_csv = _write_cohort(tmp_path / "train", 2, seed=1)
    bundle = load_bundle(_tiny_bundle(tmp_path / "model", "ae", train_csv))
    encoders = Encoders(bundle, statistics=patch_statistics())
    scans = [encode_row(row, "train", encoders)[0] for _, row in read_cohort(train_csv).iterrows()]
    rows = training_rows(scans, 400, 0)
    training = Training(bundle, scans, rows, 0)
    funcs = {r.name: r.fit(training) for r in REGISTRY if r.name in ("entangled", "rotated", "bundle_clusters")}
    fitted = own_clusters(training, funcs)
    assert set(fitted) == {"bundle_clusters"} and fitted["bundle_clusters"] is bundle.clusters
    assign_clusters(funcs, scans, scans, rows, 2, 0, Progress(quiet=True), {}, fitted)
    for scan in scans:
        painted = patch_clusters(SimpleNamespace(latents=scan.latents["entangled"], core=None), bundle)[0]
        np.testing.assert_array_equal(scan.labels["bundle_clusters"], painted)
        assert set(np.unique(scan.labels["rotated"])) <= {1, 2}  # the refit has the 2 components asked for


def test_the_evaluation_reads_each_scans_noise_matched_densitometry_as_analyze_writes_it(tmp_path):
    """The kernel figure and the matched HU-threshold baseline read densitometry.csv's whole-lung row, over the
    CT's lung voxels, not a reading of their own: a phantom scan under a sharp kernel, the default bundle."""
    import pandas as pd
    import SimpleITK as sitk

    from latentharmonize import analyze_image
    from latentharmonize.bundle import default_bundle_path, load_bundle
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

    ct = acquire(make_patient(1, seed=0), DEFAULT_ACQUISITIONS[1])
    sitk.WriteImage(ct, str(tmp_path / "sharp.nrrd"))
    bundle = load_bundle(default_bundle_path())
    row = pd.Series({"image": str(tmp_path / "sharp.nrrd"), "patient": "p", "acquisition": "sharp"})
    read = encode_row(row, "eval", Encoders(bundle))[0].densitometry
    written = analyze_image(ct, bundle, device="cpu").densitometry.set_index("region").loc["whole"]
    assert read["laa950_matched"] == written["laa950_matched_pct"]
    assert read["perc15_matched"] == written["perc15_matched_hu"]
    assert (read["laa950"], read["perc15"]) == (written["laa950_pct"], written["perc15_hu"])  # raw, same voxels
    assert written["laa950_pct"] - written["laa950_matched_pct"] > 1.0  # the sharp kernel's noise, matched away


def test_traversals_of_a_densitometry_bundle_decode_the_encoder_part(tmp_path):
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cohort import read_cohort

    train_csv = _write_cohort(tmp_path / "train", 2, seed=1)
    entry = {"weight": 1.0, "center": [-800.0] * 5 + [0.2] * 3, "scale": [100.0] * 5 + [0.2] * 3}
    bundle = load_bundle(_tiny_bundle(tmp_path / "model", "ae", train_csv, spec={"densitometry": entry}))
    assert bundle.rotation.rotation_.shape == (14, 14)
    encoders = Encoders(bundle)
    scans = [encode_row(row, "train", encoders)[0] for _, row in read_cohort(train_csv).iterrows()]
    assert all(s.latents["entangled"].shape[1] == 14 for s in scans)
    sds = plot_traversals(bundle, scans, training_rows(scans, 200, 0), tmp_path / "traversals.png")
    assert set(sds) == {"technical 1", "biological 1"} and all(sd > 0 for sd in sds.values())
    assert (tmp_path / "traversals.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_tiny_cohort_writes_well_formed_metrics(tmp_path):
    import json

    from latentharmonize.cli import main

    train_csv = _write_cohort(tmp_path / "train", 4, seed=1)
    test_csv = _write_cohort(tmp_path / "test", 3, seed=2)
    model = _tiny_bundle(tmp_path / "model", "ae", train_csv)
    unoranic = _tiny_bundle(tmp_path / "unoranic", "unoranic", train_csv)
    out = tmp_path / "eval"
    args = ["evaluate", str(test_csv), "--model", str(model), "--train-cohort", str(train_csv),
            "--unoranic", str(unoranic), "--out", str(out), "--quick"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # on these tiny scans (10 mm tissue blocks under 20 mm patches) most baselines' components all read as one
    # tissue: one cluster, left out of the cluster measures; rotated and entangled are always measured
    one_cluster = {k.split(":", 1)[1] for k, v in metrics["skipped"].items() if k.startswith("clusters:")}
    assert all("one cluster" in metrics["skipped"][f"clusters:{n}"] for n in one_cluster)
    assert not one_cluster & {"rotated", "entangled"} and one_cluster <= set(REPRESENTATIONS)
    compared = (set(REPRESENTATIONS) | set(LABEL_BASELINES)) - one_cluster
    assert set(metrics["consistency"]) == compared
    for name in compared:
        m = metrics["consistency"][name]
        for key in ("ari", "nmi", "dice"):
            assert -1.0 <= m[key] <= 1.0 and m[f"{key}_ci"][0] <= m[key] <= m[f"{key}_ci"][1]
        assert m["n_patients"] == 3
        assert 0.0 <= metrics["truth_agreement"][name]["nmi"] <= 1.0
    assert all(0.0 <= metrics["probe"][name] <= 1.0 for name in REPRESENTATIONS)
    assert "hu_threshold_classes" not in metrics["probe"] and "hu_threshold_classes" not in metrics["survival"]
    # the tiny scans: normal -850, emphysema -960, reticulation -700 (+30 HU and more noise when sharp)
    recall = metrics["tissue_recall"]["hu_threshold_classes"]
    assert set(recall["per_acquisition"]) == {"soft", "sharp"} and recall["normal"] == 2
    assert 0.0 <= recall["min"]["emphysema_recall"] <= 1.0 and 0.0 <= recall["min"]["reticulation_outside_normal"] <= 1.0
    assert set(metrics["tissue_recall"]) == compared
    held = metrics["tissue_in_mask"]  # what the lung mask holds of each tissue, counted on the evaluation scans
    assert set(held["per_acquisition"]) == {"soft", "sharp"} and all(0.0 < v <= 1.0 for v in held["min"].values())
    assert recall["min"]["reticulation_found"] == pytest.approx(min(
        r["reticulation_outside_normal"] * held["per_acquisition"][acq]["reticulation"]
        for acq, r in recall["per_acquisition"].items()))
    assert "inside the lung mask (every representation)" in (out / "report.html").read_text()
    kernel = metrics["kernel_robustness"]
    assert kernel["n_pairs"] == 3 and set(kernel) <= compared | {"laa950", "laa950_matched", "n_pairs"}
    assert np.isfinite(kernel["laa950_matched"]["mean_change_points"])  # analyze's noise-matched reading
    assert kernel["laa950"]["mean_change_points"] < 0  # the sharp scans' +30 HU offset lowers LAA-950
    assert "Kernel-robust emphysema" in (out / "report.html").read_text()
    stability = metrics["cluster_stability"]  # each cluster of each compared map across a patient's acquisitions
    assert set(stability) == compared
    for name, clusters in stability.items():
        assert sum(c["share_percent"] for c in clusters) == pytest.approx(100.0)
        assert all(c["dice"] is None or 0.0 <= c["dice"] <= 1.0 for c in clusters)
    assert all(c["name"] is None for c in stability["entangled"])  # one-stage clusters keep no names
    assert "Each cluster across acquisitions" in (out / "report.html").read_text()
    spread = metrics["seed_spread"]  # the tissue goal's pair over mixture seeds, the run's own fit first
    assert set(spread) - {"rotated_ahead"} == {"rotated", "hu_statistics"} - one_cluster
    assert spread["rotated"]["seeds"] == [0, 1]
    assert spread["rotated"]["truth_ari"][0] == pytest.approx(metrics["truth_agreement"]["rotated"]["ari"])
    assert spread["rotated"]["consistency_ari"][0] == pytest.approx(metrics["consistency"]["rotated"]["ari"])
    assert "Over mixture seeds" in (out / "report.html").read_text()
    assert metrics["probe"]["chance"] == pytest.approx(0.5, abs=0.05)
    assert set(metrics["survival"]) == (set(REPRESENTATIONS) - one_cluster) | set(SURVIVAL_ONLY)
    assert all(0.0 <= s["c_index"] <= 1.0 and s["n"] == 7 for s in metrics["survival"].values())
    assert all(k.startswith("clusters:") or (k.startswith("risk_reproducibility:") and "constant" in v)
               for k, v in metrics["skipped"].items())
    assert set(metrics["relative_gain"]["rotated_vs_entangled_percent"]) == {"ari", "nmi", "dice"}
    others = set(REPRESENTATIONS) - {"rotated"} - one_cluster
    assert set(metrics["rotated_versus"]) == others | set(LABEL_BASELINES) | set(SURVIVAL_ONLY)
    for other in others:
        d = metrics["rotated_versus"][other]["nmi"]
        assert d["difference"] == pytest.approx(metrics["consistency"]["rotated"]["nmi"] - metrics["consistency"][other]["nmi"])
        d = metrics["rotated_versus"][other]["c_index"]
        assert d["difference"] == pytest.approx(metrics["survival"]["rotated"]["c_index"] - metrics["survival"][other]["c_index"])
        assert metrics["goal"]["paired_verdict"][other]["c_index"] in ("better", "worse", "tie")
    # the map analyze paints, judged against the same representations on the same patients where it is compared
    assert ("bundle_versus" in metrics) == ("bundle_clusters" in compared)
    assert ("The bundle's own clusters (the map analyze paints) minus" in (out / "report.html").read_text()) == (
        "bundle_clusters" in compared)
    for other in (others - {"bundle_clusters"}) & set(metrics.get("bundle_versus", {})):
        d = metrics["bundle_versus"][other]["ari"]
        assert d["difference"] == pytest.approx(metrics["consistency"]["bundle_clusters"]["ari"]
                                                - metrics["consistency"][other]["ari"])
        assert metrics["goal"]["bundle_paired_verdict"][other]["ari"] == paired_verdict(d["ci"])
    for name in FIGURES:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(FIGURES)
    assert "Rotated minus each other representation" in report
    repro = metrics["risk_reproducibility"]
    one_cluster = {k.split(":", 1)[1] for k in metrics["skipped"]}
    assert set(repro) | one_cluster == set(REPRESENTATIONS) | {"hu_thresholds", "hu_thresholds_matched"}
    for name, m in repro.items():
        assert m["icc"] <= 1.0 and m["icc_ci"][0] <= m["icc_ci"][1] and m["n_patients"] == 3  # 3 patients: wide CI
        if name != "rotated" and "rotated" in repro:
            d = metrics["rotated_versus"][name]["risk_icc"]
            assert d["difference"] == pytest.approx(repro["rotated"]["icc"] - m["icc"])
            assert f"<td>{name}</td><td>{m['icc']:.3f}" in report
    readout = metrics["tissue_readout"]
    assert set(readout) == set(REPRESENTATIONS) | {"chance"}
    for name in REPRESENTATIONS:
        assert 0.0 <= readout[name]["balanced_accuracy"] <= 1.0 and 0.0 <= readout[name]["c_index"] <= 1.0
        m = readout[name]  # soft and sharp scans: the worse of the two sits near or below the pooled figure
        assert 0.0 <= m["balanced_accuracy_worst_acquisition"] <= m["balanced_accuracy"] + 0.1
        assert f"<td>{name}</td><td>{m['balanced_accuracy']:.3f}</td><td>{m['balanced_accuracy_worst_acquisition']:.3f}</td>" in report
    redraws = metrics["survival_redraws"]
    assert redraws["n_draws"] == 30 and set(redraws["c_index"]) == set(metrics["survival"])
    assert set(redraws["rotated_ahead_share"]) == set(metrics["survival"]) - {"rotated"}
    assert all(0.0 <= v <= 1.0 for v in redraws["rotated_ahead_share"].values())
    assert f"<td>true_composition</td><td>{redraws['c_index']['true_composition']['mean']:.3f} ± " in report
    for other in others:  # one table row per other representation, its C-index difference printed as computed
        assert f"{metrics['rotated_versus'][other]['c_index']['difference']:+.3f}" in report
    assert main(args) == 2  # existing results are not overwritten
    with pytest.raises(Exception, match="also training scans"):
        evaluate(train_csv, tmp_path / "again", model=model, train_cohort=train_csv, quick=True)


def test_evaluate_survival_on_a_separate_cohort(tmp_path):
    import json

    train_csv = _write_cohort(tmp_path / "train", 4, seed=1)
    test_csv = _write_cohort(tmp_path / "test", 2, seed=2)
    survival_csv = _write_cohort(tmp_path / "survival", 6, seed=3)
    model = _tiny_bundle(tmp_path / "model", "ae", train_csv)
    metrics = evaluate(test_csv, tmp_path / "eval", model=model, train_cohort=train_csv, quick=True,
                       survival_cohort=survival_csv)
    assert metrics["n_survival_patients"] == 6 and str(survival_csv) in metrics["survival_population"]
    assert all(s["n"] == 6 for s in metrics["survival"].values())
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_survival_patients"] == 6

    import pandas as pd
    no_outcome = survival_csv.parent / "no_outcome.csv"  # image paths are relative to the table
    pd.read_csv(survival_csv).drop(columns=["time", "event"]).to_csv(no_outcome, index=False)
    with pytest.raises(Exception, match="no time and event"):
        evaluate(test_csv, tmp_path / "e2", model=model, train_cohort=train_csv, quick=True, survival_cohort=no_outcome)
    with pytest.raises(Exception, match="survival scans are also training scans"):
        evaluate(test_csv, tmp_path / "e3", model=model, train_cohort=train_csv, quick=True, survival_cohort=train_csv)
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()


def test_evaluate_without_truth_skips_the_truth_measurements(tmp_path):
    """A real cohort has no voxel truth: no truth agreement, no tissue read-out, and the report says so."""
    import pandas as pd

    train_csv = _write_cohort(tmp_path / "train", 4, seed=1)
    test_csv = _write_cohort(tmp_path / "test", 2, seed=2)
    model = _tiny_bundle(tmp_path / "model", "ae", train_csv)
    for csv in (train_csv, test_csv):
        pd.read_csv(csv).drop(columns=["truth"]).to_csv(csv, index=False)
    metrics = evaluate(test_csv, tmp_path / "eval", model=model, train_cohort=train_csv, quick=True)
    assert metrics["truth_agreement"] == {} and metrics["tissue_readout"] == {}
    assert metrics["consistency"]["rotated"]["n_patients"] == 2
    assert "No read-out" in (tmp_path / "eval" / "report.html").read_text()
