"""Writers: the seg.nrrd reads back in slicerio (as Slicer would) with names, colours, labels and geometry."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import slicerio

from latentharmonize.writers import ijk_to_lps, write_composition, write_json, write_segmentation, write_volume

NAMES = {1: "normal", 2: "emphysema", 4: "honeycomb-like"}
COLORS = {1: (0.0, 0.447, 0.698), 2: (0.902, 0.624, 0.0), 4: (0.8, 0.475, 0.655)}


def _labels(direction=(0, 1, 0, -1, 0, 0, 0, 0, 1)):
    rng = np.random.default_rng(3)
    array = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(7, 9, 11))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-120.5, 33.0, -400.25))
    image.SetDirection(direction)
    return image, array


def test_seg_nrrd_reads_back_with_names_colours_labels_and_geometry(tmp_path):
    image, array = _labels()
    path = tmp_path / "scan.seg.nrrd"
    write_segmentation(image, path, NAMES, COLORS)
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["normal", "emphysema", "honeycomb-like"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 4]
    for s in seg["segments"]:
        np.testing.assert_allclose(s["color"], COLORS[s["labelValue"]], atol=1e-6)
        assert s["terminology"]["type"][2] == "Tissue"
        assert s["extent"] == [0, 10, 0, 8, 0, 6]
    # voxels come back in (i, j, k) order; the matrix maps them to the same LPS points as SimpleITK
    np.testing.assert_array_equal(seg["voxels"], array.T)
    ijk = np.array([3, 5, 2, 1.0])
    np.testing.assert_allclose((seg["ijkToLPS"] @ ijk)[:3], image.TransformContinuousIndexToPhysicalPoint(ijk[:3].tolist()))
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps(image))


def test_segmentation_bytes_are_deterministic(tmp_path):
    image, _ = _labels()
    write_segmentation(image, tmp_path / "a.seg.nrrd", NAMES, COLORS)
    write_segmentation(image, tmp_path / "b.seg.nrrd", NAMES, COLORS)
    assert (tmp_path / "a.seg.nrrd").read_bytes() == (tmp_path / "b.seg.nrrd").read_bytes()
    header = (tmp_path / "a.seg.nrrd").read_bytes()[:1024]
    assert not re.search(rb"\d{4}-\d\d-\d\d \d\d:\d\d", header), "no write time in the header"


def test_missing_colour_is_refused(tmp_path):
    image, _ = _labels()
    with pytest.raises(ValueError, match="colour"):
        write_segmentation(image, tmp_path / "x.seg.nrrd", NAMES, {1: (1, 0, 0)})


def test_volume_round_trip_keeps_geometry_and_values(tmp_path):
    image, array = _labels()
    confidence = sitk.Cast(sitk.Cast(image, sitk.sitkFloat32) / 4.0, sitk.sitkFloat32)
    write_volume(confidence, tmp_path / "c.nrrd")
    back = sitk.ReadImage(str(tmp_path / "c.nrrd"))
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array / np.float32(4))
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection())
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin())


def test_composition_and_json_files(tmp_path):
    table = pd.DataFrame({"region": ["whole", "whole"], "label": [1, 2], "name": ["a", "b"],
                          "fraction": [0.25, 0.75], "volume_ml": [1.0, 3.0], "mean_hu": [-800.0, np.nan], "sd_hu": [10.0, np.nan]})
    write_composition(table, tmp_path / "c.csv", tmp_path / "c.json", '{"x": 1}\n')
    back = pd.read_csv(tmp_path / "c.csv")
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}
    write_json({"b": 1, "a": [1, 2]}, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text().index('"a"') < (tmp_path / "r.json").read_text().index('"b"')


# --- QC pictures (render.py) ---------------------------------------------------------------------------------

from latentharmonize import render  # noqa: E402

RENDER_COLORS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.1)}
RENDER_NAMES = {1: "anterior", 2: "posterior"}


def _two_lungs(shape=(30, 48, 64)):
    """Two ellipsoid lungs; cluster 1 in the anterior half (low y), 2 posterior."""
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    lungs = np.zeros(shape, np.uint8)
    for value, cx in ((1, 18), (2, 46)):
        lungs[((xx - cx) / 13.0) ** 2 + ((yy - 24) / 18.0) ** 2 + ((zz - 15) / 12.0) ** 2 < 1] = value
    labels = np.where(lungs > 0, np.where(yy < 24, 1, 2), 0).astype(np.uint8)
    hu = np.where(lungs > 0, -850, 30).astype(np.int16)

    def img(a):
        i = sitk.GetImageFromArray(a)
        i.SetSpacing((1.5, 1.5, 3.0))
        i.SetOrigin((-50.0, -40.0, -100.0))
        return i
    confidence = img(np.where(lungs > 0, 0.5, 0).astype(np.float32))
    return img(hu), img(labels), confidence, img(lungs)


def test_display_volumes_are_isotropic_and_keep_labels():
    ct, labels, confidence, lungs = _two_lungs()
    dv = render.display_volumes(ct, labels, confidence, lungs, max_size=40)
    assert max(dv.gray.shape) <= 41 and dv.gray.shape == dv.labels.shape == dv.confidence.shape
    assert set(np.unique(dv.labels)) == {0, 1, 2}
    assert dv.confidence.max() == 128  # 0.5 on the 0..255 scale
    # anterior rows (low y) carry cluster 1, posterior rows cluster 2
    ys = np.nonzero(dv.labels == 1)[1].mean(), np.nonzero(dv.labels == 2)[1].mean()
    assert ys[0] < ys[1]


def test_montage_overlay_shows_cluster_colours(tmp_path):
    import matplotlib.image

    ct, labels, confidence, lungs = _two_lungs()
    dv = render.display_volumes(ct, labels, confidence, lungs, max_size=48)
    render.render_montage(dv, RENDER_NAMES, RENDER_COLORS, tmp_path / "m.png")
    picture = (matplotlib.image.imread(tmp_path / "m.png")[..., :3] * 255).astype(int)
    reddish = (picture[..., 0] > picture[..., 1] + 60).sum()
    greenish = (picture[..., 1] > picture[..., 0] + 60).sum()
    assert reddish > 100 and greenish > 100
    render.render_montage(dv, RENDER_NAMES, RENDER_COLORS, tmp_path / "m2.png")
    assert (tmp_path / "m.png").read_bytes() == (tmp_path / "m2.png").read_bytes()


def test_exemplars_are_the_most_confident_patches():
    labels = np.array([1, 1, 2, 1, 1])
    confidence = np.array([0.2, 0.9, 0.5, 0.6, 0.9])
    chosen = render.select_exemplars(labels, confidence, per_cluster=3)
    assert sorted(chosen) == [1, 2]
    assert chosen[1].tolist() == [1, 4, 3]  # by confidence, ties in row order
    assert chosen[2].tolist() == [2]


def test_gallery_picture_has_a_row_per_cluster(tmp_path):
    import matplotlib.image

    gallery = {1: [np.zeros((16, 16), np.uint8)] * 3, 2: [np.full((16, 16), 200, np.uint8)] * 2}
    render.render_gallery(gallery, RENDER_NAMES, RENDER_COLORS, tmp_path / "g.png", zoom=2)
    picture = matplotlib.image.imread(tmp_path / "g.png")
    assert picture.shape[1] >= 3 * 32 and picture.shape[0] >= 2 * 32
    bright = (picture[..., :3].mean(axis=-1) > 0.7).any(axis=1)
    assert bright[picture.shape[0] // 2:].any() and not bright[: picture.shape[0] // 4].all()


def test_surfaces_vtp_and_offscreen_3d_view(tmp_path):
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    ct, labels, confidence, lungs = _two_lungs()
    dv = render.display_volumes(ct, labels, confidence, lungs, max_size=40)
    surface = render.cluster_surfaces(dv.labels, dv.spacing, dv.origin)
    render.write_vtp(surface, tmp_path / "clusters.vtp")
    reader = vtk.vtkXMLPolyDataReader()
    reader.SetFileName(str(tmp_path / "clusters.vtp"))
    reader.Update()
    back = reader.GetOutput()
    assert back.GetNumberOfCells() > 100
    assert set(np.unique(vtk_to_numpy(back.GetPointData().GetArray("label")))) == {1, 2}
    bounds = np.array(back.GetBounds()).reshape(3, 2)  # physical mm, inside the scan
    assert bounds[0, 0] >= -50 - 2 and bounds[0, 1] <= -50 + 64 * 1.5 + 2
    rgb = render.render_3d(surface, RENDER_COLORS, tmp_path / "qc_3d.png", size=120)
    assert (tmp_path / "qc_3d.png").stat().st_size > 0
    # seen from the front, the anterior cluster (red, opaque here) hides the posterior one
    assert (rgb[..., 0] > rgb[..., 1] + 30).sum() > 500


def test_the_drawing_libraries_load_only_when_asked():
    """A run without pictures (Slicer's) never imports matplotlib or VTK; ``analyze`` with pictures imports them
    while it reads the scan. Checked in a fresh interpreter, where nothing else has imported them."""
    import subprocess
    import sys

    probe = ("import sys; from latentharmonize import render; "
             "libraries = ('matplotlib.figure', 'matplotlib.image', 'vtkmodules.vtkRenderingCore'); "
             "before = [m in sys.modules for m in libraries]; render.import_drawing_libraries(); "
             "print(before, [m in sys.modules for m in libraries])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[0] == "[False, False, False] [True, True, True]", done.stderr


def test_segment_kinds_carry_their_standard_terminology(tmp_path):
    """Each kind's TerminologyEntry, read back from the written file's header and by slicerio, in Slicer's format
    context~category~type~type modifier~anatomic context~anatomic region~region modifier."""
    from latentharmonize.writers import SEGMENT_KINDS, terminology

    kinds = {1: "cluster", 2: "vessel", 3: "airway", 4: "lung"}
    labels = np.zeros((4, 5, 6), np.uint8)
    for k in kinds:
        labels[k - 1] = k
    image = sitk.GetImageFromArray(labels)
    path = tmp_path / "kinds.seg.nrrd"
    write_segmentation(image, path, {k: v for k, v in kinds.items()}, {k: (0.1 * k, 0.2, 0.3) for k in kinds},
                       kinds=kinds)
    header = path.read_bytes().split(b"\n\n", 1)[0].decode()
    entries = dict(re.findall(r"Segment(\d)_Tags:=.*TerminologyEntry:([^|\n]*)", header))
    assert entries["0"] == ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~"
                            "SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~SCT^39607008^Lung~^^")
    assert entries["1"] == ("Segmentation category and type - DICOM master list~SCT^85756007^Tissue~"
                            "SCT^59820001^Blood vessel~^^~Anatomic codes - DICOM master list~SCT^39607008^Lung~^^")
    assert entries["2"].startswith("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical "
                                   "Structure~SCT^89187006^Airway structure~")
    assert entries["3"].split("~")[1:3] == ["SCT^123037004^Anatomical Structure", "SCT^39607008^Lung"]
    read = {s["labelValue"]: s for s in slicerio.read_segmentation(str(path))["segments"]}
    for k, kind in kinds.items():
        expected = terminology(kind)
        assert {key: read[k]["terminology"][key] for key in expected} == expected
    assert set(kinds.values()) <= set(SEGMENT_KINDS)
    with pytest.raises(ValueError, match="Unknown segment kind"):
        terminology("bone")
