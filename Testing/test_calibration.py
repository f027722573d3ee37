"""Internal-reference HU calibration: recovers the phantom's vendor maps, is refused where references are missing."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from latentharmonize.calibration import (HUCalibration, air_level, calibrate_grid_hu, estimate_calibration,
                                         fat_level)
from latentharmonize.errors import InputError
from latentharmonize.lungmask import segment_lungs
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
    assert calibration.as_dict() == {"air_hu": -967.0, "fat_hu": -80.5, "scale": 0.985, "offset": 18.0}


def test_spec_without_calibration_leaves_hu_untouched(scans):
    hu = np.array([-900.0, 0.0], dtype=np.float32)
    same, none = calibrate_grid_hu(hu, *scans["B"], PatchSpec())
    assert none is None and same is hu
    calibrated, found = calibrate_grid_hu(hu, *scans["B"], PatchSpec.from_dict({"calibration": "air_fat"}))
    assert found is not None and calibrated[0] == pytest.approx((-900.0 - found.offset) / found.scale)
    with pytest.raises(InputError, match="calibration must be"):
        PatchSpec.from_dict({"calibration": "tracheal"})


def test_scans_without_references_are_refused(scans):
    ct, lungs = scans["A"]
    arr = sitk.GetArrayFromImage(ct)
    for fill, missing in ((-850, "fat inside the body"), (40, "air around the body")):
        cropped = sitk.GetImageFromArray(np.full_like(arr, fill))  # a field of view inside the lung, or the heart
        cropped.CopyInformation(ct)
        with pytest.raises(InputError, match=f"too little {missing}"):
            estimate_calibration(cropped, lungs)
    shifted = sitk.GetImageFromArray((0.7 * arr).astype(np.int16))  # not HU as scanners store it
    shifted.CopyInformation(ct)
    with pytest.raises(InputError, match="too far from -1000 and -100"):
        estimate_calibration(shifted, lungs)
