"""Chest CT phantom: cohort files and table, determinism, acquisition factors, tissue HU and texture, survival."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from lifelines.utils import concordance_index
from scipy import ndimage

from latentharmonize import phantom as ph
from latentharmonize.cli import main
from latentharmonize.cohort import read_cohort
from latentharmonize.errors import InputError, OutputError
from latentharmonize.phantom import LIVER_HU, TISSUE_MEDIAN_HU, VENDORS
from latentharmonize.tissue import TISSUE_LABELS, TISSUES

SEED = 1  # patients 0, 1, 2 are the emphysema, fibrosis and inflammatory phenotypes: all six tissues


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    table = ph.generate_cohort(out, 3, SEED)
    return out, table


@pytest.fixture(scope="module")
def patient():
    return ph.make_patient(1, SEED)


def _array(image):
    return sitk.GetArrayFromImage(image).astype(np.float64)


def _liver_core(patient):
    """Voxels of the uniform liver, eroded so that kernel blur from neighbouring organs does not reach them."""
    hu = sitk.GetArrayFromImage(patient.hu)
    return ndimage.binary_erosion(hu == LIVER_HU, iterations=5)


def test_cohort_files_and_table(cohort):
    out, table = cohort
    written = pd.read_csv(out / "cohort.csv")
    expected = ["image", "patient", "acquisition", "truth", "time", "event", "kernel", "vendor", "dose", "thickness"]
    expected += [f"frac_{t}" for t in TISSUES] + ["age", "sex", "fvc"]
    assert set(expected) <= set(written.columns)
    assert len(written) == 3 * len(ph.DEFAULT_ACQUISITIONS) == len(table)
    assert sorted(written.patient.unique()) == ["P000", "P001", "P002"]
    for row in written.itertuples():
        assert not row.image.startswith("/") and (out / row.image).is_file()
        assert (out / row.truth).is_file()
        assert row.image == f"{row.patient}/{row.acquisition}.nrrd"
    image = sitk.ReadImage(str(out / written.image[0]))
    assert image.GetPixelID() == sitk.sitkInt16
    assert sitk.ReadImage(str(out / written.truth[0])).GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(written[[f"frac_{t}" for t in TISSUES]].sum(axis=1), 1.0, atol=1e-5)
    assert ph.is_phantom_cohort(out)
    resolved = read_cohort(out / "cohort.csv")         # the cohort table contract used by train/evaluate/batch
    assert all(Path(p).is_file() for p in resolved.image)


def test_patient_is_deterministic_and_independent_of_cohort_size(cohort, patient):
    out, _ = cohort
    assert np.array_equal(_array(patient.truth), _array(sitk.ReadImage(str(out / "P001" / "truth.nrrd"))))
    sharp = ph.acquire(patient, ph.DEFAULT_ACQUISITIONS[1])
    assert np.array_equal(_array(sharp), _array(sitk.ReadImage(str(out / "P001" / "a_sharp_thin.nrrd"))))
    other = sitk.ReadImage(str(out / "P000" / "truth.nrrd"))
    assert not np.array_equal(_array(patient.truth), _array(other))


def test_acquisitions_share_the_patient_frame(cohort):
    out, table = cohort
    truth = sitk.ReadImage(str(out / "P002" / "truth.nrrd"))
    z_extent = truth.GetOrigin()[2] - truth.GetSpacing()[2] / 2, truth.GetSpacing()[2] * truth.GetSize()[2]
    for acq in ph.DEFAULT_ACQUISITIONS:
        image = sitk.ReadImage(str(out / "P002" / f"{acq.name}.nrrd"))
        assert image.GetSpacing()[:2] == truth.GetSpacing()[:2] and image.GetOrigin()[:2] == truth.GetOrigin()[:2]
        assert image.GetSpacing()[2] == pytest.approx(acq.thickness_mm)
        assert image.GetOrigin()[2] - acq.thickness_mm / 2 == pytest.approx(z_extent[0])
        assert image.GetSize()[2] * acq.thickness_mm == pytest.approx(z_extent[1])
        assert image.GetDirection() == truth.GetDirection()


def test_soft_and_sharp_share_anatomy_and_noise(patient):
    soft, sharp = (_array(im) for im in ph.acquire_all(patient, ph.DEFAULT_ACQUISITIONS[:2]))
    core = _liver_core(patient)
    n_soft, n_sharp = soft[core] - LIVER_HU, sharp[core] - LIVER_HU
    assert abs(n_soft.mean()) < 3 and abs(n_sharp.mean()) < 6          # same anatomy, zero-mean noise
    assert n_sharp.std() > 2 * n_soft.std()                             # sharp kernels are noisier
    assert np.corrcoef(n_soft, n_sharp)[0, 1] > 0.3                     # one raw scan: correlated noise
    other_patient = ph.make_patient(0, SEED)
    other = _array(ph.acquire(other_patient, ph.DEFAULT_ACQUISITIONS[0]))
    both = core & _liver_core(other_patient)
    assert abs(np.corrcoef(soft[both], other[both])[0, 1]) < 0.1       # another patient: independent noise
    # noise power spectrum shape: soft noise is smoother (low frequency), sharp noise anti-correlated (ramp, high f)
    pairs = core & np.roll(core, 1, 2)
    lag1 = [np.corrcoef(v[pairs], np.roll(v, 1, 2)[pairs])[0, 1] for v in (soft, sharp)]
    assert lag1[0] > 0.05 and lag1[1] < -0.1
    lungs = sitk.GetArrayFromImage(patient.truth) > 0
    assert 100 * (sharp[lungs] < -950).mean() > 100 * (soft[lungs] < -950).mean() + 2   # kernel inflates the EI


def test_the_model_grid_lowpass_brings_soft_and_sharp_kernels_together(patient):
    from latentharmonize.grid import lowpass_in_plane

    soft, sharp = ph.acquire_all(patient, ph.DEFAULT_ACQUISITIONS[:2])
    lungs = ndimage.binary_erosion(sitk.GetArrayFromImage(patient.truth) > 0, iterations=3)

    def kernel_gap(sigma_mm):
        a, b = (lowpass_in_plane(_array(im).astype(np.float32), sigma_mm, soft.GetSpacing()) for im in (soft, sharp))
        laa = [100 * (v[lungs] < -950).mean() for v in (a, b)]
        return np.sqrt(np.mean((a - b)[lungs] ** 2)), laa[1] - laa[0]

    (rms_raw, laa_raw), (rms, laa) = kernel_gap(0.0), kernel_gap(1.0)
    assert rms < 0.4 * rms_raw                         # the same raw scan reads alike once both are blurred
    assert laa_raw > 4 and abs(laa) < 0.25 * laa_raw   # and the sharp kernel's emphysema index inflation is gone


def test_the_noise_matched_lowpass_blurs_sharp_and_low_dose_scans_more(patient):
    from latentharmonize.grid import lowpass_in_plane, noise_matched_sigma, soft_tissue_noise

    images = ph.acquire_all(patient, ph.DEFAULT_ACQUISITIONS)
    soft, sharp, low_dose, thick = (_array(im).astype(np.float32) for im in images)
    spacing = images[0].GetSpacing()
    lungs = ndimage.binary_erosion(sitk.GetArrayFromImage(patient.truth) > 0, iterations=3)
    target = soft_tissue_noise(soft, spacing, 1.0)
    sigma = {name: noise_matched_sigma(v, im.GetSpacing(), target, 1.0)
             for name, v, im in zip(("soft", "sharp", "low_dose", "thick"), (soft, sharp, low_dose, thick), images)}
    assert sigma["soft"] == 1.0 and sigma["sharp"] > sigma["low_dose"] > 1.0 and sigma["thick"] > 1.0

    def gap(sigma_sharp):  # lung RMS difference between the soft scan at 1 mm and the sharp one
        a, b = lowpass_in_plane(soft, 1.0, spacing), lowpass_in_plane(sharp, sigma_sharp, spacing)
        return np.sqrt(np.mean((a - b)[lungs] ** 2))

    assert gap(sigma["sharp"]) < 0.85 * gap(1.0)


def test_vendor_calibration_and_dose(patient):
    base = ph.Acquisition("base", "standard", "A", 100.0, 1.25)
    vendor_b = ph.Acquisition("vendor_b", "standard", "B", 100.0, 1.25)
    low_dose = ph.Acquisition("low", "standard", "A", 25.0, 1.25)
    a, b, low = (_array(im) for im in ph.acquire_all(patient, [base, vendor_b, low_dose]))
    core = _liver_core(patient)
    scale, offset = VENDORS["B"]
    assert (b[core] - a[core]).mean() == pytest.approx((scale - 1) * LIVER_HU + offset, abs=1.0)
    assert (low[core] - LIVER_HU).std() / (a[core] - LIVER_HU).std() == pytest.approx(2.0, rel=0.05)


def test_thickness_averages_thin_slices(patient):
    thin, thick = ph.acquire_all(patient, [ph.Acquisition("thin", "sharp", "C", 100.0, 1.25),
                                           ph.Acquisition("thick", "sharp", "C", 100.0, 5.0)])
    thin, thick = _array(thin), _array(thick)
    assert thick.shape[0] * 4 == thin.shape[0]
    groups = thin.reshape(-1, 4, *thin.shape[1:])
    unclipped = groups.min(axis=1) > -1000        # air outside the body is clipped at -1024 in both
    np.testing.assert_allclose(thick[unclipped], groups.mean(axis=1)[unclipped], atol=1.0)
    assert unclipped.mean() > 0.3
    with pytest.raises(InputError, match="thinner"):
        ph.acquire(patient, ph.Acquisition("too_thin", "soft", "A", 100.0, 0.5))


def test_thicker_slices_average_a_scan_in_place():
    from latentharmonize.phantom.acquisition import thicker_slices
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 100, size=(9, 4, 5)).astype(np.int16)
    thin = sitk.GetImageFromArray(hu)
    thin.SetSpacing((0.7, 0.7, 1.25))
    thin.SetOrigin((10.0, -20.0, 30.0))
    thin.SetDirection((1, 0, 0, 0, 0, -1, 0, 1, 0))            # coronal-like: the slice axis is not z
    thick = thicker_slices(thin, 2.5)
    a = sitk.GetArrayFromImage(thick)
    assert a.dtype == np.int16 and a.shape == (4, 4, 5)        # 9 slices of 1.25 mm fill four of 2.5 mm
    np.testing.assert_array_equal(a, np.rint(hu[:8].reshape(4, 2, 4, 5).astype(np.float32).mean(axis=1)))
    assert thick.GetSpacing() == pytest.approx((0.7, 0.7, 2.5))
    assert thick.GetDirection() == thin.GetDirection()
    # each thick slice lies where the middle of its two thin slices lay
    middle = (np.array(thin.TransformIndexToPhysicalPoint((0, 0, 0))) +
              np.array(thin.TransformIndexToPhysicalPoint((0, 0, 1)))) / 2
    np.testing.assert_allclose(thick.TransformIndexToPhysicalPoint((0, 0, 0)), middle)
    with pytest.raises(InputError, match="at least the scan's 1.25 mm"):
        thicker_slices(thin, 1.0)
    with pytest.raises(InputError, match="do not fill one 20 mm"):
        thicker_slices(thin, 20.0)


def test_every_tissue_present_with_documented_hu_and_distinct_texture(cohort):
    out, table = cohort
    values = {t: [] for t in TISSUES}
    gradient = {t: [] for t in TISSUES}
    for pid in ("P000", "P001", "P002"):
        truth = _array(sitk.ReadImage(str(out / pid / "truth.nrrd")))
        soft = _array(sitk.ReadImage(str(out / pid / "a_soft_thin.nrrd")))
        grad = np.sqrt(sum(g ** 2 for g in np.gradient(soft, axis=(1, 2))))
        for t in TISSUES:
            region = ndimage.binary_erosion(truth == TISSUE_LABELS[t], iterations=1)
            values[t].append(soft[region])
            gradient[t].append(grad[region])
    for t in TISSUES:
        v = np.concatenate(values[t])
        assert v.size > 200, f"{t} missing from the truth"
        lo, hi = TISSUE_MEDIAN_HU[t]
        assert lo <= np.median(v) <= hi, f"{t}: median {np.median(v):.0f} HU outside [{lo}, {hi}]"
    g = {t: np.median(np.concatenate(gradient[t])) for t in TISSUES}
    # reticulation and honeycombing have about the mean HU of ground-glass but far more structure
    assert g["reticulation"] > 1.5 * g["ground_glass"] and g["honeycombing"] > 1.5 * g["ground_glass"]
    assert g["consolidation"] < g["reticulation"]


def test_survival_columns_are_sane(cohort):
    _, table = cohort
    per_patient = table.groupby("patient")[["time", "event", "age", "sex", "fvc"] + [f"frac_{t}" for t in TISSUES]]
    assert (per_patient.nunique() == 1).all().all()      # patient-level columns agree across acquisitions
    assert (table.time > 0).all() and set(table.event) <= {0, 1}
    assert table.age.between(40, 88).all() and set(table.sex) <= {"M", "F"} and table.fvc.between(25, 130).all()


def test_true_composition_predicts_survival():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        fractions = dict.fromkeys(TISSUES, 0.0)
        fractions.update(ph.draw_fractions(ph.phenotype_of(i, 0), rng))
        age = float(rng.normal(66, 8))
        rows.append((ph.log_hazard(fractions, age),) + ph.draw_outcome(fractions, age, rng))
    risk, time, event = map(np.asarray, zip(*rows))
    assert 0.15 < 1 - event.mean() < 0.45                                  # about 30 % censored
    assert concordance_index(time, -risk, event) > 0.68
    assert abs(concordance_index(time, rng.normal(size=len(time)), event) - 0.5) < 0.08


def test_refuses_foreign_folder_and_existing_cohort(tmp_path, cohort):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a phantom cohort"):
        ph.generate_cohort(foreign, 1, 0)
    with pytest.raises(OutputError, match="overwrite"):
        ph.generate_cohort(cohort[0], 1, SEED)
    assert main(["phantom", str(foreign), "--patients", "1", "--seed", str(SEED), "--acquisitions", "a_soft_thin",
                 "--overwrite", "--quiet"]) == 0
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not (foreign / "P000" / "a_sharp_thin.nrrd").exists()
    # same seed, same bytes, whether the cohort has 1 or 3 patients
    for name in ("a_soft_thin.nrrd", "truth.nrrd"):
        assert (foreign / "P000" / name).read_bytes() == (cohort[0] / "P000" / name).read_bytes()


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="a/b", kernel="soft", vendor="A", dose_mAs=100, thickness_mm=1.25), "letters"),
    (dict(name="x", kernel="blurry", vendor="A", dose_mAs=100, thickness_mm=1.25), "kernel"),
    (dict(name="x", kernel="soft", vendor="Z", dose_mAs=100, thickness_mm=1.25), "vendor"),
    (dict(name="x", kernel="soft", vendor="A", dose_mAs=0, thickness_mm=1.25), "dose_mAs"),
])
def test_bad_acquisitions_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        ph.Acquisition(**kwargs)


def test_bad_cohort_arguments_are_refused(tmp_path):
    with pytest.raises(InputError, match="positive"):
        ph.generate_cohort(tmp_path / "a", 0, 0)
    with pytest.raises(InputError, match="Unknown acquisition"):
        ph.generate_cohort(tmp_path / "b", 1, 0, acquisitions=["nope"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_multi_site_cohort_scans_each_patient_once(tmp_path, cohort):
    out, full = cohort
    table = ph.generate_cohort(tmp_path / "sites", 3, SEED, acquisitions_per_patient=1)
    assert len(table) == 3 and table.patient.is_unique
    assert set(table.acquisition) <= {a.name for a in ph.DEFAULT_ACQUISITIONS}
    same = full.merge(table, on=["patient", "acquisition"], suffixes=("", "_site"))
    assert len(same) == 3  # the same patients, outcomes and images as in the full cohort with this seed
    assert (same.time == same.time_site).all()
    for row in table.itertuples():
        assert np.array_equal(_array(sitk.ReadImage(str(tmp_path / "sites" / row.image))),
                              _array(sitk.ReadImage(str(out / row.image))))
    draws = ph.scanned_acquisitions(list(ph.DEFAULT_ACQUISITIONS), 200, 2, seed=5)
    assert all(len(d) == 2 and d[0] != d[1] for d in draws)
    assert len({a.name for d in draws for a in d}) == len(ph.DEFAULT_ACQUISITIONS)  # every site is drawn
    assert draws == ph.scanned_acquisitions(list(ph.DEFAULT_ACQUISITIONS), 200, 2, seed=5)
    with pytest.raises(InputError, match="acquisitions-per-patient"):
        ph.generate_cohort(tmp_path / "bad", 1, 0, acquisitions_per_patient=0)


@pytest.mark.slow
def test_true_composition_of_rendered_patients_predicts_survival():
    patients = [ph.make_patient(i, 0) for i in range(60)]
    risk = [ph.log_hazard(p.fractions, p.age) for p in patients]
    c = concordance_index([p.time for p in patients], -np.asarray(risk), [p.event for p in patients])
    assert c > 0.65


def test_sample_scan_is_one_deterministic_full_size_chest_with_mixed_disease(tmp_path, capsys):
    from latentharmonize.cli import main as cli_main
    from latentharmonize.phantom import SAMPLE_PATIENT, SAMPLE_SEED, make_patient

    first, second = tmp_path / "a" / "sample.nrrd", tmp_path / "b" / "sample.nrrd"
    assert cli_main(["phantom", "--sample", str(first)]) == 0
    assert capsys.readouterr().out.strip() == str(first)
    assert [p.name for p in first.parent.iterdir()] == ["sample.nrrd"]  # nothing else, no staging folder left
    assert cli_main(["phantom", "--sample", str(second), "--quiet"]) == 0
    assert first.read_bytes() == second.read_bytes()
    image = sitk.ReadImage(str(first))
    assert image.GetSize()[:2] == (512, 512) and image.GetPixelID() == sitk.sitkInt16
    patient = make_patient(SAMPLE_PATIENT, SAMPLE_SEED)  # the small version of the same patient: same phenotype
    assert patient.phenotype == "combined"
    assert cli_main(["phantom", "--sample", str(first), "--quiet"]) == 2  # refused: it exists
    assert cli_main(["phantom", str(tmp_path / "cohort"), "--sample", str(first)]) == 2
    assert "one of the two" in capsys.readouterr().err


# --- scan variants for the lung mask -----------------------------------------------------------------------------

def test_scan_variants(patient):
    """gas: pure air below the diaphragm, kept apart from the lungs by a soft-tissue layer; cropped: a narrower
    field of view cutting both lungs; abdomen: the lung bases over the abdomen. The lungs of gas are the chest's."""
    from latentharmonize.phantom import AIR_HU, DIAPHRAGM_MM

    chest_truth = _array(patient.truth)
    assert patient.variant == "chest" and patient.gas is None
    for variant in ("gas", "cropped", "abdomen"):
        other = ph.make_patient(1, SEED, variant=variant)
        truth, gas, hu = _array(other.truth) > 0, _array(other.gas) > 0, _array(other.hu)
        spacing = other.hu.GetSpacing()
        assert gas.sum() * np.prod(spacing) / 1000.0 > 40 and np.all(hu[gas] == AIR_HU) and not np.any(truth & gas)
        gap = ndimage.distance_transform_edt(~truth, sampling=spacing[::-1])[gas].min()
        assert gap >= DIAPHRAGM_MM - max(spacing), f"{variant}: gas {gap:.1f} mm from the lung"
        assert np.flatnonzero(gas.any(axis=(1, 2)))[0] < np.flatnonzero(truth.any(axis=(1, 2)))[-1]
        if variant == "gas":
            np.testing.assert_array_equal(_array(other.truth), chest_truth)
        elif variant == "cropped":
            assert other.hu.GetSize()[0] < patient.hu.GetSize()[0]
            assert other.hu.GetOrigin()[1:] == patient.hu.GetOrigin()[1:]
            assert truth[:, :, 0].any() and truth[:, :, -1].any(), "both lungs reach the edges of the field of view"
        else:
            lung_slices = np.flatnonzero(truth.any(axis=(1, 2)))
            assert lung_slices[-1] == truth.shape[0] - 1 and lung_slices[0] > truth.shape[0] / 3, "bases in the top"
    with pytest.raises(InputError, match="Unknown phantom variant"):
        ph.make_patient(0, SEED, variant="pelvis")


def test_given_fractions_replace_the_phenotype_and_keep_the_anatomy(patient):
    """A diffuse ground glass made to order: the truth holds the share asked for, no other disease, and outside the
    lung the scan is the drawn patient's."""
    diffuse = ph.make_patient(1, SEED, fractions={"ground_glass": 0.8})
    assert diffuse.phenotype == "custom" and patient.phenotype == "fibrosis"
    assert diffuse.fractions["ground_glass"] == pytest.approx(0.8, abs=0.02)
    assert all(diffuse.fractions[t] == 0.0 for t in TISSUES if t not in ("normal", "ground_glass"))
    lung = (_array(patient.truth) > 0) | (_array(diffuse.truth) > 0)
    np.testing.assert_allclose(_array(diffuse.hu)[~lung], _array(patient.hu)[~lung], atol=1e-3)  # float32 rounding
    # the ground glass is painted at its own level: the lung's median rises from normal lung's towards it
    assert np.median(_array(diffuse.hu)[lung]) > np.median(_array(patient.hu)[lung]) + 100


@pytest.mark.parametrize("fractions", [{"normal": 0.5}, {"fog": 0.1}, {}, {"emphysema": -0.1},
                                       {"emphysema": 0.6, "ground_glass": 0.6}, {"emphysema": True}, [0.5]])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(InputError, match="fractions must"):
        ph.make_patient(0, SEED, fractions=fractions)


def test_a_denser_normal_lung_moves_only_the_normal_parenchyma(patient):
    """normal_shift_hu makes the normal parenchyma that much denser, as a smaller breath does, and leaves the truth,
    the diseased lung and everything outside the lung as they were."""
    denser = ph.make_patient(1, SEED, normal_shift_hu=100.0)
    truth = _array(patient.truth)
    np.testing.assert_array_equal(_array(denser.truth), truth)
    change = _array(denser.hu) - _array(patient.hu)
    normal = truth == TISSUE_LABELS["normal"]
    assert np.median(change[normal]) == pytest.approx(100.0, abs=0.5)  # vessels' partial volume takes a little
    assert np.abs(change[(truth > 0) & ~normal]).max() < 1e-3
    lung = ndimage.binary_dilation(truth > 0, iterations=2)  # the lung's partial-volume rim moves a little too
    assert np.abs(change[~lung]).max() < 1e-3
    assert denser.fractions == patient.fractions


@pytest.mark.parametrize("shift", [-10.0, 301.0, float("nan"), True, "100"])
def test_a_normal_shift_out_of_range_is_refused(shift):
    with pytest.raises(InputError, match="normal_shift_hu must be"):
        ph.make_patient(0, SEED, normal_shift_hu=shift)


def test_kernel_between_named_kernels_and_reconstruction_by_parameters(patient):
    from latentharmonize.phantom import KERNELS, kernel_at, kernel_label

    assert [kernel_at(v) for v in (0.0, 0.5, 1.0)] == [KERNELS["soft"], KERNELS["standard"], KERNELS["sharp"]]
    mid = kernel_at(0.75)
    assert KERNELS["standard"].noise_sd < mid.noise_sd < KERNELS["sharp"].noise_sd
    assert [kernel_label(v) for v in (0.1, 0.5, 0.7)] == ["soft", "standard", "sharp"]
    with pytest.raises(InputError, match="sharpness"):
        kernel_at(1.2)
    named = ph.Acquisition("b", "standard", "B", 30.0, 2.5)
    drawn = ph.Acquisition("b", "standard", "drawn", 30.0, 2.5, sharpness=0.5, calibration=VENDORS["B"])
    a, b = ph.acquire_all(patient, [named, drawn])
    assert np.array_equal(_array(a), _array(b))


def test_drawn_settings_pair_a_kernel_and_keep_held_out_ranges_apart(tmp_path):
    from latentharmonize.phantom import SETTING_RANGES

    def inside(value, intervals):
        return any(lo <= value <= hi for lo, hi in intervals)

    tables = {r: ph.generate_cohort(tmp_path / r, 3, 4, drawn_settings=r) for r in ("train", "heldout")}
    for name, table in tables.items():
        ranges = SETTING_RANGES[name]
        assert len(table) == 12 and table.groupby("patient").acquisition.nunique().eq(4).all()
        for row in table.itertuples():
            assert inside(row.kernel_sharpness, ranges.sharpness) and inside(row.dose, ranges.dose_mAs)
            assert inside(row.thickness, ranges.thickness_mm) and inside(row.hu_offset, ranges.hu_offset)
            assert inside(row.hu_scale, ranges.hu_scale) and -1000.0 * row.hu_scale + row.hu_offset >= ph.MIN_AIR_HU
        for row in table.itertuples():  # the name carries the setting's bins
            assert row.acquisition.startswith(f"{row.kernel}_{'lowdose' if row.dose < 60 else 'dose'}_")
        pairs = table.groupby("patient").head(2).groupby("patient")
        assert (pairs[["dose", "thickness", "hu_scale", "hu_offset"]].nunique() == 1).all().all()
        assert all(sorted(g.kernel) == ["sharp", "soft"] for _, g in pairs)
    held = tables["heldout"]
    train_ranges = SETTING_RANGES["train"]
    assert not any(inside(v, train_ranges.thickness_mm) and v < 3.0 for v in held.thickness)
    assert not any(0.15 < v < 0.85 for v in held.kernel_sharpness)
    # same seed, same draws; the sharp reconstruction of the pair has the noisier lung
    again = ph.generate_cohort(tmp_path / "again", 3, 4, drawn_settings="heldout")
    assert again.equals(held)
    soft, sharp = (_array(sitk.ReadImage(str(tmp_path / "heldout" / image))) for image in held.image[:2])
    body = (np.abs(soft) < 150)[:, :, 1:] & (np.abs(soft) < 150)[:, :, :-1]  # soft tissue: noise, hardly edges
    assert np.std(np.diff(sharp, axis=2)[body]) > 1.5 * np.std(np.diff(soft, axis=2)[body])
    with pytest.raises(InputError, match="drawn-settings"):
        ph.generate_cohort(tmp_path / "bad", 1, 4, drawn_settings="elsewhere")
    with pytest.raises(InputError, match="positive integer"):
        ph.generate_cohort(tmp_path / "bad", 1, 4, drawn_settings="train", acquisitions_per_patient=0)
    single = ph.generate_cohort(tmp_path / "single", 2, 4, drawn_settings="train", acquisitions_per_patient=1)
    assert len(single) == 2 and single.kernel_sharpness.nunique() == 2
