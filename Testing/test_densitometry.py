"""Densitometry (LAA-950, HAA -700..-250, MLD, Perc15) per region and per mask segment, and several-segment masks
in ``analyze``."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import slicerio

from latentharmonize.composition import composition_table
from latentharmonize.densitometry import (COLUMNS, HU_STATISTIC_QUANTILES, PATCH_BLOCK, densitometry_table,
                                          density_indices, patch_hu_statistics)
from latentharmonize.errors import InputError
from latentharmonize.segments import read_segments


def _image(array, spacing=(0.8, 0.9, 2.0), origin=(-10.0, 5.0, 30.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_thresholds_are_exact_at_their_boundaries():
    # 10 voxels: -950 itself is not low attenuation; -700 and -250 are inside the high-attenuation band
    values = np.array([-1000, -960, -951, -950, -850, -701, -700, -400, -250, -249], np.int16)
    d = density_indices(values)
    assert d["laa950_pct"] == pytest.approx(30.0)
    assert d["haa700_250_pct"] == pytest.approx(30.0)
    assert d["mld_hu"] == pytest.approx(values.mean())
    assert d["perc15_hu"] == pytest.approx(np.percentile(values.astype(float), 15))


def _lobes(lungs: np.ndarray) -> np.ndarray:
    """Five 'lobes' from a right/left mask: the right lung cut in three along z, the left in two."""
    lobes = np.zeros_like(lungs)
    z = np.arange(lungs.shape[0])[:, None, None]
    for side, cuts, first in ((1, 3, 1), (2, 2, 4)):
        slices = np.flatnonzero((lungs == side).any(axis=(1, 2)))
        edges = np.linspace(slices.min(), slices.max() + 1, cuts + 1)
        for k in range(cuts):
            lobes[(lungs == side) & (z >= edges[k]) & (z < edges[k + 1])] = first + k
    return lobes


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_regions_and_segments_match_brute_force(tmp_path, dtype):
    """Integer CTs go through per-cell HU histograms, float CTs through the voxels: both give numpy's figures."""
    rng = np.random.default_rng(3)
    shape = (14, 10, 16)
    lungs = np.zeros(shape, np.uint8)
    lungs[1:-1, 2:-2, 1:8] = 1
    lungs[2:-2, 2:-2, 8:-1] = 2
    hu = rng.normal(-850, 90, size=shape).astype(dtype)
    lobes = _lobes(lungs)
    sitk.WriteImage(_image(lobes), str(tmp_path / "lobes.nrrd"))
    segments = read_segments(tmp_path / "lobes.nrrd", _image(hu))
    assert segments.names == {v: f"segment_{v}" for v in range(1, 6)}
    table = densitometry_table(_image(hu), _image(lungs), segments)
    assert list(table.columns) == COLUMNS
    z = 30.0 + 2.0 * np.arange(shape[0])
    zz = np.broadcast_to(z[:, None, None], shape)
    lung_z = zz[lungs > 0]
    t = (zz - lung_z.min()) / (lung_z.max() - lung_z.min())
    regions = {"whole": lungs > 0, "right": lungs == 1, "left": lungs == 2, "upper": (lungs > 0) & (t >= 2 / 3),
               "middle": (lungs > 0) & (t >= 1 / 3) & (t < 2 / 3), "lower": (lungs > 0) & (t < 1 / 3)}
    regions.update({f"segment_{v}": lobes == v for v in range(1, 6)})
    assert list(table.region) == list(regions)
    for row in table.itertuples():
        v = hu[regions[row.region]].astype(float)
        expected = [100 * np.mean(v < -950), 100 * np.mean((v >= -700) & (v <= -250)), v.mean(),
                    np.percentile(v, 15), v.size * 0.8 * 0.9 * 2.0 / 1000]
        np.testing.assert_allclose([row.laa950_pct, row.haa700_250_pct, row.mld_hu, row.perc15_hu, row.volume_ml],
                                   expected, rtol=1e-12)
        assert np.isnan(row.laa950_matched_pct) and np.isnan(row.perc15_matched_hu)  # no matched HU given
    # the noise-matched columns read the values given per lung voxel (rounded to whole HU), region by region
    matched = rng.normal(-880, 40, size=shape)
    with_matched = densitometry_table(_image(hu), _image(lungs), segments, matched=matched[lungs > 0])
    pd.testing.assert_frame_equal(with_matched.drop(columns=["laa950_matched_pct", "perc15_matched_hu"]),
                                  table.drop(columns=["laa950_matched_pct", "perc15_matched_hu"]))
    for row in with_matched.itertuples():
        v = np.rint(matched[regions[row.region]])
        np.testing.assert_allclose([row.laa950_matched_pct, row.perc15_matched_hu],
                                   [100 * np.mean(v < -950), np.percentile(v, 15)], rtol=1e-12)
    with pytest.raises(InputError, match="one per lung voxel"):
        densitometry_table(_image(hu), _image(lungs), matched=matched[lungs > 0][1:])
    # the lobes tile the lungs: their volumes add up to the whole lung's, and the composition agrees per lobe
    segment_rows = table[table.region.str.startswith("segment_")]
    assert segment_rows.volume_ml.sum() == pytest.approx(table.set_index("region").volume_ml["whole"])
    labels = np.where(lungs > 0, rng.integers(1, 3, size=shape), 0).astype(np.uint8)
    comp = composition_table(_image(labels), _image(hu), _image(lungs), {1: "a", 2: "b"}, segments)
    per_region = comp.groupby("region", sort=False).volume_ml.sum()
    for row in table.itertuples():
        assert per_region[row.region] == pytest.approx(row.volume_ml)
    for v in range(1, 6):
        for label in (1, 2):
            n = np.count_nonzero((lobes == v) & (labels == label))
            got = comp[(comp.region == f"segment_{v}") & (comp.label == label)].volume_ml.item()
            assert got == pytest.approx(n * 0.8 * 0.9 * 2.0 / 1000)
    # without segments the table is what it was: the six regions only
    plain = composition_table(_image(labels), _image(hu), _image(lungs), {1: "a", 2: "b"})
    pd.testing.assert_frame_equal(plain, comp[~comp.region.str.startswith("segment_")].reset_index(drop=True))


def test_plain_right_left_mask_and_binary_mask_have_no_segments(tmp_path):
    lungs = np.zeros((6, 6, 6), np.uint8)
    lungs[1:5, 1:5, 1:3], lungs[1:5, 1:5, 3:5] = 1, 2
    for name, array in (("sides.nrrd", lungs), ("binary.nrrd", (lungs > 0).astype(np.uint8))):
        sitk.WriteImage(_image(array), str(tmp_path / name))
        assert read_segments(tmp_path / name, _image(lungs)) is None


def test_seg_nrrd_names_become_regions_and_taken_names_are_made_unique(tmp_path):
    lungs = np.zeros((6, 6, 8), np.uint8)
    lungs[1:5, 1:5, 1:4], lungs[1:5, 1:5, 4:7] = 1, 2
    image = _image(lungs)
    from latentharmonize.writers import write_segmentation

    write_segmentation(image, tmp_path / "mask.seg.nrrd", {1: "right_lower_lobe", 2: "right"},
                       {1: (1, 0, 0), 2: (0, 1, 0)})
    segments = read_segments(tmp_path / "mask.seg.nrrd", image)
    assert segments.names == {1: "right_lower_lobe", 2: "right_2"}  # "right" is the built-in region


def _true_emphysema_and_laa(index: int) -> tuple:
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

    patient = make_patient(index, seed=0)
    ct = acquire(patient, DEFAULT_ACQUISITIONS[0])  # soft kernel, 1.25 mm: the phantom's own grid
    truth = sitk.Cast(patient.truth > 0, sitk.sitkUInt8)
    truth.CopyInformation(ct)
    whole = densitometry_table(ct, truth).set_index("region").loc["whole"]
    return patient.fractions["emphysema"], whole.laa950_pct, patient.phenotype


def test_laa950_follows_the_true_emphysema_fraction_of_the_phantom():
    """Five phantom patients (one per phenotype), soft kernel, the true lung as mask: LAA-950 ranks them as their
    true emphysema fractions do, and stays below the truth (part of the phantom's emphysema lies above -950 HU)."""
    from scipy.stats import spearmanr

    truth, laa, phenotypes = zip(*(_true_emphysema_and_laa(i) for i in range(5)))
    assert set(phenotypes) == {"healthy", "emphysema", "fibrosis", "inflammatory", "combined"}
    assert spearmanr(truth, laa).statistic > 0.9
    emphysema = phenotypes.index("emphysema")
    assert laa[emphysema] == max(laa) and 0.3 * 100 * truth[emphysema] < laa[emphysema] < 100 * truth[emphysema]


def test_matched_lung_hu_reads_only_lung_and_fills_the_edge_beside_it():
    """A uniform lung at -850 HU beside a chest wall at +40 HU: blurred, the lung's edge stays -850 (the wall does
    not bleed in), the voxel just outside reads the lung beside it, and a voxel with no lung near is NaN."""
    from latentharmonize.densitometry import matched_lung_hu

    hu = np.full((6, 20, 20), 40.0, np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[:, 4:16, 2:10] = True
    hu[lung] = -850.0
    out = matched_lung_hu(hu, lung, 1.5, (1.0, 1.0, 2.5), 1.0)
    np.testing.assert_allclose(out[lung], -850.0, atol=1e-3)
    np.testing.assert_allclose(out[:, 4:16, 10], -850.0, atol=1e-3)  # outside, beside the lung
    assert np.isnan(out[:, :, 19]).all()  # 9 px (6 SD) from the lung


def test_noise_matched_emphysema_indices_hardly_move_with_the_kernel():
    """The same phantom patients under a soft and a sharp kernel (1.25 mm, automatic mask): the sharp kernel's noise
    raises LAA-950 by several points and lowers Perc15 by tens of HU; read noise-matched, both stay put, and the
    emphysema patient still reads far more emphysema than the healthy one (measured: raw 1.6 / 13.7 % and -910 /
    -947 HU for the healthy patient, matched 0.5 / 0.4 % and -893 / -895 HU)."""
    from latentharmonize import analyze_image
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

    soft, sharp = DEFAULT_ACQUISITIONS[:2]
    assert (soft.kernel, sharp.kernel, soft.thickness_mm) == ("soft", "sharp", sharp.thickness_mm)
    whole = {}
    for index in (0, 1):
        patient = make_patient(index, seed=0)
        for acquisition in (soft, sharp):
            table = analyze_image(acquire(patient, acquisition), device="cpu").densitometry
            whole[patient.phenotype, acquisition.kernel] = table.set_index("region").loc["whole"]
    for phenotype in ("healthy", "emphysema"):
        a, b = whole[phenotype, "soft"], whole[phenotype, "sharp"]
        assert b.laa950_pct - a.laa950_pct > 5 and a.perc15_hu - b.perc15_hu > 20
        assert abs(b.laa950_matched_pct - a.laa950_matched_pct) < 1
        assert abs(b.perc15_matched_hu - a.perc15_matched_hu) < 5
    for kernel in ("soft", "sharp"):
        healthy, emphysema = whole["healthy", kernel], whole["emphysema", kernel]
        assert emphysema.laa950_matched_pct > healthy.laa950_matched_pct + 5
        assert emphysema.perc15_matched_hu < healthy.perc15_matched_hu - 30


def test_the_report_shows_the_noise_matched_columns_and_a_dash_where_an_analysis_lacks_them():
    from latentharmonize.report import densitometry_table_html

    row = {"region": "whole", "laa950_pct": 13.3, "haa700_250_pct": 6.4, "mld_hu": -848.0, "perc15_hu": -947.0,
           "laa950_matched_pct": 0.42, "perc15_matched_hu": -895.0, "volume_ml": 641.0}
    html = densitometry_table_html({"densitometry": [row, {k: v for k, v in row.items() if "matched" not in k}]})
    cells = [r.split("</td><td>") for r in html.split("<tbody>")[1].split("</tbody>")[0].split("</tr>") if r]
    assert cells[0] == ["<tr><td>whole", "13.3", "6.4", "-848", "-947", "0.4", "-895", "641.0</td>"]
    assert cells[1][5:7] == ["–", "–"]
    assert "noise-matched" in html


@pytest.fixture(scope="module")
def lobe_runs(tmp_path_factory):
    """analyze on the small phantom with its automatic mask, and with that mask cut into five lobes, given as a plain
    label map and as a named .seg.nrrd."""
    from latentharmonize import analyze
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient
    from latentharmonize.writers import write_segmentation

    folder = tmp_path_factory.mktemp("lobes")
    ct = acquire(make_patient(0, seed=0), DEFAULT_ACQUISITIONS[0])
    sitk.WriteImage(ct, str(folder / "chest.nrrd"))
    auto = analyze(folder / "chest.nrrd", folder / "auto", device="cpu", write_report=False)
    lungs = sitk.ReadImage(str(auto.files["lungs"]))
    lobes = sitk.GetImageFromArray(_lobes(sitk.GetArrayFromImage(lungs)))
    lobes.CopyInformation(lungs)
    sitk.WriteImage(lobes, str(folder / "lobes.nrrd"))
    names = {1: "right_upper_lobe", 2: "right_middle_lobe", 3: "right_lower_lobe", 4: "left_upper_lobe",
             5: "left_lower_lobe"}
    write_segmentation(lobes, folder / "lobes.seg.nrrd", names, {k: (0.5, 0.5, 0.5) for k in names})
    plain = analyze(folder / "chest.nrrd", folder / "plain", device="cpu", mask=folder / "lobes.nrrd",
                    write_report=False)
    named = analyze(folder / "chest.nrrd", folder / "named", device="cpu", mask=folder / "lobes.seg.nrrd",
                    write_report=False)
    return auto, plain, named, names


def test_analyze_gives_composition_and_densitometry_per_lobe(lobe_runs):
    auto, plain, named, names = lobe_runs
    for result, regions in ((plain, [f"segment_{v}" for v in range(1, 6)]), (named, list(names.values()))):
        doc = json.loads(result.files["composition_json"].read_text())
        assert set(doc["regions"]) == {"whole", "right", "left", "upper", "middle", "lower", *regions}
        whole = {e["label"]: e["volume_ml"] for e in doc["regions"]["whole"]}
        for label, volume in whole.items():  # each cluster's volume over the lobes adds up to the whole lung's
            lobes = sum(e["volume_ml"] for r in regions for e in doc["regions"][r] if e["label"] == label)
            assert lobes == pytest.approx(volume, abs=1e-5)
        csv = pd.read_csv(result.files["densitometry_csv"])
        assert list(csv.region) == ["whole", "right", "left", "upper", "middle", "lower", *regions]
        assert [row["region"] for row in doc["densitometry"]] == list(csv.region)
        assert csv[csv.region.isin(regions)].volume_ml.sum() == pytest.approx(csv.volume_ml[0], rel=1e-5)
        # the lobes split the same lung: the whole-lung figures are those of the automatic run, up to the few voxels
        # that io.read_mask's left/right split of a mask that is not 1/2 leaves out
        pd.testing.assert_frame_equal(csv.iloc[:1], pd.read_csv(auto.files["densitometry_csv"]).iloc[:1],
                                      check_exact=False, rtol=1e-3)


def test_a_plain_right_left_mask_keeps_its_output(lobe_runs, tmp_path):
    from latentharmonize import analyze

    auto = lobe_runs[0]
    given = analyze(auto.record["input"], tmp_path / "out", device="cpu", mask=auto.files["lungs"],
                    write_report=False)
    for kind in ("composition_csv", "densitometry_csv", "labels", "segmentation"):
        assert given.files[kind].read_bytes() == auto.files[kind].read_bytes(), kind
    doc = json.loads(given.files["composition_json"].read_text())
    assert set(doc["regions"]) == {"whole", "right", "left", "upper", "middle", "lower"}


def test_survival_baseline_uses_the_same_definitions():
    """The evaluation's HU-threshold baseline takes LAA-950, MLD and Perc15 from density_indices (its HAA is
    'above -700 HU', kept for the recorded results)."""
    from latentharmonize.densitometry import lung_hu_indices

    rng = np.random.default_rng(5)
    hu = rng.normal(-850, 120, size=(9, 11, 13)).round().astype(np.int16)
    lung = rng.random(hu.shape) < 0.7
    baseline = lung_hu_indices(hu, lung)
    values = hu[lung]
    ours = densitometry_table(_image(hu), _image(lung.astype(np.uint8))).set_index("region").loc["whole"]
    assert baseline["laa950"] == pytest.approx(ours.laa950_pct, rel=1e-12)
    assert baseline["mld"] == pytest.approx(ours.mld_hu, rel=1e-12)
    assert baseline["perc15"] == ours.perc15_hu == np.percentile(values.astype(float), 15)
    assert baseline["haa700"] == pytest.approx(100 * np.mean(values > -700))


def _reference_patch_hu_statistics(values: np.ndarray) -> np.ndarray:
    """The plain definition: sort each whole row (NaN last), take the nearest ranks, count the thresholds."""
    values = values.reshape(len(values), -1)
    n_lung = np.count_nonzero(~np.isnan(values), axis=1)
    ranks = np.rint(np.outer(n_lung - 1, np.asarray(HU_STATISTIC_QUANTILES) / 100.0)).astype(np.int64)
    quantiles = np.take_along_axis(np.sort(values, axis=1), ranks, axis=1)
    shares = [np.count_nonzero(test, axis=1) / n_lung for test in (values < -950, values > -700, values > -300)]
    return np.column_stack([quantiles, *shares]).astype(np.float32)


@pytest.mark.parametrize("shape", [(7, 1), (5, 3, 4, 4), (40, 512), (40, 513), (30, 3, 16, 16), (20, 1100),
                                   (2 * PATCH_BLOCK + 5, 2, 8, 8)])
def test_patch_hu_statistics_equals_one_sort_per_row(shape):
    """Bit for bit the statistics of one sort of each whole row, for rows of one to every voxel in the lung,
    float HU and integer HU with many ties, lung at the start, the end or scattered."""
    rng = np.random.default_rng(sum(shape))
    for values in (rng.normal(-800, 250, shape), np.round(rng.normal(-800, 250, shape)), rng.integers(-960, -940, shape)):
        values = values.astype(np.float32).reshape(shape[0], -1)
        width = values.shape[1]
        n_lung = rng.integers(1, width + 1, len(values))
        n_lung[: min(3, len(values))] = [1, width, max(1, width // 2)][: min(3, len(values))]
        layout = rng.integers(0, 3, len(values))  # lung first, last, or scattered
        lung = np.arange(width) < n_lung[:, None]
        lung[layout == 1] = lung[layout == 1, ::-1]
        for row in np.flatnonzero(layout == 2):
            lung[row] = rng.permutation(lung[row])
        patches = np.where(lung, values, np.nan).astype(np.float32).reshape(shape)
        expected = _reference_patch_hu_statistics(patches)
        result = patch_hu_statistics(patches)
        assert result.dtype == np.float32 and result.tobytes() == expected.tobytes()


def test_patch_hu_statistics_refuses_a_patch_without_lung():
    values = np.full((3, 3, 4, 4), -800.0, np.float32)
    values[1] = np.nan
    with pytest.raises(InputError):
        patch_hu_statistics(values)
