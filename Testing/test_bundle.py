"""Model bundle: round trip, determinism, refusals (missing, tampered, truncated, wrong version,
malformed), editing names/colours, and the encoder rebuilt through networks.build_model."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from latentharmonize import bundle as bundle_mod
from latentharmonize.bundle import (ARRAYS_FILE, ENCODER_FILE, FORMAT_VERSION, MANIFEST, ModelBundle,
                                    default_bundle_path, load_bundle, save_bundle, set_cluster_names)
from latentharmonize.clusters import TissueClusters
from latentharmonize.errors import BundleError, InputError, OutputError
from latentharmonize.patches import PatchSpec
from latentharmonize.rotation import LatentRotation

D = 6
SPEC = PatchSpec(margin_mm=10.0)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    X = rng.normal(size=(120, D)) + np.repeat(rng.normal(scale=4, size=(3, D)), 40, axis=0)
    X[y == 1, 0] += 3.0
    rotation = LatentRotation(n_technical=1).fit(X, y)
    clusters = TissueClusters(n_clusters=3).fit(rotation.biological(X))
    return X, rotation, clusters


def make_bundle(fitted, state=None, config=None, **kw):
    _, rotation, clusters = fitted
    state = state if state is not None else torch.nn.Linear(D, 4).state_dict()
    args = dict(name="test model", encoder_config=config or {"kind": "ae", "latent_dim": D}, encoder_state=state,
                spec=SPEC, rotation=rotation, clusters=clusters, names=["a", "b", "c"], created="2026-01-01",
                training={"n_patients": 2, "seed": 0}, probe={"entangled": 0.9, "biological": 0.5, "chance": 0.5})
    args.update(kw)
    return ModelBundle.create(**args)


@pytest.fixture
def saved(fitted, tmp_path):
    return save_bundle(make_bundle(fitted), tmp_path / "model")


def test_round_trip(fitted, saved):
    X, rotation, clusters = fitted
    b = load_bundle(saved)
    np.testing.assert_array_equal(b.rotation.rotation_, rotation.rotation_)
    np.testing.assert_array_equal(b.rotation.mean_, rotation.mean_)
    np.testing.assert_array_equal(b.clusters.means_, clusters.means_)
    np.testing.assert_array_equal(b.clusters.covariances_, clusters.covariances_)
    np.testing.assert_array_equal(b.rotation.transform(X), rotation.transform(X))
    for got, want in zip(b.clusters.predict_with_confidence(b.rotation.biological(X)),
                         clusters.predict_with_confidence(rotation.biological(X))):
        np.testing.assert_array_equal(got, want)
    assert b.names == {1: "a", 2: "b", 3: "c"}
    assert set(b.colors) == {1, 2, 3} and all(len(c) == 3 for c in b.colors.values())
    assert b.spec == SPEC and b.manifest["format_version"] == FORMAT_VERSION
    assert b.manifest["rotation"]["n_technical"] == 1 and b.manifest["clusters"]["k"] == 3
    assert b.manifest["probe"]["biological"] == 0.5 and b.manifest["training"]["n_patients"] == 2
    ref = torch.nn.Linear(D, 4).state_dict()
    assert set(b.encoder_state) == set(ref)
    stored = json.loads((saved / MANIFEST).read_bytes())
    content = {k: v for k, v in stored.items() if k != bundle_mod.CHECKSUM_KEY}
    content_bytes = (json.dumps(content, indent=2, sort_keys=True) + "\n").encode("utf-8")
    assert b.sha256 == stored[bundle_mod.CHECKSUM_KEY] == hashlib.sha256(content_bytes).hexdigest()
    assert b.sha256 == make_bundle(fitted, state=b.encoder_state).sha256  # same content, same identity
    for fname in (ENCODER_FILE, ARRAYS_FILE):
        assert b.manifest["files"][fname] == hashlib.sha256((saved / fname).read_bytes()).hexdigest()


def test_save_is_deterministic_and_refuses_to_overwrite(fitted, tmp_path):
    torch.manual_seed(0)
    state = torch.nn.Linear(D, 4).state_dict()
    a = save_bundle(make_bundle(fitted, state=state), tmp_path / "a")
    b = save_bundle(make_bundle(fitted, state=state), tmp_path / "b")
    for fname in (MANIFEST, ENCODER_FILE, ARRAYS_FILE):
        assert (a / fname).read_bytes() == (b / fname).read_bytes()
    (a / ".checkpoints").mkdir()
    with pytest.raises(OutputError, match="overwrite"):
        save_bundle(make_bundle(fitted, state=state), a)
    save_bundle(make_bundle(fitted, state=state, name="second"), a, overwrite=True)
    assert load_bundle(a).manifest["name"] == "second"
    assert (a / ".checkpoints").is_dir()  # training checkpoints beside the bundle are left alone
    assert not [p for p in a.iterdir() if p.name.startswith(".latentharmonize-staging")]


def _edit_manifest(folder, change):
    """Change the manifest and re-seal it, as a faulty tool would: the deeper checks must still refuse it."""
    m = json.loads((folder / MANIFEST).read_text())
    change(m)
    (folder / MANIFEST).write_bytes(bundle_mod._sealed_manifest_bytes(m))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, match", [
    (lambda f: (f / ENCODER_FILE).unlink(), "missing encoder.safetensors"),
    (lambda f: (f / MANIFEST).unlink(), "no manifest.json"),
    (lambda f: _flip_byte(f / ARRAYS_FILE), "checksum"),
    (lambda f: _truncate(f / ENCODER_FILE), "checksum"),
    (lambda f: _edit_manifest(f, lambda m: m.update(format_version=FORMAT_VERSION + 1)), "newer LatentHarmonize"),
    (lambda f: _edit_manifest(f, lambda m: m.update(format_version=0)), "format version 0"),
    (lambda f: _edit_manifest(f, lambda m: m.pop("format_version")), "format_version"),
    (lambda f: _edit_manifest(f, lambda m: m.pop("patch_spec")), "malformed.*patch_spec"),
    (lambda f: _edit_manifest(f, lambda m: m["patch_spec"].pop("hu_window")), "patch spec lacks"),
    (lambda f: _edit_manifest(f, lambda m: m["files"].pop(ARRAYS_FILE)), "does not list arrays"),
    (lambda f: _edit_manifest(f, lambda m: m["clusters"]["names"].pop()), "clusters section"),
    (lambda f: _edit_manifest(f, lambda m: m["rotation"].update(n_technical=2)), "cluster features have 4"),
    (lambda f: _edit_manifest(f, lambda m: m["rotation"]["params"].update(harmonized_columns=3)),
     "read 3 harmonized columns, but the patch spec appends 0 densitometry columns"),
    (lambda f: _edit_manifest(f, lambda m: m["patch_spec"].update(densitometry={"weight": 1.0, "center": [0.0] * 8,
                                                                                "scale": [1.0] * 8})),
     r"with the patch densitometry, if any\) is 14"),
    (lambda f: _edit_manifest(f, lambda m: m["patch_spec"].update(densitometry={"weight": 1.0})),
     "patch spec is invalid: densitometry must be null"),
    (lambda f: (f / MANIFEST).write_text("{not json"), "not valid JSON"),
    (lambda f: (f / MANIFEST).write_text("[1, 2]"), "JSON object"),
])
def test_damaged_bundles_are_refused(saved, damage, match):
    damage(saved)
    with pytest.raises(BundleError, match=match):
        load_bundle(saved)


def test_missing_folder_and_default_path(tmp_path, monkeypatch):
    with pytest.raises(BundleError, match="No model bundle folder"):
        load_bundle(tmp_path / "nowhere")
    assert default_bundle_path().parts[-4:] == ("LatentHarmonize", "Resources", "Models", "default")
    monkeypatch.setattr(bundle_mod, "default_bundle_path", lambda: tmp_path / "default")
    with pytest.raises(BundleError, match="default model bundle is not installed"):
        load_bundle()


def test_set_cluster_names(saved):
    before = load_bundle(saved)
    after = set_cluster_names(saved, {2: "emphysema-like"}, {3: (1.0, 0.0, 0.5)})
    assert after.names == {1: "a", 2: "emphysema-like", 3: "c"}
    assert after.colors[3] == (1.0, 0.0, 0.5) and after.colors[1] == before.colors[1]
    assert after.sha256 != before.sha256  # names are part of the model's identity
    assert set_cluster_names(saved, ["x", "y", "z"]).names == {1: "x", 2: "y", 3: "z"}
    assert set_cluster_names(saved, {"1": "w"}).names[1] == "w"  # labels as read from JSON
    with pytest.raises(InputError, match="unique"):
        set_cluster_names(saved, {1: "y"})
    with pytest.raises(InputError, match="Unknown cluster label"):
        set_cluster_names(saved, {7: "q"})
    with pytest.raises(InputError, match="three floats"):
        set_cluster_names(saved, colors={1: (2.0, 0, 0)})
    _flip_byte(saved / ENCODER_FILE)
    with pytest.raises(BundleError, match="checksum"):
        set_cluster_names(saved, {1: "p"})


def test_probe_defaults_to_the_rotation_measurement(fitted):
    b = make_bundle(fitted, probe=None)
    rot = fitted[1]
    assert b.manifest["probe"] == {"entangled": rot.probe_entangled_, "biological": rot.probe_biological_,
                                   "chance": rot.chance_}


def test_create_validates_inputs(fitted):
    with pytest.raises(InputError, match="Need 3 cluster names"):
        make_bundle(fitted, names=["a", "b"])
    with pytest.raises(InputError, match="kind"):
        make_bundle(fitted, config={"latent_dim": D})
    with pytest.raises(BundleError, match="latent size"):
        make_bundle(fitted, config={"kind": "ae", "latent_dim": D + 1})


def test_encoder_is_rebuilt_through_networks(fitted, tmp_path):
    networks = pytest.importorskip("latentharmonize.networks")
    model = networks.build_model("ae", seed=0, latent_dim=D, width=8)
    path = save_bundle(make_bundle(fitted, state=model.state_dict(), config=model.config), tmp_path / "m")
    b = load_bundle(path)
    enc = b.encoder("cpu")
    assert not enc.training
    x = torch.rand(2, 3, 24, 24)
    with torch.inference_mode():
        np.testing.assert_array_equal(enc.encode_dense(x).numpy(), model.eval().encode_dense(x).numpy())
        assert b.decoder("cpu")(torch.zeros(2, D)).shape[0] == 2
    state = dict(model.state_dict())
    state.pop(next(iter(state)))
    broken = save_bundle(make_bundle(fitted, state=state, config=model.config), tmp_path / "broken")
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(broken).encoder()


# ----------------------------------------------------------------------------- tampering (issue 21)
def _reseal_with(folder, fname, data):
    """Replace a data file and give the manifest its checksum and a valid seal: only the content checks remain."""
    (folder / fname).write_bytes(data)
    _edit_manifest(folder, lambda m: m["files"].update({fname: hashlib.sha256(data).hexdigest()}))


def test_edited_manifest_is_refused_by_its_checksum(saved):
    m = json.loads((saved / MANIFEST).read_text())
    m["patch_spec"]["hu_window"] = [-1000.0, 200.0]  # a plausible edit that would change every result
    (saved / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    with pytest.raises(BundleError, match="does not match its checksum"):
        load_bundle(saved)
    m.pop(bundle_mod.CHECKSUM_KEY)
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="has no checksum"):
        load_bundle(saved)


@pytest.mark.parametrize("entry", ["../../etc/shadow", "extra.bin"])
def test_unknown_or_path_like_file_entries_are_refused(saved, entry):
    _edit_manifest(saved, lambda m: m["files"].update({entry: "0" * 64}))
    with pytest.raises(BundleError, match="file entries this format does not have"):
        load_bundle(saved)


@pytest.mark.parametrize("array", ["clusters.means", "rotation.mean"])
def test_nan_arrays_with_matching_checksums_are_refused(saved, array):
    from safetensors.numpy import load, save

    arrays = load((saved / ARRAYS_FILE).read_bytes())
    arrays[array] = np.full_like(arrays[array], np.nan)
    _reseal_with(saved, ARRAYS_FILE, save(arrays))
    with pytest.raises(BundleError, match="NaN or infinite"):
        load_bundle(saved)


def test_nan_encoder_weights_are_refused(saved):
    from safetensors.torch import load, save

    state = load((saved / ENCODER_FILE).read_bytes())
    state["bias"][0] = float("inf")
    _reseal_with(saved, ENCODER_FILE, save(state))
    with pytest.raises(BundleError, match=r"NaN or infinite numbers in encoder.safetensors:bias"):
        load_bundle(saved)


@pytest.mark.parametrize("key, value", [("margin_mm", 1e9), ("margin_mm", -1.0), ("spacing", [1.25, 0.0, 2.5]),
                                        ("hu_window", [-1e6, 300.0]), ("outside_fill_hu", 900.0),
                                        ("context_radius", 1.5), ("min_lung_fraction", 2.0)])
def test_settings_out_of_range_are_refused(saved, key, value):
    _edit_manifest(saved, lambda m: m["patch_spec"].update({key: value}))
    with pytest.raises(BundleError, match=f"out of range or not finite: .*{key}"):
        load_bundle(saved)


def test_nan_in_the_manifest_is_refused(saved):
    text = (saved / MANIFEST).read_text().replace('"margin_mm": 10.0', '"margin_mm": NaN')
    assert "NaN" in text
    (saved / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match="not valid JSON.*NaN"):
        load_bundle(saved)


def test_default_bundle_is_sealed():
    """The shipped bundle carries the checksum save_bundle writes, and it verifies."""
    manifest = json.loads((default_bundle_path() / MANIFEST).read_text())
    assert load_bundle().sha256 == manifest[bundle_mod.CHECKSUM_KEY]


def test_a_pickle_in_place_of_the_weights_is_never_executed(saved, tmp_path):
    """A pickle that would run code when unpickled, given matching checksums: refused, and nothing ran."""
    import pickle

    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _reseal_with(saved, ENCODER_FILE, pickle.dumps(Payload()))
    with pytest.raises(BundleError, match="Cannot read the weights"):
        load_bundle(saved)
    assert not marker.exists()
