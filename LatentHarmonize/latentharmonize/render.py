"""QC pictures: slice montage with the cluster overlay, exemplar patch gallery, off-screen 3D view and surfaces.

Everything is drawn from a small "display volume" (lung box resampled to at most ``max_size`` voxels per axis,
isotropic), so rendering costs well under a second whatever the CT size. Images are composited with numpy and
written as PNG with matplotlib (fixed metadata, so identical inputs give identical bytes). The 3D view is rendered
off-screen with VTK; without a display VTK uses its EGL window (no X server needed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk

from .grid import lung_bounding_box_mm

LUNG_WINDOW = (-1350.0, 150.0)  # level -600, width 1500 HU
PNG_METADATA = {"Software": "LatentHarmonize"}
MARGIN_MM = 10.0


@dataclass
class DisplayVolumes:
    """Lung box resampled to an isotropic axial grid (identity direction, LPS), arrays [z, y, x] uint8.

    ``gray``: CT in the lung window; ``labels``: clusters (0 none); ``confidence``: 0..255 for 0..1.
    """

    gray: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    spacing: float
    origin: tuple


def window_to_uint8(hu: np.ndarray, window=LUNG_WINDOW) -> np.ndarray:
    """Map HU linearly onto 0..255 over ``window`` (lung window by default), clipped."""
    lo, hi = window
    scaled = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _display_grid(lungs: sitk.Image, max_size: int) -> sitk.Image:
    """Reference image: isotropic axial grid over the lung bounding box plus a margin."""
    lo, hi = lung_bounding_box_mm(lungs)
    start, stop = lo - MARGIN_MM, hi + MARGIN_MM
    spacing = max(float((stop - start).max()) / max_size, min(lungs.GetSpacing()))
    size = [int(np.ceil(e / spacing)) + 1 for e in stop - start]
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetOrigin(tuple(float(v) for v in start))
    reference.SetSpacing((spacing,) * 3)
    return reference


def display_volumes(ct: sitk.Image, labels: sitk.Image, confidence: sitk.Image, lungs: sitk.Image,
                    max_size: int = 160) -> DisplayVolumes:
    """Resample CT (linear), labels (nearest) and confidence (linear) onto a small isotropic lung-box grid."""
    reference = _display_grid(lungs, max_size)

    def resample(image, interp, default, pixel):
        out = sitk.Resample(image, reference, sitk.Transform(), interp, default, pixel)
        return sitk.GetArrayFromImage(out)

    gray = window_to_uint8(resample(ct, sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    lab = resample(labels, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    conf = resample(confidence, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    conf8 = np.clip(np.rint(conf * 255.0), 0, 255).astype(np.uint8)
    return DisplayVolumes(gray, lab, conf8, reference.GetSpacing()[0], reference.GetOrigin())


def color_lut(colors: dict) -> np.ndarray:
    """uint8 [256, 3] lookup table from ``{label: (r, g, b) floats 0..1}`` (unknown labels black)."""
    lut = np.zeros((256, 3), np.uint8)
    for label, rgb in colors.items():
        lut[int(label)] = np.clip(np.rint(np.asarray(rgb, dtype=float) * 255), 0, 255)
    return lut


def overlay(gray: np.ndarray, labels: np.ndarray, lut: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """RGB uint8 image: grey slice blended with label colours where the label is non-zero."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    mask = labels > 0
    rgb[mask] = (1 - opacity) * rgb[mask] + opacity * lut[labels[mask]]
    return np.rint(rgb).astype(np.uint8)


def _slice_positions(present: np.ndarray, count: int) -> list:
    """``count`` evenly spaced indices among those where ``present`` is true (interior quantiles)."""
    idx = np.flatnonzero(present)
    if idx.size == 0:
        return []
    picks = np.linspace(0, idx.size - 1, count + 2)[1:-1]
    return sorted({int(idx[int(round(p))]) for p in picks})


def montage_tiles(dv: DisplayVolumes, lut: np.ndarray, n_axial: int = 6, n_coronal: int = 3) -> list:
    """(title, RGB tile) pairs: axial slices (radiological view) then coronal slices (superior up), titled with
    their physical LPS position in mm."""
    tiles = []
    for z in _slice_positions(dv.labels.any(axis=(1, 2)), n_axial):
        title = f"axial z {dv.origin[2] + z * dv.spacing:.0f} mm"
        tiles.append((title, overlay(dv.gray[z], dv.labels[z], lut)))
    for y in _slice_positions(dv.labels.any(axis=(0, 2)), n_coronal):
        title = f"coronal y {dv.origin[1] + y * dv.spacing:.0f} mm"
        tiles.append((title, overlay(dv.gray[::-1, y], dv.labels[::-1, y], lut)))
    return tiles


def _mosaic(tiles: list, columns: int, pad: int = 4) -> tuple:
    """Paste RGB tiles row by row (each row as tall as its tallest tile); returns the image and tile corners."""
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    heights = [max(t.shape[0] for t in row) for row in rows]
    width = max(sum(t.shape[1] for t in row) + pad * (len(row) + 1) for row in rows)
    canvas = np.zeros((sum(heights) + pad * (len(rows) + 1), width, 3), np.uint8)
    corners, top = [], pad
    for row, height in zip(rows, heights):
        left = pad
        for tile in row:
            canvas[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
            corners.append((top, left))
            left += tile.shape[1] + pad
        top += height + pad
    return canvas, corners


def _save_figure(image: np.ndarray, path, annotations: list, legend: list, scale: float = 1.0) -> None:
    """Save ``image`` at 1:1 pixels (times ``scale``) with text annotations and a colour legend below."""
    # lazy, as all of matplotlib and VTK here: a run without QC pictures (--no-report, Slicer's) never pays their import
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.patches import Patch

    dpi = 100
    legend_h = 0.35 * (1 + (len(legend) - 1) // 4) if legend else 0.0
    w_in, h_in = image.shape[1] * scale / dpi, image.shape[0] * scale / dpi
    fig = Figure(figsize=(w_in, h_in + legend_h), dpi=dpi, facecolor="black")
    ax = fig.add_axes((0, legend_h / (h_in + legend_h), 1, h_in / (h_in + legend_h)))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    for (top, left), text in annotations:
        ax.text(left + 2, top + 2, text, color="white", fontsize=7, va="top", ha="left")
    if legend:
        handles = [Patch(color=rgb, label=name) for name, rgb in legend]
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False,
                   labelcolor="white")
    fig.savefig(str(path), dpi=dpi, facecolor="black", metadata=PNG_METADATA)


def render_montage(dv: DisplayVolumes, names: dict, colors: dict, path, n_axial: int = 6, n_coronal: int = 3) -> None:
    """``qc_montage.png``: axial and coronal slices with the cluster overlay and a legend."""
    tiles = montage_tiles(dv, color_lut(colors), n_axial, n_coronal)
    if not tiles:
        raise ValueError("The label map is empty: nothing to show in the montage.")
    image, corners = _mosaic([t for _, t in tiles], columns=max(n_axial, n_coronal) // 2 or 1)
    legend = [(names[k], colors[k]) for k in sorted(names)]
    _save_figure(image, path, list(zip(corners, [title for title, _ in tiles])), legend, scale=1.5)


def select_exemplars(labels: np.ndarray, confidence: np.ndarray, per_cluster: int = 8) -> dict:
    """Rows of the ``per_cluster`` most confident patches of each cluster: ``{label: row indices}``.

    Ties in confidence are broken by row order, so the choice is deterministic.
    """
    chosen = {}
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        order = np.lexsort((rows, -np.asarray(confidence)[rows]))[:per_cluster]
        chosen[int(label)] = rows[order]
    return chosen


def render_gallery(gallery: dict, names: dict, colors: dict, path, zoom: int = 4) -> None:
    """``qc_gallery.png``: one row per cluster (name and colour bar), its exemplar patches enlarged ``zoom`` x."""
    labels = [k for k in sorted(names) if gallery.get(k)]
    if not labels:
        raise ValueError("No patches to show in the gallery.")
    per_row = max(len(gallery[k]) for k in labels)
    size = gallery[labels[0]][0].shape[0] * zoom
    bar = 6
    tiles = []
    for label in labels:
        rgb = np.rint(np.asarray(colors[label]) * 255).astype(np.uint8)
        for i in range(per_row):
            tile = np.zeros((size + bar, size, 3), np.uint8)
            tile[:bar] = rgb
            if i < len(gallery[label]):
                big = np.kron(gallery[label][i], np.ones((zoom, zoom), np.uint8))
                tile[bar:] = big[..., None]
            tiles.append(tile)
    image, corners = _mosaic(tiles, columns=per_row)
    notes = [(corners[i * per_row], f"{label}: {names[label]}") for i, label in enumerate(labels)]
    _save_figure(image, path, notes, [])


def import_drawing_libraries() -> None:
    """Import what the QC pictures are drawn with (matplotlib, VTK: about 1 s in a fresh process) ahead of drawing:
    ``analyze`` imports them while its worker threads read the scan. (Beside the pipeline instead, the imports held
    the GIL from the lung mask's many short numpy steps and slowed it by more than they saved.)"""
    _vtk()
    import matplotlib.figure  # noqa: F401  (lazy: see _save_figure)
    import matplotlib.image  # noqa: F401
    import matplotlib.patches  # noqa: F401


def _vtk():
    """The VTK classes used here, imported from their modules (importing ``vtk`` itself loads all of VTK)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # off-screen without X
    # lazy: only a run with QC pictures imports VTK, and the window setting above must come first
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL render window)
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkPolyDataNormals, vtkThreshold, vtkWindowedSincPolyDataFilter
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D
    from vtkmodules.vtkFiltersGeometry import vtkGeometryFilter
    from vtkmodules.vtkIOXML import vtkXMLPolyDataWriter
    from vtkmodules.vtkRenderingCore import (vtkActor, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow,
                                             vtkWindowToImageFilter)

    return SimpleNamespace(**{c.__name__: c for c in (
        vtkImageData, vtkPolyDataNormals, vtkThreshold, vtkWindowedSincPolyDataFilter, vtkDiscreteFlyingEdges3D,
        vtkGeometryFilter,
        vtkXMLPolyDataWriter, vtkActor, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow, vtkWindowToImageFilter)},
        numpy_support=numpy_support)


def coarsen_labels(labels: np.ndarray, spacing: float, max_size: int = 96) -> tuple:
    """Nearest-neighbour subsampling of a label volume to at most ``max_size`` voxels per axis (for surfaces)."""
    step = max(1, int(np.ceil(max(labels.shape) / max_size)))
    return np.ascontiguousarray(labels[::step, ::step, ::step]), spacing * step


def cluster_surfaces(labels: np.ndarray, spacing: float, origin: tuple, smooth_iterations: int = 12):
    """vtkPolyData of each cluster's boundary surface (point scalars ``label``), physical LPS mm.

    ``labels`` [z, y, x] on an isotropic axis-aligned grid with voxel [0, 0, 0] at ``origin``.
    """
    vtk = _vtk()
    image = vtk.vtkImageData()
    image.SetDimensions(labels.shape[2], labels.shape[1], labels.shape[0])
    image.SetSpacing(spacing, spacing, spacing)
    image.SetOrigin(*origin)
    scalars = vtk.numpy_support.numpy_to_vtk(np.ascontiguousarray(labels).ravel(), deep=True)
    scalars.SetName("label")
    image.GetPointData().SetScalars(scalars)
    contour = vtk.vtkDiscreteFlyingEdges3D()
    contour.SetInputData(image)
    for i, value in enumerate(int(v) for v in np.unique(labels) if v > 0):
        contour.SetValue(i, value)
    contour.ComputeScalarsOn()
    last = contour
    if smooth_iterations:
        smoother = vtk.vtkWindowedSincPolyDataFilter()
        smoother.SetInputConnection(contour.GetOutputPort())
        smoother.SetNumberOfIterations(smooth_iterations)
        smoother.NormalizeCoordinatesOn()
        smoother.SetPassBand(0.01)
        last = smoother
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(last.GetOutputPort())
    normals.SplittingOff()
    normals.Update()
    surface = normals.GetOutput()
    surface.GetPointData().GetScalars().SetName("label")
    return surface


def write_vtp(surface, path) -> None:
    """Write surfaces as binary VTK XML PolyData (LZ4-compressed: fast); any VTK viewer, Slicer reads it as LPS."""
    writer = _vtk().vtkXMLPolyDataWriter()
    # VTK serialises, Python writes: VTK's own file writing crashed the process (SIGSEGV, "free(): invalid pointer")
    # when the disk filled up, where Python raises a clean OSError.
    writer.WriteToOutputStringOn()
    writer.SetInputData(surface)
    writer.SetDataModeToBinary()
    writer.SetCompressorTypeToLZ4()
    if not writer.Write():
        raise RuntimeError(f"VTK could not serialise the cluster surfaces for {path}")
    Path(path).write_bytes(writer.GetOutputString().encode("ascii"))  # binary mode is base64: plain ASCII


def render_3d(surface, colors: dict, path, size: int = 480, translucent_label: int | None = None) -> np.ndarray:
    """Render the surfaces off-screen seen from the front (patient's right on the left); write PNG, return RGB.

    ``translucent_label`` (usually the largest cluster) is drawn at low opacity so the others show through.
    """
    vtk = _vtk()
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.0, 0.0, 0.0)
    window.AddRenderer(renderer)
    for label, rgb in sorted(colors.items()):
        select = vtk.vtkThreshold()
        select.SetInputData(surface)
        select.SetInputArrayToProcess(0, 0, 0, 0, "label")  # point data
        select.SetLowerThreshold(label - 0.5)
        select.SetUpperThreshold(label + 0.5)
        geometry = vtk.vtkGeometryFilter()
        geometry.SetInputConnection(select.GetOutputPort())
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(geometry.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*rgb)
        actor.GetProperty().SetOpacity(0.15 if label == translucent_label else 1.0)
        renderer.AddActor(actor)
    camera = renderer.GetActiveCamera()
    center = np.array(surface.GetCenter())
    camera.SetFocalPoint(*center)
    camera.SetPosition(*(center - np.array([0.0, 1000.0, 0.0])))  # anterior is -y in LPS
    camera.SetViewUp(0.0, 0.0, 1.0)
    renderer.ResetCamera()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    shot = grab.GetOutput()
    w, h, _ = shot.GetDimensions()
    rgb = vtk.numpy_support.vtk_to_numpy(shot.GetPointData().GetScalars())[:, :3].reshape(h, w, 3)[::-1].copy()
    window.Finalize()
    import matplotlib.image  # lazy: see _save_figure

    matplotlib.image.imsave(str(path), rgb, metadata=PNG_METADATA)
    return rgb
