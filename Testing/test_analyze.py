"""End-to-end ``analyze`` on a small synthetic chest phantom, its outputs, determinism and every refusal."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import slicerio

from latentharmonize.analyze_command import analyze, input_name, output_names
from latentharmonize.pipeline import STAGES, check_geometry
from latentharmonize.structures import AIRWAY_LABEL, VESSEL_LABEL
from latentharmonize.cli import main as cli_main
from latentharmonize.errors import InputError, NoLungFoundError, OutputError
from latentharmonize.io import image_sha256

def synthetic_chest(seed: int = 0, size=(112, 112, 36), spacing=(2.8, 2.8, 5.0), lungs: bool = True) -> sitk.Image:
    """A tiny chest CT in HU for the refusal tests, whose size and spacing are easy to vary: body ellipse, two lung
    ellipsoids with an emphysema-like (-960 HU) apex and a denser (-600 HU) base, noise. 313 x 313 x 180 mm."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(size[::-1], spacing[::-1])]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    hu = np.full(x.shape, -1000.0, np.float32)
    hu[(x / 140) ** 2 + (y / 100) ** 2 < 1] = 40.0
    if lungs:
        lung = (((np.abs(x) - 60) / 45) ** 2 + (y / 65) ** 2 + (z / 75) ** 2 < 1)
        hu[lung] = -850.0
        hu[lung & (z > 25) & (x < 0)] = -960.0
        hu[lung & (z < -30) & (x > 0)] = -600.0
    hu += rng.normal(0, 25, size=hu.shape).astype(np.float32)
    image = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(size, spacing)))
    return image


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), True)
    return path


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    """One acquisition of the project's small phantom patient (192 x 192 x 112 voxels of 1.25 mm)."""
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

    image = acquire(make_patient(0, seed=0), DEFAULT_ACQUISITIONS[0])
    return _write(image, tmp_path_factory.mktemp("scan") / "chest.nrrd")


@pytest.fixture(scope="module")
def bundle_dir() -> Path:
    """The model bundle shipped with the extension (what `analyze` uses without --model)."""
    from latentharmonize.bundle import default_bundle_path

    return default_bundle_path()


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    from latentharmonize.bundle import load_bundle

    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, scan, bundle_dir):
    events = []
    out = tmp_path_factory.mktemp("run1")
    result = analyze(scan, out, model=bundle_dir, device="cpu", progress=lambda p, s, m="": events.append((p, s)))
    return result, events


def test_outputs_are_complete_and_published(first_run):
    result, _ = first_run
    expected = set(output_names("chest").values())
    assert {p.name for p in result.out_dir.iterdir()} == expected  # no staging folder left behind
    assert set(result.files) == set(output_names("chest"))


def test_labels_only_inside_the_lungs_and_everywhere_inside(first_run, bundle):
    result, _ = first_run
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.files["labels"])))
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(result.files["lungs"])))
    confidence = sitk.GetArrayFromImage(sitk.ReadImage(str(result.files["confidence"])))
    assert set(np.unique(lungs)) == {0, 1, 2}
    assert not labels[lungs == 0].any()
    assert labels[lungs > 0].min() >= 1
    assert set(np.unique(labels[lungs > 0])) <= set(bundle.names) | {VESSEL_LABEL, AIRWAY_LABEL}
    # the phantom's vessel trees are found, and they are a minority of the lung
    assert 0.005 < np.mean(labels[lungs > 0] == VESSEL_LABEL) < 0.15
    # so is its airway tree, though the scan ends within the model grid's margin above the lungs
    assert 0.0005 < np.mean(labels[lungs > 0] == AIRWAY_LABEL) < 0.05
    assert (confidence[lungs == 0] == 0).all() and 0 <= confidence.min() and confidence.max() <= 1


def test_composition_fractions_sum_to_one(first_run, bundle):
    result, _ = first_run
    table = pd.read_csv(result.files["composition_csv"])
    assert set(table.region) == {"whole", "right", "left", "upper", "middle", "lower"}
    np.testing.assert_allclose(table.groupby("region").fraction.sum(), 1.0, atol=1e-5)
    doc = json.loads(result.files["composition_json"].read_text())
    legend = {**bundle.names, VESSEL_LABEL: "vessels", AIRWAY_LABEL: "airways"}
    assert [c["name"] for c in doc["clusters"]] == [legend[k] for k in sorted(legend)]
    assert doc["model_sha256"] == bundle.sha256
    whole = table[table.region == "whole"]
    assert doc["lung_volumes_ml"]["total"] == pytest.approx(whole.volume_ml.sum(), rel=1e-4)


def test_composition_reports_vessels_and_airways_as_structures(first_run, scan):
    result, _ = first_run
    table = pd.read_csv(result.files["composition_csv"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.files["labels"])))
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(result.files["lungs"])))
    voxel_ml = float(np.prod(sitk.ReadImage(str(scan)).GetSpacing())) / 1000.0
    whole = table[table.region == "whole"].set_index("label")
    for label, name in ((VESSEL_LABEL, "vessels"), (AIRWAY_LABEL, "airways")):
        count = int((labels == label).sum())
        assert whole.loc[label, "name"] == name
        assert whole.loc[label, "volume_ml"] == pytest.approx(count * voxel_ml, rel=1e-5)
        assert whole.loc[label, "fraction"] == pytest.approx(count / (lungs > 0).sum(), rel=1e-5)


def test_seg_nrrd_is_a_slicer_segmentation_of_the_label_map(first_run, scan, bundle):
    result, _ = first_run
    seg = slicerio.read_segmentation(str(result.files["segmentation"]))
    legend = {**bundle.names, VESSEL_LABEL: "vessels", AIRWAY_LABEL: "airways"}
    assert [s["labelValue"] for s in seg["segments"]] == sorted(legend)
    assert [s["name"] for s in seg["segments"]] == [legend[k] for k in sorted(legend)]
    for s in seg["segments"][:len(bundle.names)]:
        np.testing.assert_allclose(s["color"], bundle.colors[s["labelValue"]], atol=1e-6)
    # DICOM SEG export needs each segment's own code: tissue for clusters, vessel and airway for the structures
    kinds = {s["labelValue"]: s["terminology"]["type"][2] for s in seg["segments"]}
    assert kinds == {**{label: "Tissue" for label in bundle.names}, VESSEL_LABEL: "Blood vessel",
                     AIRWAY_LABEL: "Airway structure"}
    ct = sitk.ReadImage(str(scan))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.files["labels"])))
    np.testing.assert_array_equal(seg["voxels"], labels.T)
    corner = np.array([5, 7, 3, 1.0])
    np.testing.assert_allclose((seg["ijkToLPS"] @ corner)[:3], ct.TransformContinuousIndexToPhysicalPoint(corner[:3].tolist()))


def test_record_identifies_input_and_model(first_run, scan, bundle):
    result, _ = first_run
    record = json.loads(result.files["record"].read_text())
    assert record["input_sha256"] == image_sha256(scan)
    assert record["model_sha256"] == bundle.sha256
    assert record["mask"] == "automatic" and record["n_patches"] > 100
    assert set(record["timings_s"]) >= {"load", "mask", "structures", "encode", "write", "qc_report", "total"}


def test_progress_is_monotonic_and_follows_the_documented_stages(first_run):
    _, events = first_run
    percents = [p for p, _ in events]
    assert percents == sorted(percents) and percents[-1] == 100
    stages = list(dict.fromkeys(s for _, s in events))
    assert stages == [s for s in list(STAGES) + ["done"] if s in stages]
    assert {"load", "mask", "encode", "write", "report", "done"} <= set(stages)


def test_cli_gives_identical_outputs_and_progress_lines(first_run, scan, bundle_dir, tmp_path, capsys):
    result, _ = first_run
    code = cli_main(["analyze", str(scan), "--out", str(tmp_path), "--device", "cpu", "--progress-lines"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(re.match(r"^LH-PROGRESS \d{1,3} \w+", line) for line in lines)
    for name in output_names("chest").values():
        if name != "analysis.json":  # holds timings
            assert (tmp_path / name).read_bytes() == (result.out_dir / name).read_bytes(), name


def test_given_lung_mask_is_used_and_report_can_be_skipped(first_run, scan, bundle_dir, tmp_path):
    result, _ = first_run
    lungs = sitk.ReadImage(str(result.files["lungs"]))
    left_only = sitk.Cast(lungs == 2, sitk.sitkUInt8)  # a binary mask of one lung
    _write(left_only, tmp_path / "mask.nrrd")
    masked = analyze(scan, tmp_path / "out", model=bundle_dir, device="cpu", mask=tmp_path / "mask.nrrd",
                     write_report=False)
    assert {p.name for p in (tmp_path / "out").iterdir()} == set(output_names("chest", write_report=False).values())
    assert "report.html" not in output_names("chest", write_report=False).values()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(masked.files["labels"])))
    assert masked.record["mask"] == str(tmp_path / "mask.nrrd")
    np.testing.assert_array_equal(labels > 0, sitk.GetArrayFromImage(left_only) > 0)


def test_slice_order_does_not_change_the_result(bundle_dir, tmp_path):
    """The same chest stored head-first and feet-first (direction z = -1) gives the same maps and composition, up
    to nearest-neighbour ties between lattice points."""
    image = synthetic_chest()
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[::-1].copy())
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, image.GetSize()[2] - 1)))
    runs = [analyze(_write(im, tmp_path / f"{name}.nrrd"), tmp_path / name, model=bundle_dir, device="cpu",
                    write_report=False) for name, im in (("head_first", image), ("feet_first", flipped))]
    first, second = (sitk.GetArrayFromImage(sitk.ReadImage(str(r.files["labels"]))) for r in runs)
    assert (first == second[::-1]).mean() > 0.95
    whole = [r.composition[r.composition.region == "whole"].set_index("label").fraction for r in runs]
    np.testing.assert_allclose(whole[0], whole[1], atol=0.03)


def test_existing_outputs_are_refused_without_overwrite(first_run, scan, bundle_dir):
    result, _ = first_run
    before = {p.name: p.read_bytes() for p in result.out_dir.iterdir()}
    with pytest.raises(OutputError, match="--overwrite"):
        analyze(scan, result.out_dir, model=bundle_dir, device="cpu")
    assert {p.name: p.read_bytes() for p in result.out_dir.iterdir()} == before


@pytest.mark.parametrize("stage", ["encode", "write", "report"])
def test_interruption_leaves_nothing(scan, bundle_dir, tmp_path, stage):
    (tmp_path / "notes.txt").write_text("mine")

    def interrupt(percent, current, message=""):
        if current == stage:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze(scan, tmp_path, model=bundle_dir, device="cpu", progress=interrupt)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _bad_scan(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.nrrd"
    if kind == "not_an_image":
        path.write_text("this is not an image")
        return path
    if kind == "mr_like":
        image = sitk.Cast(sitk.RescaleIntensity(synthetic_chest(), 0, 1200), sitk.sitkInt16)
    elif kind == "no_lung":
        image = synthetic_chest(lungs=False)
    elif kind == "coarse_pixels":
        image = synthetic_chest(size=(80, 80, 36), spacing=(4.0, 4.0, 5.0))
    elif kind == "thick_slices":
        image = synthetic_chest(size=(112, 112, 20), spacing=(2.8, 2.8, 8.0))
    else:  # small_fov
        image = synthetic_chest(size=(40, 40, 36), spacing=(2.8, 2.8, 5.0))
    return _write(image, path)


@pytest.mark.parametrize("kind, error, words", [
    ("not_an_image", InputError, "not an image"),
    ("mr_like", InputError, "Hounsfield"),
    ("no_lung", NoLungFoundError, "lung"),
    ("coarse_pixels", InputError, "In-plane pixel spacing"),
    ("thick_slices", InputError, "Slice spacing"),
    ("small_fov", InputError, "field of view"),
])
def test_bad_inputs_are_refused_with_nothing_written(kind, error, words, bundle_dir, tmp_path):
    source = _bad_scan(kind, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(error, match=words):
        analyze(source, out, model=bundle_dir, device="cpu")
    assert not out.exists()


def test_unwritable_output_folder(scan, bundle_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        analyze(scan, blocker, model=bundle_dir, device="cpu")
    with pytest.raises(OutputError):
        analyze(scan, "/proc/latentharmonize-test-out", model=bundle_dir, device="cpu")


def test_mask_on_another_grid_and_cli_error_message(scan, bundle_dir, tmp_path, capsys):
    mask = synthetic_chest(size=(100, 100, 36))
    _write(sitk.Cast(mask < -500, sitk.sitkUInt8), tmp_path / "mask.nrrd")
    code = cli_main(["analyze", str(scan), "--out", str(tmp_path / "out"), "--model", str(bundle_dir),
                     "--mask", str(tmp_path / "mask.nrrd")])
    assert code == 2
    err = capsys.readouterr().err
    assert "latentharmonize analyze: error:" in err and "grid" in err and "Traceback" not in err


def test_lung_voxels_take_the_cluster_of_the_nearest_valid_patch_centre():
    from latentharmonize.pipeline import ct_lookup, nearest_valid_index
    from latentharmonize.grid import ModelGrid

    lattice = ModelGrid(origin=(0.0, 0.0, 0.0), spacing=(5.0, 5.0, 2.5), shape=(1, 1, 4))  # centres x = 0, 5, 10, 15
    valid = np.array([[[True, False, False, True]]])
    values = np.array([[[1, 0, 0, 2]]], np.uint8)
    filled = values[nearest_valid_index(valid, (2.5, 5.0, 5.0))]
    assert filled.ravel().tolist() == [1, 1, 2, 2]
    ct = sitk.Image([20, 3, 1], sitk.sitkInt16)  # x = -1.5 .. 17.5 mm, 1 mm voxels
    ct.SetOrigin((-1.5, -1.0, 0.0))
    lungs = sitk.Image([20, 3, 1], sitk.sitkUInt8)
    lungs.CopyInformation(ct)
    for i in range(2, 20):
        lungs[i, 1, 0] = 1
    labels = sitk.GetArrayFromImage(ct_lookup(lattice, ct, lungs).scatter(filled, ct))[0]
    x = -1.5 + np.arange(20)
    expected = np.where(x < 7.5, 1, 2)  # nearest lattice point, then its nearest valid centre
    expected[:2] = 0  # not lung
    np.testing.assert_array_equal(labels[1], expected)
    assert not labels[0].any() and not labels[2].any()


def test_geometry_check_accepts_ordinary_chest_ct():
    image = sitk.Image([200, 200, 120], sitk.sitkUInt8)
    image.SetSpacing((1.8, 1.8, 2.5))
    check_geometry(image)
    image.SetDirection((1, 0, 0, 0, 0, -1, 0, 1, 0))  # coronal acquisition: slices along y, z in-plane
    image.SetSpacing((1.8, 5.0, 1.8))
    check_geometry(image)
    image.SetSpacing((1.8, 5.0, 4.0))  # now the in-plane (x, z) pixels are too coarse
    with pytest.raises(InputError, match="In-plane"):
        check_geometry(image)


def test_input_names():
    assert input_name("/data/p1/scan.nii.gz") == "scan"
    assert input_name("/data/p1/ct.nrrd") == "ct"
    assert input_name("/data/dicom_series/") == "dicom_series"


@pytest.mark.slow
def test_bench_reports_every_figure(scan, bundle_dir, tmp_path):
    from latentharmonize.bench import benchmark, format_report

    figures = benchmark(model=bundle_dir, device="cpu", workdir=tmp_path, scan=scan)
    run, enc, warm = figures["analyze"], figures["encoding"], figures["worker"]
    assert run["peak_rss_gb"] > 0 and run["cpu_s"] > 0 and run["wall_s"] > 0
    assert enc["patches"] == run["record"]["n_patches"] and enc["naive_patches_measured"] > 0
    assert warm["record"]["n_patches"] == run["record"]["n_patches"] and len(warm["warm_runs_s"]) == 3
    assert min(warm["warm_runs_s"]) <= warm["warm_s"] <= max(warm["warm_runs_s"])
    # the worker is sent the Slicer module's request: no QC pictures or report, which the module makes on demand
    assert "qc_report" in run["record"]["timings_s"] and "qc_report" not in warm["record"]["timings_s"]
    assert warm["cold_over_warm"] == round(run["wall_s"] / warm["warm_s"], 1)
    assert figures["preloaded"]["record"]["n_patches"] == run["record"]["n_patches"]
    text = format_report(figures)
    assert "patches/s" in text and "peak RSS" in text and "given scan" in text and "warm" in text
    assert f"first request {figures['preloaded']['first_s']:.1f} s" in text
    assert f"median {warm['warm_s']:.1f} s" in text


def test_bench_worker_reads_the_uncompressed_copy_the_slicer_module_hands_over(scan, tmp_path):
    from latentharmonize.bench import as_slicer_hands_it_over

    copy = as_slicer_hands_it_over(scan, tmp_path / "scratch.nrrd")
    original, handed = sitk.ReadImage(str(scan)), sitk.ReadImage(str(copy))
    assert np.array_equal(sitk.GetArrayViewFromImage(original), sitk.GetArrayViewFromImage(handed))
    assert handed.GetSpacing() == original.GetSpacing() and handed.GetOrigin() == original.GetOrigin()
    header = copy.read_bytes().split(b"\n\n", 1)[0]
    assert b"encoding: raw" in header


def test_bench_creates_a_missing_workdir(tmp_path, monkeypatch):
    from latentharmonize import bench

    seen = []
    monkeypatch.setattr(bench, "benchmark", lambda **kwargs: seen.append(Path(kwargs["workdir"]).is_dir()) or {})
    monkeypatch.setattr(bench, "format_report", lambda figures: "")
    assert cli_main(["bench", "--workdir", str(tmp_path / "new" / "work")]) == 0
    assert seen == [True]


def test_program_ends_with_every_line_printed_and_every_file_published(scan, bundle_dir, tmp_path):
    """The program ends an analyze run without Python's teardown: piped output must still arrive in full."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-m", "latentharmonize", "analyze", str(scan), "--out", str(out), "--model",
               str(bundle_dir), "--device", "cpu", "--no-report"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # piped stdout is block-buffered
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"Results in {out}")  # the summary, printed last
    assert sorted(p.name for p in out.iterdir()) == sorted(output_names("chest", write_report=False).values())


def test_sigterm_leaves_nothing(scan, bundle_dir, tmp_path):
    """A GUI's Cancel (SIGTERM) during the run: the process exits 130 and publishes nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    command = [sys.executable, "-m", "latentharmonize", "analyze", str(scan), "--out", str(out), "--model",
               str(bundle_dir), "--device", "cpu", "--progress-lines"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until the run is under way
        if " encode " in line:
            break
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    time.sleep(0.1)
    assert not out.exists()


def test_cuda_without_a_gpu_is_refused_before_work(scan, bundle_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(InputError, match="CUDA"):
        analyze(scan, tmp_path / "out", model=bundle_dir, device="cuda")
    assert not (tmp_path / "out").exists()


def test_label_map_interpolates_cluster_probabilities_between_patch_centres():
    """Between two patch centres the label follows the linearly interpolated cluster probabilities (dissimilarities
    1 - p) at the model grid's 1.25 mm, not the nearest centre; vessels found at the CT's resolution replace the
    tissue label."""
    from types import SimpleNamespace

    from latentharmonize.pipeline import _cluster_maps
    from latentharmonize.grid import ModelGrid
    from latentharmonize.patches import DenseLatents

    lattice = ModelGrid(origin=(0.0, 0.0, 0.0), spacing=(5.0, 5.0, 2.5), shape=(1, 1, 4))  # centres x = 0, 5, 10, 15
    grid = ModelGrid(origin=(0.0, 0.0, 0.0), spacing=(1.25, 1.25, 2.5), shape=(1, 1, 13))  # x = 0, 1.25 .. 15
    # two clusters whose probability is linear in the first feature: p2 = feature, p1 = 1 - feature
    clusters = SimpleNamespace(transform=lambda z: np.stack([z[:, 0], 1.0 - z[:, 0]], axis=1))
    bundle = SimpleNamespace(clusters=clusters, rotation=SimpleNamespace(cluster_features=lambda x: x))
    # dissimilarities to the two clusters: (0, 1) at x = 0, (0.6, 0.4) at x = 5: equal at x = 4.17 mm, not at 2.5 mm
    latents = np.array([[0.0, 0.0], [0.6, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    dense = DenseLatents(latents=latents, positions=np.array([[0, 0, i] for i in range(4)]), lattice=lattice)
    ct = sitk.Image([20, 3, 1], sitk.sitkInt16) - 850  # x = -1.5 .. 17.5 mm, 1 mm voxels, lung HU
    ct.SetOrigin((-1.5, -1.0, 0.0))
    ct[12, 1, 0] = 40  # x = 10.5 mm: dense, next to a vessel found on the model grid
    lungs = sitk.Image([20, 3, 1], sitk.sitkUInt8)
    lungs.CopyInformation(ct)
    for i in range(20):
        lungs[i, 1, 0] = 1
    structures = np.zeros(grid.shape, np.uint8)
    structures[0, 0, 8] = VESSEL_LABEL  # x = 10 mm
    labels_n, _, labels, confidence = _cluster_maps(dense, bundle, ct, lungs, grid, structures)
    assert labels_n.tolist() == [1, 2, 2, 2]
    row = sitk.GetArrayFromImage(labels)[0, 1]
    x = -1.5 + np.arange(20)
    expected = np.where(x < 4.2, 1, 2)  # x = 3.5 reads the grid at 3.75 mm: closer to cluster 1 after interpolation
    expected[x == 10.5] = VESSEL_LABEL
    np.testing.assert_array_equal(row, expected)
    conf = sitk.GetArrayFromImage(confidence)[0, 1]
    assert conf[x == -0.5][0] == pytest.approx(1.0)  # reads the grid at a patch centre, certainly cluster 1
    assert conf[x == 3.5][0] == pytest.approx(0.1, abs=1e-5)  # (0.55 - 0.45) / 1 at 3.75 mm
    assert conf[x == 10.5][0] == 1.0
    assert not sitk.GetArrayFromImage(labels)[0, [0, 2]].any()


def test_each_cluster_resampled_alone_gives_the_vector_images_values():
    """The voxel-level map resamples one cluster's dissimilarity at a time; ITK gives the same values as one
    resample of all clusters as a vector image (its slower path), so the map does not depend on the choice."""
    from latentharmonize.grid import ModelGrid
    from latentharmonize.pipeline import _resampled

    lattice = ModelGrid(origin=(-3.0, 2.0, 1.0), spacing=(5.0, 5.0, 2.5), shape=(4, 5, 6))
    grid = ModelGrid(origin=(-4.0, 0.75, 0.0), spacing=(1.25, 1.25, 2.5), shape=(6, 22, 27))
    field = np.random.default_rng(3).random(tuple(lattice.shape) + (3,)).astype(np.float32)
    resample = sitk.ResampleImageFilter()
    resample.SetReferenceImage(grid.reference_image())
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetUseNearestNeighborExtrapolator(True)
    vector = sitk.GetImageFromArray(field, isVector=True)
    vector.SetOrigin(lattice.origin)
    vector.SetSpacing(lattice.spacing)
    expected = sitk.GetArrayFromImage(resample.Execute(vector)).reshape(-1, 3)
    rows = np.arange(0, expected.shape[0], 7)
    alone = np.column_stack([_resampled(field[..., k], lattice, resample, rows) for k in range(3)])
    np.testing.assert_array_equal(alone, expected[rows])


def test_analyze_reads_each_patch_core_as_the_two_stage_clusters_need(scan, bundle):
    """The default bundle's clusters have a second stage: encode_patches computes the core statistics beside the
    encoder, and they are those of each encoded patch, averaged over the latents' context."""
    from latentharmonize.io import read_ct
    from latentharmonize.lungmask import segment_lungs
    from latentharmonize.patches import DenseLatents, aggregate_context, core_statistics, model_grid_hu
    from latentharmonize.pipeline import encode_patches
    from latentharmonize.structures import parenchyma, segment_structures
    from latentharmonize.two_stage import reads_core

    assert reads_core(bundle.clusters)
    ct = read_ct(scan)
    hu, lung, grid, _ = model_grid_hu(ct, segment_lungs(ct), bundle.spec)
    tissue = parenchyma(lung, segment_structures(hu, lung, grid.spacing, grid.scan_slices))
    dense = encode_patches(bundle.encoder("cpu"), hu, tissue, grid, bundle.spec, "cpu", core=True)
    values = DenseLatents(core_statistics(hu, tissue, dense.positions, bundle.spec), dense.positions, dense.lattice)
    expected = aggregate_context(values, bundle.spec.context_radius).latents
    np.testing.assert_array_equal(dense.core, expected)
    assert encode_patches(bundle.encoder("cpu"), hu, tissue, grid, bundle.spec, "cpu").core is None


def test_a_denser_normal_lung_is_not_named_ground_glass_where_it_does_not_stand_above_its_depth(bundle):
    """A normal lung 200 HU denser (a smaller breath; real normal lungs differ by about 140 HU) reads as raised
    against fixed bounds. The default bundle's ground-glass-like name also needs a patch to stand 50 HU above the
    lung at its depth, so that lung is higher-attenuation lung; without the depth test most of it was named
    ground-glass-like. Real counterpart: the dense backs of 14 of 61 normal slices of the CT Emphysema Database."""
    import copy

    from latentharmonize import analyze_image
    from latentharmonize.evaluation.tissue import truth_on
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient
    from latentharmonize.tissue import TISSUE_LABELS

    assert bundle.clusters.min_above_depth_hu == 50.0
    without = copy.deepcopy(bundle)
    without.clusters.set_params(min_above_depth_hu=None)
    patient = make_patient(0, seed=0, normal_shift_hu=200.0)
    ct = acquire(patient, DEFAULT_ACQUISITIONS[0])
    normal = sitk.GetArrayViewFromImage(truth_on(ct, patient.truth)) == TISSUE_LABELS["normal"]
    glass = {}
    for name, model in (("with", bundle), ("without", without)):
        result = analyze_image(ct, model, device="cpu")
        labels = sitk.GetArrayViewFromImage(result.labels)
        held = normal & (labels > 0)
        label = next(k for k, v in result.names.items() if v == "ground-glass-like")
        glass[name] = np.mean(labels[held] == label)
    assert glass["without"] > 0.5 and glass["with"] < 0.1, glass


@pytest.mark.parametrize("tissue, painted_as", [
    ("ground_glass", ("ground-glass-like", "higher-attenuation lung")),
    ("emphysema", ("lower-attenuation lung",)),
])
def test_a_lung_that_is_mostly_disease_is_painted_as_disease(bundle, tissue, painted_as):
    """Each scan's technical coordinate is re-centred on the scan's own median; that must not turn a lung that is
    80 % disease into normal lung (on a soft thin and a sharp thick scan). Real counterpart: a diffuse COVID-19 ground
    glass, 95 % raised (docs/real-scans.md)."""
    from latentharmonize import analyze_image
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

    patient = make_patient(0, seed=0, fractions={tissue: 0.8})
    assert patient.fractions[tissue] == pytest.approx(0.8, abs=0.02)
    for acquisition in (DEFAULT_ACQUISITIONS[0], DEFAULT_ACQUISITIONS[3]):
        result = analyze_image(acquire(patient, acquisition), bundle, device="cpu")
        labels = sitk.GetArrayViewFromImage(result.labels)
        shares = {name: np.mean(labels[labels > 0] == label) for label, name in result.names.items()}
        assert sum(shares[name] for name in painted_as) > 0.6, (acquisition.name, shares)
        assert shares["normal-appearing lung"] < 0.35, (acquisition.name, shares)
