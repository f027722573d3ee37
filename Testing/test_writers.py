"""Writers: the seg.nrrd reads back in slicerio (as Slicer would) with names, colours, labels and geometry."""
from __future__ import annotations

import json

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
