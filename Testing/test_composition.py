"""Composition table: fractions, volumes and HU statistics per lung region and cluster."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from latentharmonize.composition import composition_table, composition_to_json, lung_volumes_from_table
from latentharmonize.errors import InputError

NAMES = {1: "normal", 2: "emphysema", 3: "dense"}


def _image(array, spacing=(0.8, 0.9, 2.0), origin=(-10.0, 5.0, 30.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _scan(seed=0, shape=(12, 10, 14)):
    """Random labels and HU inside a two-lung mask (right lung x < 7, left lung x >= 7)."""
    rng = np.random.default_rng(seed)
    lungs = np.zeros(shape, np.uint8)
    lungs[1:-1, 2:-2, 1:7] = 1
    lungs[2:-2, 2:-2, 7:-1] = 2
    labels = np.where(lungs > 0, rng.integers(1, 4, size=shape), 0).astype(np.uint8)
    hu = rng.normal(-800, 60, size=shape).astype(np.int16)
    return labels, hu, lungs


def _expected(labels, hu, lungs, spacing, z_of_slice):
    """Brute-force reference via pandas groupby over every lung voxel."""
    zz = np.broadcast_to(z_of_slice[:, None, None], labels.shape)
    inside = lungs > 0
    df = pd.DataFrame({"label": labels[inside], "hu": hu[inside].astype(float), "side": lungs[inside], "z": zz[inside]})
    t = (df.z - df.z.min()) / (df.z.max() - df.z.min())
    regions = {"whole": df.index == df.index, "right": df.side == 1, "left": df.side == 2,
               "upper": t >= 2 / 3, "middle": (t >= 1 / 3) & (t < 2 / 3), "lower": t < 1 / 3}
    out = {}
    for region, m in regions.items():
        sub = df[m]
        for label, grp in sub.groupby("label"):
            out[(region, label)] = (len(grp) / len(sub), len(grp) * np.prod(spacing) / 1000, grp.hu.mean(), grp.hu.std(ddof=0))
    return out


def test_matches_brute_force_and_fractions_sum_to_one():
    labels, hu, lungs = _scan()
    spacing, origin = (0.8, 0.9, 2.0), (-10.0, 5.0, 30.0)
    table = composition_table(_image(labels), _image(hu), _image(lungs), NAMES)
    assert list(table.columns) == ["region", "label", "name", "fraction", "volume_ml", "mean_hu", "sd_hu"]
    assert set(table.region) == {"whole", "right", "left", "upper", "middle", "lower"}
    np.testing.assert_allclose(table.groupby("region").fraction.sum(), 1.0)
    expected = _expected(labels, hu, lungs, spacing, origin[2] + spacing[2] * np.arange(labels.shape[0]))
    for row in table.itertuples():
        frac, vol, mean, sd = expected[(row.region, row.label)]
        assert row.name == NAMES[row.label]
        np.testing.assert_allclose([row.fraction, row.volume_ml, row.mean_hu, row.sd_hu], [frac, vol, mean, sd], rtol=1e-9)


def test_zones_follow_physical_z_not_slice_index():
    labels, hu, lungs = _scan()
    flipped = (1, 0, 0, 0, 1, 0, 0, 0, -1)  # slice index grows towards the feet
    table = composition_table(*(_image(a, direction=flipped) for a in (labels, hu, lungs)), NAMES)
    z = 30.0 - 2.0 * np.arange(labels.shape[0])
    expected = _expected(labels, hu, lungs, (0.8, 0.9, 2.0), z)
    upper = table[table.region == "upper"]
    for row in upper.itertuples():
        np.testing.assert_allclose(row.fraction, expected[("upper", row.label)][0])
    # the upper zone is made of the first slices when z runs downwards
    lung_slices = np.flatnonzero((lungs > 0).any(axis=(1, 2)))
    top = z[lung_slices] >= z[lung_slices].min() + 2 / 3 * np.ptp(z[lung_slices])
    assert lung_slices[top].max() < lung_slices[~top].min()
    assert upper.volume_ml.sum() == pytest.approx((lungs[lung_slices[top]] > 0).sum() * 0.8 * 0.9 * 2.0 / 1000)


def test_oblique_scan_other_mask_values_and_wide_label_type_match_brute_force():
    """The combined-index computation against per-region masks, on the general case: z depends on every index,
    a mask value that is neither lung side, an Int16 label map with negative and unknown labels."""
    labels, hu, lungs = _scan(seed=3)
    lungs[3:5, 3:6, 2:5] = 7  # counts for the whole lung and the zones only
    labels = labels.astype(np.int16)
    labels[lungs > 0] = np.random.default_rng(4).integers(-2, 6, size=int((lungs > 0).sum()))
    c, s = np.cos(0.4), np.sin(0.4)
    oblique = (c, 0.0, s, s * s, c, -s * c, -s * c, s, c * c)  # rotation about y, then x
    images = [_image(a, direction=oblique) for a in (labels, hu, lungs)]
    table = composition_table(*images, NAMES)

    inside = lungs > 0
    index = np.argwhere(inside)
    z = np.array([images[0].TransformIndexToPhysicalPoint([int(i) for i in k[::-1]])[2] for k in index])
    t = (z - z.min()) / (z.max() - z.min())
    lab = np.where(np.isin(labels[inside], list(NAMES)), labels[inside], 0)
    side, values = lungs[inside], hu[inside].astype(float)
    regions = {"whole": np.ones(len(z), bool), "right": side == 1, "left": side == 2,
               "upper": t >= 2 / 3, "middle": (t >= 1 / 3) & (t < 2 / 3), "lower": t < 1 / 3}
    assert len(table) == sum(len(set(lab[m]) | set(NAMES)) for m in regions.values())
    for row in table.itertuples():
        m = regions[row.region]
        sel = m & (lab == row.label)
        assert row.name == NAMES.get(row.label, "unlabelled")
        np.testing.assert_allclose([row.fraction, row.volume_ml], [sel.sum() / m.sum(), sel.sum() * 0.8 * 0.9 * 2 / 1000])
        if sel.any():
            np.testing.assert_allclose([row.mean_hu, row.sd_hu], [values[sel].mean(), values[sel].std()], rtol=1e-9)


def test_unlabelled_lung_voxels_and_empty_clusters():
    labels, hu, lungs = _scan()
    labels[labels == 3] = 0  # erased in an editor: lung voxels without a cluster
    labels[0, 0, 0] = 2  # a label outside the lung is ignored
    table = composition_table(_image(labels), _image(hu), _image(lungs), NAMES)
    whole = table[table.region == "whole"].set_index("label")
    assert whole.loc[0, "name"] == "unlabelled"
    assert whole.loc[3, "fraction"] == 0 and np.isnan(whole.loc[3, "mean_hu"])
    np.testing.assert_allclose(whole.fraction.sum(), 1.0)
    assert whole.loc[2, "volume_ml"] == pytest.approx(((labels == 2) & (lungs > 0)).sum() * 0.8 * 0.9 * 2 / 1000)


def test_missing_side_is_left_out():
    labels, hu, lungs = _scan()
    lungs[lungs == 2] = 1
    table = composition_table(_image(labels), _image(hu), _image(lungs), NAMES)
    assert "left" not in set(table.region) and "right" in set(table.region)


@pytest.mark.parametrize("problem", ["geometry", "empty", "no_names"])
def test_bad_inputs(problem):
    labels, hu, lungs = _scan()
    ct = _image(hu)
    names = NAMES
    if problem == "geometry":
        ct = _image(hu, spacing=(1.0, 1.0, 1.0))
    elif problem == "empty":
        lungs[:] = 0
    else:
        names = {}
    with pytest.raises(InputError):
        composition_table(_image(labels), ct, _image(lungs), names)


def test_json_is_valid_deterministic_and_complete():
    labels, hu, lungs = _scan()
    labels[labels == 3] = 0
    table = composition_table(_image(labels), _image(hu), _image(lungs), NAMES)
    colors = {1: (0.1, 0.2, 0.3), 2: (0.4, 0.5, 0.6), 3: (0.7, 0.8, 0.9)}
    text = composition_to_json(table, NAMES, colors, model_id="abc")
    assert text == composition_to_json(table, NAMES, colors, model_id="abc")
    doc = json.loads(text)
    assert doc["model_sha256"] == "abc"
    assert [c["name"] for c in doc["clusters"]] == ["normal", "emphysema", "dense"]
    assert doc["clusters"][1]["color"] == [0.4, 0.5, 0.6]
    vols = lung_volumes_from_table(table)
    assert doc["lung_volumes_ml"]["total"] == pytest.approx(vols["right"] + vols["left"], rel=1e-6)
    dense = [r for r in doc["regions"]["whole"] if r["label"] == 3][0]
    assert dense["mean_hu"] is None and dense["fraction"] == 0
