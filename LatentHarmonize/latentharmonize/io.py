"""Reading and writing volumes: chest CT in Hounsfield units, lung masks, label maps.

Formats: NRRD, NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd) and DICOM series (a folder, or one
file of the wanted series). Spacing, origin and direction are kept as read (ITK/LPS convention).
Every problem a user can fix raises :class:`~latentharmonize.errors.InputError` saying what was
wrong and what to do.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .lungmask import split_left_right

SUPPORTED = ".nrrd, .nii, .nii.gz, .mha, .mhd or a DICOM series folder"
WRITABLE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")

# HU plausibility (see docs/io-and-lung-mask.md). Air is -1000 HU and normal lung about -850 HU;
# nothing else in a body is below -500 HU, and a chest CT always holds air around the body or in
# the lungs. Fat is about -100 HU and soft tissue 20..60 HU, so a chest CT always has voxels above
# -200 HU. MR, PET, normalised ([0, 1]) or un-rescaled CT (air stored near 0) have no voxel below
# -500, and fail the first rule.
AIR_BELOW_HU = -500.0
MIN_AIR_FRACTION = 0.001
TISSUE_ABOVE_HU = -200.0
MIN_TISSUE_FRACTION = 0.001
SERIES_UID_TAG = "0020|000e"
_SAMPLE_VOXELS = 2_000_000  # statistics are taken on a regular subsample of at most this many voxels


def read_ct(path) -> sitk.Image:
    """Read a chest CT and check that it is a usable 3D volume in Hounsfield units.

    ``path`` is an image file, a DICOM series folder, or one file of a DICOM series (then the
    whole series that file belongs to is read). DICOM rescale slope/intercept are applied.
    Returns an ``Int16`` (integer data) or ``Float32`` image.
    """
    path = Path(path)
    return check_ct(_read_any(path, "CT"), path)


def check_ct(image: sitk.Image, name="The CT image") -> sitk.Image:
    """``image`` checked as :func:`read_ct` checks a file (``name`` in the messages): a 3D volume in Hounsfield
    units, returned as ``Int16`` (integer data) or ``Float32``."""
    image = _as_3d_scalar(image, name)
    minimum, maximum = _finite_range(image, name)
    _check_hounsfield(image, name, f"intensities {minimum:g} .. {maximum:g}")
    return _as_ct_pixel_type(image, minimum, maximum)


def read_mask(path, reference: sitk.Image, tol: float = 1e-3) -> sitk.Image:
    """Read a user lung mask on the geometry of ``reference`` (the CT it belongs to).

    Nonzero voxels are lung. A mask holding exactly labels 1 and 2 keeps them as the two lungs
    (ordered so that 1 is the patient's right, 2 the left); any other mask is binarised and split
    into right (1) and left (2) with :func:`latentharmonize.lungmask.split_left_right`.
    """
    path = Path(path)
    return as_lung_mask(_as_3d_scalar(_read_any(path, "mask"), path), reference, tol, f"Mask {path}")


def as_lung_mask(mask: sitk.Image, reference: sitk.Image, tol: float = 1e-3, name="The lung mask") -> sitk.Image:
    """A lung mask image on the grid of ``reference`` as :func:`read_mask` takes a file (``name`` in the messages):
    UInt8, 1 the patient's right lung, 2 the left."""
    if not same_geometry(mask, reference, tol=tol):
        difference = _geometry_difference(mask, reference, tol)
        raise InputError(f"{name} does not lie on the CT's voxel grid: {difference}. "
                         "Resample the mask onto the CT (e.g. in 3D Slicer: Resample Scalar/Vector/DWI Volume "
                         "with the CT as reference and nearest-neighbour interpolation), then try again.")
    labels = sitk.GetArrayViewFromImage(mask)
    low, high = labels.min(), labels.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError(f"{name} contains NaN or infinite values; a mask must hold integer labels.")
    if low == high == 0:
        raise InputError(f"{name} is empty (all voxels are 0); nonzero voxels must mark the lungs.")
    if labels.dtype.kind in "iu" and low >= 0 and high == 2 and (labels == 1).any():  # labels are exactly {1, 2}
        return _order_sides(sitk.Cast(mask, sitk.sitkUInt8), reference)
    mask = sitk.Image(mask)  # the caller's image keeps its geometry
    mask.CopyInformation(reference)  # equal within tol: use the CT's exact geometry
    return split_left_right(mask)


def write_image(image: sitk.Image, path, compress: bool = True) -> Path:
    """Write ``image`` atomically (temporary sibling file, then ``os.replace``); geometry is kept as is.

    Single-file formats only (.nrrd, .nii, .nii.gz, .mha), so the rename publishes the whole image.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise OutputError(f"Cannot write {path}: use one of {', '.join(WRITABLE_SUFFIXES)} "
                          "(single-file formats, so the file appears complete or not at all).")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=compress)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, RuntimeError):
            raise OutputError(f"Cannot write {path}: {_itk_reason(exc)}") from exc
        raise
    return path


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` share size, and spacing, origin and direction within ``tol``.

    ``tol`` is relative for spacing and origin (absolute below 1 mm) and absolute for direction
    cosines, so float32 headers (NIfTI) still match their double-precision source.
    """
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    return all(_close(getattr(a, f)(), getattr(b, f)(), tol, relative)
               for f, relative in (("GetSpacing", True), ("GetOrigin", True), ("GetDirection", False)))


def image_sha256(path) -> str:
    """SHA-256 identifying an input: the file's bytes, or for a folder (DICOM series) the sorted
    relative file names and their bytes. For ``.mhd`` the separate data file is included."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.exists():
        _check_regular(path, "input")
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            _hash_file(file, digest)
    elif path.is_file():
        _hash_file(path, digest)
        data_file = _mhd_data_file(path)
        if data_file is not None and not _check_regular(data_file, "input data file"):
            _hash_file(data_file, digest)
    else:
        raise InputError(f"Cannot hash {path}: no such file or folder.")
    return digest.hexdigest()


# --- reading ---------------------------------------------------------------------------------


def _check_regular(path: Path, what: str) -> bool:
    """True for a folder, False for a regular file; InputError for anything else. Uses stat only: opening a FIFO
    for reading would wait for a writer forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} path {path} does not exist. Check the spelling, or give an absolute path.") from None
    except OSError as exc:
        raise InputError(f"{what} path {path} cannot be used: {exc.strerror}. Check the path.") from None
    if stat.S_ISDIR(mode):
        return True
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device, socket or other special file"
        raise InputError(f"{what} path {path} is {kind}, not a file. Give an image file ({SUPPORTED}); save a "
                         "streamed image to a file first.")
    return False


def _read_any(path: Path, what: str) -> sitk.Image:
    if _check_regular(path, what):
        for entry in path.iterdir():  # GDCM opens every file of the folder
            if not entry.is_dir():
                _check_regular(entry, f"{what} folder entry")
        return _read_dicom_folder(path)
    data_file = _mhd_data_file(path)
    if data_file is not None:
        _check_regular(data_file, f"{what} data file")
    _check_complete(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path} is not an image that can be read ({_itk_reason(exc)}). "
                         f"Give a {what} as {SUPPORTED}.") from exc
    if reader.HasMetaDataKey(SERIES_UID_TAG):  # a DICOM file: read the whole series it belongs to
        return _read_series(path.parent, reader.GetMetaData(SERIES_UID_TAG).strip())
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path} could not be read: {_itk_reason(exc)}. "
                         "The file may be truncated or corrupt.") from exc


def _check_complete(path: Path, what: str) -> None:
    """Refuse a cut or corrupt gzip stream, and a NIfTI file shorter than its header says: ITK reads both without
    complaint, filling the missing voxels with zeros."""
    name = path.name.lower()
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as stream:
                head = stream.read(NIFTI_HEADER_BYTES)
                size = len(head) + sum(len(block) for block in iter(lambda: stream.read(1 << 22), b""))
        except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise InputError(f"{what} {path} is truncated or corrupt ({exc}); the copy is incomplete. Copy or export "
                             "the file again.") from None
    elif name.endswith(".nii"):
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(NIFTI_HEADER_BYTES)
    else:
        return
    if ".nii" in name:
        expected = _nifti_bytes(head)
        if expected is not None and size < expected:
            raise InputError(f"{what} {path} is truncated: its header describes {expected} bytes of image but the "
                             f"file holds {size}. Copy or export the file again.")


NIFTI_HEADER_BYTES = 540


def _nifti_bytes(head: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (voxel offset + voxels), from its header; None when it is not one."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:  # NIfTI-2
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:rank + 1]):
        return None  # a header ITK itself refuses
    return max(offset, 0) + int(np.prod([int(d) for d in dims[1:rank + 1]], dtype=object)) * bitpix // 8


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = (f" It has subfolders ({', '.join(subfolders[:5])}): give the folder that directly holds the slices."
                if subfolders else "")
        raise InputError(f"Folder {folder} holds no DICOM series. Give a folder of DICOM files or an image file "
                         f"({SUPPORTED}).{hint}")
    if len(series) > 1:
        listed = "; ".join(_describe_series(folder, uid) for uid in series[:8])
        raise InputError(f"Folder {folder} holds {len(series)} DICOM series: {listed}. Pick one: give the path of "
                         "any one file of the wanted series instead of the folder, or put that series in its own "
                         "folder.")
    return _read_series(folder, series[0])


def _read_series(folder: Path, uid: str) -> sitk.Image:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)  # GDCM sorts by position; rescale slope/intercept are applied on read
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"DICOM series {uid} in {folder} could not be read: {_itk_reason(exc)}.") from exc
    _check_even_slices(reader, image, f"DICOM series {uid} in {folder}")
    return image


def _check_even_slices(reader: sitk.ImageSeriesReader, image: sitk.Image, what: str) -> None:
    """ITK spreads slices evenly between the first and the last; with a missing slice or mixed
    positions the volume would be silently distorted, so refuse it."""
    key = "0020|0032"  # ImagePositionPatient
    count = len(reader.GetFileNames())
    if count < 3 or not all(reader.HasMetaDataKey(i, key) for i in range(count)):
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    heights = sorted(float(np.dot(normal, [float(v) for v in reader.GetMetaData(i, key).split("\\")]))
                     for i in range(count))
    gaps = np.diff(heights)
    if gaps.max() - gaps.min() > 0.1 * abs(np.median(gaps)) + 1e-3:
        raise InputError(f"The slices of {what} are unevenly spaced (gaps from {gaps.min():.3g} to {gaps.max():.3g} "
                         "mm): slices are missing or two acquisitions are mixed, and the volume would be distorted. "
                         "Export the complete series again, or convert it to NRRD in 3D Slicer (which resamples).")


def _describe_series(folder: Path, uid: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.ReadImageInformation()
    description = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else "no description"
    return f"{uid} ('{description}', {len(files)} files, e.g. {Path(files[0]).name})"


# --- validation ------------------------------------------------------------------------------


def _as_3d_scalar(image: sitk.Image, path: Path) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} has {image.GetNumberOfComponentsPerPixel()} values per voxel (colour or vector "
                         "image); a CT or mask has one value per voxel. Export it as a grey-scale volume.")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    size = image.GetSize()
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(size) == 1):
        raise InputError(f"{path} is a 2D image (size {'x'.join(map(str, size))}); give a 3D volume (a stack of "
                         "axial slices, e.g. the whole DICOM series folder).")
    if image.GetDimension() != 3:
        raise InputError(f"{path} is a {image.GetDimension()}D image (size {size}); give a single 3D volume.")
    if min(size) == 0:
        raise InputError(f"{path} is empty (size {size}).")
    return image


def _finite_range(image: sitk.Image, path: Path) -> tuple:
    """(min, max) of a volume holding finite, not all equal values (NaN propagates through min/max)."""
    values = sitk.GetArrayViewFromImage(image)
    minimum, maximum = float(values.min()), float(values.max())
    if not (np.isfinite(minimum) and np.isfinite(maximum)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise InputError(f"{path} contains {bad} NaN or infinite voxel values; a CT must hold finite HU everywhere. "
                         "Replace them (e.g. by -1000 HU outside the field of view) and try again.")
    if minimum == maximum:
        raise InputError(f"{path} is constant (every voxel is {minimum:g}); it holds no image. Check the export.")
    return minimum, maximum


def _check_hounsfield(image: sitk.Image, path: Path, shown: str) -> None:
    sample = _subsample(image)
    if np.mean(sample < AIR_BELOW_HU) < MIN_AIR_FRACTION:
        raise InputError(f"{path} does not look like a CT in Hounsfield units ({shown}): it has no air or lung "
                         f"(values below {AIR_BELOW_HU:g} HU), which every chest CT has. MR, PET or normalised images "
                         "are not supported; a CT stored without its rescale intercept (air near 0) needs 1024 "
                         "subtracted.")
    if np.mean(sample > TISSUE_ABOVE_HU) < MIN_TISSUE_FRACTION:
        raise InputError(f"{path} does not look like a chest CT in Hounsfield units ({shown}): it has no fat or soft "
                         f"tissue (values above {TISSUE_ABOVE_HU:g} HU). Give the whole CT, not a masked or "
                         "inverted copy.")


def _subsample(image: sitk.Image) -> np.ndarray:
    values = sitk.GetArrayViewFromImage(image)
    step = max(1, int(np.ceil((values.size / _SAMPLE_VOXELS) ** (1.0 / 3.0))))
    return values[::step, ::step, ::step]


def _as_ct_pixel_type(image: sitk.Image, minimum: float, maximum: float) -> sitk.Image:
    if image.GetPixelID() in (sitk.sitkInt16, sitk.sitkFloat32):
        return image
    integer = sitk.GetArrayViewFromImage(image).dtype.kind in "iu"
    fits_int16 = integer and -32768 <= minimum and maximum <= 32767
    return sitk.Cast(image, sitk.sitkInt16 if fits_int16 else sitk.sitkFloat32)


# --- masks -----------------------------------------------------------------------------------


def _order_sides(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Relabel a two-label mask so 1 is the patient's right (smaller LPS x) and 2 the left."""
    mask.CopyInformation(reference)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if stats.GetCentroid(1)[0] <= stats.GetCentroid(2)[0]:
        return mask
    swapped = sitk.ChangeLabel(mask, changeMap={1: 2, 2: 1})
    return sitk.Cast(swapped, sitk.sitkUInt8)


def _geometry_difference(a: sitk.Image, b: sitk.Image, tol: float) -> str:
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs CT {b.GetSize()}"
    for name in ("Spacing", "Origin", "Direction"):
        va, vb = getattr(a, f"Get{name}")(), getattr(b, f"Get{name}")()
        if not _close(va, vb, tol, name != "Direction"):
            return f"{name.lower()} {_fmt(va)} vs CT {_fmt(vb)}"
    return "geometry differs"


# --- helpers ---------------------------------------------------------------------------------


def _close(a, b, tol: float, relative: bool) -> bool:
    a, b = np.asarray(a, float), np.asarray(b, float)
    scale = np.maximum(1.0, np.maximum(np.abs(a), np.abs(b))) if relative else 1.0
    return bool(np.all(np.abs(a - b) <= tol * scale))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _itk_reason(exc: Exception) -> str:
    """The last line of an ITK exception, which names the actual problem."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def _mhd_data_file(path: Path) -> Path | None:
    if path.suffix.lower() != ".mhd":
        return None
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile" and value.strip() not in ("LOCAL", ""):
            candidate = path.parent / value.strip()
            return candidate if candidate.exists() else None
    return None
