"""Volume I/O: geometry round-trips, DICOM HU, and a specific InputError for every bad input."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from latentharmonize.errors import InputError, OutputError
from latentharmonize.io import image_sha256, read_ct, read_mask, same_geometry, write_image

ROTATION = sitk.VersorTransform((1.0, 2.0, 3.0), 0.4).GetMatrix()  # oblique, non-identity direction
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def small_ct(size=(24, 20, 10), spacing=(0.8, 0.9, 2.5), direction=ROTATION, seed=0, dtype=np.int16):
    """A tiny CT-like volume: air around a soft-tissue body holding an air-filled 'lung'."""
    nx, ny, nz = size
    z, y, x = np.ogrid[:nz, :ny, :nx]
    body = ((x - nx / 2) / (0.4 * nx)) ** 2 + ((y - ny / 2) / (0.4 * ny)) ** 2 <= 1
    lung = ((x - nx / 2) / (0.15 * nx)) ** 2 + ((y - ny / 2) / (0.15 * ny)) ** 2 <= 1
    hu = np.where(lung, -850, np.where(body, 40, -1000)) + np.random.default_rng(seed).integers(-20, 20, (nz, ny, nx))
    image = sitk.GetImageFromArray(hu.astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin((-12.5, 30.25, 101.0))
    image.SetDirection(direction)
    return image


def _arr(image):
    return sitk.GetArrayFromImage(image)


@pytest.mark.parametrize("name", ["ct.nrrd", "ct.nii", "ct.nii.gz", "ct.mha"])
def test_round_trip_keeps_values_and_geometry(tmp_path, name):
    ct = small_ct()
    path = write_image(ct, tmp_path / name)
    back = read_ct(path)
    assert same_geometry(back, ct, tol=1e-4)
    assert np.array_equal(_arr(back), _arr(ct))
    assert back.GetPixelID() == sitk.sitkInt16
    assert [p.name for p in tmp_path.iterdir()] == [name], "no temporary file is left behind"


def test_reads_mhd_with_separate_data_file(tmp_path):
    ct = small_ct()
    sitk.WriteImage(ct, str(tmp_path / "ct.mhd"))
    back = read_ct(tmp_path / "ct.mhd")
    assert same_geometry(back, ct) and np.array_equal(_arr(back), _arr(ct))


def test_float64_ct_becomes_float32(tmp_path):
    ct = sitk.Cast(small_ct(), sitk.sitkFloat64) * 0.5
    back = read_ct(write_image(ct, tmp_path / "ct.nrrd"))
    assert back.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(_arr(back), _arr(ct))


def test_write_image_refuses_multi_file_format_and_keeps_target_on_failure(tmp_path):
    with pytest.raises(OutputError, match="single-file"):
        write_image(small_ct(), tmp_path / "ct.mhd")
    target = tmp_path / "ct.nrrd"
    target.write_bytes(b"previous result")
    with pytest.raises(OutputError):
        write_image(sitk.Image(), target)  # an empty image cannot be written
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


# --- DICOM -------------------------------------------------------------------------------------


def write_dicom_series(folder, stored, spacing, origin, row_dir, col_dir, slope, intercept, series_uid,
                       description="chest", prefix="slice"):
    """Write ``stored[z, y, x]`` (raw stored values) as one CT slice per file with pydicom."""
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(row_dir, col_dir)
    for k, plane in enumerate(stored):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.SeriesDescription = "CT", "P001", description
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7", series_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # DICOM: row spacing (y), column spacing (x)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = plane.astype("<i2").tobytes()
        _save(ds, folder / f"{prefix}{k:03d}.dcm")


def _save(ds, path):
    """A standard DICOM file (preamble and file meta) with pydicom 3, or 2.x as pyproject allows."""
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def _dicom_chest(folder, series_uid="1.2.826.0.1.3680043.8.498.7.1", slope=0.5, intercept=-1024.0):
    hu = _arr(small_ct(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    theta = np.deg2rad(20.0)
    row_dir = np.array([np.cos(theta), np.sin(theta), 0.0])
    col_dir = np.array([-np.sin(theta), np.cos(theta), 0.0])
    spacing, origin = (0.8, 0.9, 2.5), (-100.0, -120.0, 40.0)
    write_dicom_series(folder, stored, spacing, origin, row_dir, col_dir, slope, intercept, series_uid)
    direction = np.column_stack([row_dir, col_dir, np.cross(row_dir, col_dir)]).ravel()
    return stored * slope + intercept, spacing, origin, direction


def test_dicom_series_gives_hu_and_geometry(tmp_path):
    expected_hu, spacing, origin, direction = _dicom_chest(tmp_path / "series")
    ct = read_ct(tmp_path / "series")
    assert np.allclose(_arr(ct), expected_hu), "rescale slope 0.5 and intercept -1024 are applied"
    assert _arr(ct).min() < -900, "air reads as about -1000 HU, not the stored value"
    assert np.allclose(ct.GetSpacing(), spacing, atol=1e-4)
    assert np.allclose(ct.GetOrigin(), origin, atol=1e-4)
    assert np.allclose(ct.GetDirection(), direction, atol=1e-5)


def test_dicom_folder_with_two_series_asks_to_pick(tmp_path):
    _dicom_chest(tmp_path / "mixed", series_uid="1.2.826.0.1.3680043.8.498.7.1")
    write_dicom_series(tmp_path / "mixed", np.zeros((3, 20, 24), np.int16) - 1000, (1, 1, 1), (0, 0, 0),
                       np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), 1.0, 0.0, "1.2.826.0.1.3680043.8.498.7.2",
                       description="scout", prefix="scout")
    with pytest.raises(InputError, match=r"2 DICOM series.*scout.*Pick one"):
        read_ct(tmp_path / "mixed")
    picked = read_ct(sorted((tmp_path / "mixed").glob("slice*.dcm"))[0])
    assert picked.GetSize() == (24, 20, 10), "one file of a series selects that series"


def test_dicom_series_with_a_missing_slice(tmp_path):
    for k, z in enumerate([0.0, 2.5, 5.0, 10.0]):  # the slice at 7.5 mm is missing
        plane = np.where(np.arange(24) < 12, -1000, 40).astype(np.int16)[None, None, :].repeat(20, axis=1)
        write_dicom_series(tmp_path / "gap", plane, (1, 1, 2.5), (0, 0, z), np.array([1.0, 0, 0]),
                           np.array([0, 1.0, 0]), 1.0, 0.0, "1.2.826.0.1.3680043.8.498.7.3", prefix=f"s{k}_")
    with pytest.raises(InputError, match=r"unevenly spaced \(gaps from 2.5 to 5 mm\)"):
        read_ct(tmp_path / "gap")


# --- bad inputs ----------------------------------------------------------------------------------


def _write(tmp_path, image, name="bad.nrrd"):
    sitk.WriteImage(image, str(tmp_path / name))
    return tmp_path / name


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_ct(tmp_path / "nowhere.nrrd")


def test_file_that_is_not_an_image(tmp_path):
    (tmp_path / "notes.nrrd").write_text("these are not voxels\n")
    with pytest.raises(InputError, match="not an image that can be read"):
        read_ct(tmp_path / "notes.nrrd")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match=r"no DICOM series.*\)\.$"):
        read_ct(tmp_path)
    _dicom_chest(tmp_path / "study" / "series1")
    with pytest.raises(InputError, match=r"subfolders \(series1\): give the folder that directly holds the slices"):
        read_ct(tmp_path / "study")


@pytest.mark.parametrize("shape", [(30, 30), (1, 30, 30)], ids=["2d", "single-slice"])
def test_2d_image(tmp_path, shape):
    values = np.full(shape, -1000, np.int16)
    values[..., 10:20, 10:20] = 40  # a CT-like slice: body in air
    image = sitk.GetImageFromArray(values)
    with pytest.raises(InputError, match="2D image"):
        read_ct(_write(tmp_path, image))


def test_multi_component_image(tmp_path):
    rgb = sitk.Compose([small_ct()] * 3)
    with pytest.raises(InputError, match="3 values per voxel"):
        read_ct(_write(tmp_path, rgb))


def _from_array(values, reference):
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(reference)
    return image


@pytest.mark.parametrize("transform, message", [
    (lambda hu: (hu + 1000) * 1.7, "no air or lung"),          # MR-like: all intensities >= 0
    (lambda hu: hu + 1024, "no air or lung"),                  # CT stored without rescale intercept
    (lambda hu: (hu + 1000) / 1100.0, "no air or lung"),       # normalised to [0, 1]
    (lambda hu: np.minimum(hu, -600) - 300, "no fat or soft tissue"),  # nothing denser than lung
], ids=["mr-like", "unrescaled", "normalised", "no-tissue"])
def test_intensities_that_are_not_ct(tmp_path, transform, message):
    ct = small_ct()
    bad = _from_array(transform(_arr(ct).astype(np.float32)).astype(np.float32), ct)
    with pytest.raises(InputError, match=message):
        read_ct(_write(tmp_path, bad))


def test_constant_volume(tmp_path):
    ct = small_ct()
    with pytest.raises(InputError, match="constant"):
        read_ct(_write(tmp_path, _from_array(np.full(_arr(ct).shape, -1000, np.int16), ct)))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_values(tmp_path, bad_value):
    ct = small_ct()
    values = _arr(ct).astype(np.float32)
    values[3, 4, 5] = bad_value
    with pytest.raises(InputError, match="1 NaN or infinite"):
        read_ct(_write(tmp_path, _from_array(values, ct)))


# --- masks ---------------------------------------------------------------------------------------


def _two_blobs(reference):
    """Label 1 on the low-x half and 2 on the high-x half of the image's physical space."""
    size = reference.GetSize()
    labels = np.zeros(size[::-1], np.uint8)
    labels[2:-2, 5:-5, 3:10] = 1
    labels[2:-2, 5:-5, 14:21] = 2
    image = _from_array(labels, reference)
    centroid = sitk.LabelShapeStatisticsImageFilter()
    centroid.Execute(image)
    right_is_one = centroid.GetCentroid(1)[0] < centroid.GetCentroid(2)[0]
    return image, right_is_one


def test_read_mask_orders_two_labels_by_physical_side(tmp_path):
    ct = small_ct(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS storage: index x runs to the patient's right
    mask, right_is_one = _two_blobs(ct)
    assert not right_is_one, "test setup: label 1 lies on the patient's left"
    read = read_mask(_write(tmp_path, mask, "mask.nrrd"), ct)
    assert read.GetPixelID() == sitk.sitkUInt8 and same_geometry(read, ct)
    swapped = np.choose(_arr(mask), [0, 2, 1])
    assert np.array_equal(_arr(read), swapped)


def test_read_mask_splits_single_label(tmp_path):
    ct = small_ct(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    mask, right_is_one = _two_blobs(ct)
    assert right_is_one
    binary = _from_array((_arr(mask) > 0).astype(np.uint8) * 255, ct)
    read = read_mask(_write(tmp_path, binary, "mask.nii.gz"), ct)
    assert np.array_equal(_arr(read), _arr(mask))


def test_read_mask_geometry_mismatch(tmp_path):
    ct = small_ct()
    mask, _ = _two_blobs(ct)
    shifted = sitk.Image(mask)
    shifted.SetOrigin(np.add(ct.GetOrigin(), (5.0, 0, 0)).tolist())
    with pytest.raises(InputError, match=r"origin .* vs CT .*Resample"):
        read_mask(_write(tmp_path, shifted, "mask.nrrd"), ct)
    with pytest.raises(InputError, match="size"):
        read_mask(_write(tmp_path, mask[:-1, :, :], "small.nrrd"), ct)


def test_read_mask_empty(tmp_path):
    ct = small_ct()
    with pytest.raises(InputError, match="empty"):
        read_mask(_write(tmp_path, _from_array(np.zeros(_arr(ct).shape, np.uint8), ct), "mask.nrrd"), ct)


# --- geometry and hashing --------------------------------------------------------------------------


def test_same_geometry():
    ct = small_ct()
    assert same_geometry(ct, sitk.Image(ct))
    nudged = sitk.Image(ct)
    nudged.SetOrigin(np.add(ct.GetOrigin(), 1e-6).tolist())  # float32 header rounding
    assert same_geometry(ct, nudged)
    for setter, value in [("SetSpacing", np.multiply(ct.GetSpacing(), 1.01)),
                          ("SetOrigin", np.add(ct.GetOrigin(), (0, 0.5, 0))),
                          ("SetDirection", (1, 0, 0, 0, 1, 0, 0, 0, 1))]:
        changed = sitk.Image(ct)
        getattr(changed, setter)(tuple(float(v) for v in value))
        assert not same_geometry(ct, changed), setter
    assert not same_geometry(ct, ct[:, :, :-1])


def test_image_sha256_tracks_content(tmp_path):
    path = write_image(small_ct(seed=0), tmp_path / "a.nrrd", compress=False)
    first = image_sha256(path)
    assert image_sha256(path) == first and len(first) == 64
    write_image(small_ct(seed=1), path, compress=False)
    assert image_sha256(path) != first
    _dicom_chest(tmp_path / "dicom")
    folder_hash = image_sha256(tmp_path / "dicom")
    (tmp_path / "dicom" / "slice003.dcm").rename(tmp_path / "dicom" / "renamed.dcm")
    assert image_sha256(tmp_path / "dicom") != folder_hash, "the file list is part of a folder's hash"
    sitk.WriteImage(small_ct(seed=0), str(tmp_path / "b.mhd"))
    mhd_hash = image_sha256(tmp_path / "b.mhd")
    raw = tmp_path / "b.raw"
    raw.write_bytes(raw.read_bytes()[::-1])
    assert image_sha256(tmp_path / "b.mhd") != mhd_hash, "an .mhd hash covers its data file"
    with pytest.raises(InputError):
        image_sha256(tmp_path / "missing.nrrd")
