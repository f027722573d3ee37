"""Internal-reference HU calibration: recovers the phantom's vendor maps, also where the field of view is cropped;
without usable references training refuses the scan and analyze warns and goes on uncalibrated."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from latentharmonize.calibration import (FAT_RANGE_HU, REFERENCE_SLICE_MM, SLICE_STEP, SOFT_TISSUE_HU, UNAVAILABLE,
                                         CalibrationError, CalibrationUnavailable, HUCalibration, _axial_up,
                                         _in_plane_dilation, air_level, estimate_calibration,
                                         fat_level, reference_levels, reference_regions, scan_calibration)
from latentharmonize.errors import InputError
from latentharmonize.lungmask import AIR_HU, PAD_HU, outside_air, segment_lungs
from latentharmonize.patches import PatchSpec
from latentharmonize.phantom import DEFAULT_ACQUISITIONS, VENDORS, acquire_all, make_patient


@pytest.fixture(scope="module")
def scans():
    patient = make_patient(0, seed=5)
    return {a.vendor: (ct, segment_lungs(ct)) for a, ct in zip(DEFAULT_ACQUISITIONS, acquire_all(patient, DEFAULT_ACQUISITIONS))}


@pytest.mark.parametrize("vendor", ["A", "B", "C"])
def test_recovers_each_vendor_map_over_the_lung_range(scans, vendor):
    calibration = estimate_calibration(*scans[vendor])
    scale, offset = VENDORS[vendor]
    for hu in (-1000.0, -950.0, -905.0, -600.0):  # what the scanner shows for this true HU, mapped back
        assert calibration.apply(np.array([scale * hu + offset]))[0] == pytest.approx(hu, abs=3.0)


def test_censored_air_level_is_extrapolated_past_the_floor():
    rng = np.random.default_rng(0)
    air = np.maximum(rng.normal(-1032.0, 25.0, 200_000), -1024.0)  # vendor C air, clipped by the scanner
    assert np.median(air) == -1024.0
    assert air_level(air) == pytest.approx(-1032.0, abs=1.5)
    assert air_level(rng.normal(-990.0, 25.0, 10_000)) == pytest.approx(-990.0, abs=1.5)
    with pytest.raises(InputError, match="floor"):
        air_level(np.full(1000, -1024.0))


def test_fat_level_is_the_peak_not_the_mean():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(-110.0, 10.0, 5000), rng.uniform(-200.0, -20.0, 5000)])
    assert fat_level(values) == pytest.approx(-110.0, abs=3.0)


def test_calibration_round_trip_and_record():
    calibration = HUCalibration(air_hu=-967.0, fat_hu=-80.5)
    assert calibration.scale == pytest.approx(0.985) and calibration.offset == pytest.approx(18.0)
    np.testing.assert_allclose(calibration.apply(np.array([-967.0, -80.5])), [-1000.0, -100.0], atol=1e-3)
    assert calibration.as_dict() == {"air_hu": -967.0, "fat_hu": -80.5, "scale": 0.985, "offset": 18.0,
                                     "air_reference": "outside_air", "applied": True}


def test_spec_without_calibration_leaves_hu_untouched(scans):
    hu = np.array([-900.0, 0.0], dtype=np.float32)
    assert scan_calibration(*scans["B"], PatchSpec()) is None
    found = scan_calibration(*scans["B"], PatchSpec.from_dict({"calibration": "air_fat"}))
    assert found is not None and found.apply(hu)[0] == pytest.approx((-900.0 - found.offset) / found.scale)
    with pytest.raises(InputError, match="calibration must be"):
        PatchSpec.from_dict({"calibration": "tracheal"})


def test_scans_without_references_are_refused(scans):
    ct, lungs = scans["A"]
    arr = sitk.GetArrayFromImage(ct)
    for fill, missing in ((-850, "too little fat inside the body"), (40, "too little air around the body")):
        cropped = sitk.GetImageFromArray(np.full_like(arr, fill))  # a field of view inside the lung, or the heart
        cropped.CopyInformation(ct)
        with pytest.raises(CalibrationError, match=missing):
            estimate_calibration(cropped, lungs)
    shifted = sitk.GetImageFromArray((0.7 * arr).astype(np.int16))  # not HU as scanners store it
    shifted.CopyInformation(ct)
    with pytest.raises(InputError, match="air around the body reads -700 HU, not air"):
        estimate_calibration(shifted, lungs)


# --- fields of view cropped to the body ------------------------------------------------------------------------------


def _no_air_around(ct: sitk.Image) -> tuple:
    """``ct`` (the ``cropped`` variant: cut left-right through the lungs) also cut front to back 5 mm inside the body,
    so no air around the body is left in view (125 x 140 mm, wide enough for analyze), and its lung mask."""
    rows = np.flatnonzero((sitk.GetArrayViewFromImage(ct) > -400).mean(axis=(0, 2)) > 0.5)
    m = int(round(5.0 / ct.GetSpacing()[1]))
    ct = ct[:, int(rows[0]) + m:int(rows[-1]) + 1 - m, :]
    return ct, segment_lungs(ct)


@pytest.fixture(scope="module")
def cropped_scans():
    """Patient 0 of ``scans``, with its field of view cut left-right through both lungs (phantom variant
    ``cropped``): what the lung mask now analyses with the warning ``fov_cut``."""
    patient = make_patient(0, seed=5, variant="cropped")
    return {a.vendor: (ct, segment_lungs(ct))
            for a, ct in zip(DEFAULT_ACQUISITIONS, acquire_all(patient, DEFAULT_ACQUISITIONS))}


@pytest.mark.parametrize("vendor", ["A", "B", "C"])
def test_cropped_field_of_view_calibrates_like_the_whole_scan(scans, cropped_scans, vendor):
    whole = estimate_calibration(*scans[vendor])
    cropped = estimate_calibration(*cropped_scans[vendor])
    assert whole.air_reference == cropped.air_reference == "outside_air"
    # the lungs cut by the field of view touch the image border like the air around the body, and are not taken
    # for it (before: vendor C's air read -1076 HU in the cropped scan, -1031 in the whole one)
    assert cropped.air_hu == pytest.approx(whole.air_hu, abs=3.0)
    for hu in (-950.0, -850.0):
        assert cropped.apply(np.array([hu]))[0] == pytest.approx(whole.apply(np.array([hu]))[0], abs=3.0)


# --- speed: the references are computed in the box around body and lungs, with the same voxels ----------------------


@pytest.mark.parametrize("border", [False, True])
def test_in_plane_dilation_is_ndimage_s(border):
    mask = np.random.default_rng(2).random((3, 40, 50)) > 0.93
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    for iterations in (1, 3):
        np.testing.assert_array_equal(_in_plane_dilation(mask, iterations, border=border),
                                      ndimage.binary_dilation(mask, in_plane, iterations, border_value=int(border)))


def _regions_on_whole_planes(ct: sitk.Image, lungs: sitk.Image) -> dict:
    """The references as defined (calibration.py's docstring), with ndimage on the whole plane of every slice read:
    what reference_regions computed before it worked in the box around body and lungs."""
    hu, lung, (_, _, sz) = _axial_up(ct, lungs)
    step = max(1, min(SLICE_STEP, int(round(REFERENCE_SLICE_MM / sz))))
    hu, lung = hu[::step].astype(np.float32), lung[::step] > 0
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    near_lung = ndimage.binary_dilation(lung, in_plane, iterations=2)
    outside = outside_air(hu < AIR_HU)
    air = ndimage.binary_erosion(outside & ~near_lung, in_plane, iterations=3) & (hu > PAD_HU)
    body = ~ndimage.binary_dilation(outside, in_plane, iterations=2) & ~near_lung
    soft = ndimage.binary_erosion(body & (hu > SOFT_TISSUE_HU[0]) & (hu < SOFT_TISSUE_HU[1]), in_plane)
    soft &= (hu > FAT_RANGE_HU[0]) & (hu < FAT_RANGE_HU[1])
    return {"outside_air": hu[air], "fat": hu[soft]}


@pytest.mark.parametrize("which", ["whole", "cropped", "no_air"])
def test_box_reads_the_voxels_of_the_whole_planes(scans, cropped_scans, which):
    """The box lies inside the image (whole scan) or reaches its edges (lungs cut by the field of view): the same
    voxels either way, so the same levels."""
    ct, lungs = {"whole": scans["A"], "cropped": cropped_scans["A"],
                 "no_air": _no_air_around(cropped_scans["C"][0])}[which]
    fast = reference_regions(ct, lungs, tracheal=False)
    for name, values in _regions_on_whole_planes(ct, lungs).items():
        assert fast[name].dtype == values.dtype
        np.testing.assert_array_equal(np.sort(fast[name]), np.sort(values))


def test_tracheal_air_reads_like_the_air_around_the_body_on_the_phantom(scans):
    """Measured, not used by default: on real scans tracheal air reads 18-40 HU above the outside air."""
    levels = reference_levels(*scans["A"])  # the thin-slice acquisition: enough tracheal voxels
    assert levels["tracheal_air"][1] >= 500
    assert levels["tracheal_air"][0] == pytest.approx(levels["outside_air"][0], abs=3.0)
    only_trachea = estimate_calibration(*scans["A"], air_references=("tracheal_air",))
    assert only_trachea.air_reference == "tracheal_air"
    assert only_trachea.apply(np.array([-950.0]))[0] == pytest.approx(-950.0, abs=3.0)


def test_without_air_analyze_goes_on_uncalibrated_and_warns(cropped_scans):
    ct, lungs = _no_air_around(cropped_scans["C"][0])
    hu = np.array([-900.0, 0.0], dtype=np.float32)
    with pytest.raises(CalibrationError, match="too little air around the body"):  # training refuses such a scan
        scan_calibration(ct, lungs, PatchSpec(calibration="air_fat"))
    unavailable = scan_calibration(ct, lungs, PatchSpec(calibration="air_fat"), required=False)
    assert isinstance(unavailable, CalibrationUnavailable) and unavailable.apply(hu) is hu
    assert unavailable.warning["code"] == UNAVAILABLE
    assert "too little air around the body" in unavailable.warning["message"]
    assert unavailable.as_dict()["applied"] is False and unavailable.as_dict()["air_reference"] is None
    found = estimate_calibration(*cropped_scans["C"])  # the same scan with the air in front of and behind the body
    assert found.warning is None and found.as_dict()["air_reference"] == "outside_air"


def test_analysis_records_the_reference_or_the_warning(scans, cropped_scans, tmp_path):
    """End to end: a calibrating copy of the shipped bundle analyses the cropped scan with its outside air, and the
    scan with no air around the body uncalibrated, with the warning in analysis.json."""
    import json
    from dataclasses import replace

    from latentharmonize import analyze
    from latentharmonize.bundle import ModelBundle, load_bundle, save_bundle

    shipped = load_bundle()
    encoder = shipped.manifest["encoder"]
    calibrating = ModelBundle.create(
        name="calibrating copy", encoder_config={"kind": encoder["kind"], **encoder["config"]},
        encoder_state=shipped.encoder_state, spec=replace(shipped.spec, calibration="air_fat"),
        rotation=shipped.rotation, clusters=shipped.clusters, names=list(shipped.names.values()),
        colors=list(shipped.colors.values()))
    model = save_bundle(calibrating, tmp_path / "model")
    records = {}
    for name, (ct, _) in {"cropped": cropped_scans["C"], "no_air": _no_air_around(cropped_scans["C"][0])}.items():
        sitk.WriteImage(ct, str(tmp_path / f"{name}.nrrd"))
        analyze(tmp_path / f"{name}.nrrd", tmp_path / name, model=model, device="cpu", write_report=False)
        records[name] = json.loads((tmp_path / name / "analysis.json").read_text())
    assert records["cropped"]["hu_calibration"]["air_reference"] == "outside_air"
    assert UNAVAILABLE not in [w["code"] for w in records["cropped"]["warnings"]]
    assert records["no_air"]["hu_calibration"] == {"applied": False, "air_reference": None,
                                                "reason": records["no_air"]["hu_calibration"]["reason"]}
    assert UNAVAILABLE in [w["code"] for w in records["no_air"]["warnings"]]
