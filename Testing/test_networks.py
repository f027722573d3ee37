"""Encoder networks: dense slab encoding equals patchwise encoding; every variant learns."""
from __future__ import annotations

import pytest
import torch

from latentharmonize.errors import InputError
from latentharmonize.networks import MODEL_KINDS, LowAttenuationChannels, build_model

torch.set_num_threads(1)

LOW_ATTENUATION = {"low_attenuation_hu": -950.0, "hu_window": [-1100.0, 300.0]}
VARIANTS = [pytest.param(kind, {}, id=kind) for kind in sorted(MODEL_KINDS)] + [
    pytest.param("ae", LOW_ATTENUATION, id="ae-low-attenuation")]


def paired_patches(n: int = 32, seed: int = 0) -> dict:
    """Two 'acquisitions' of the same random smooth texture: shared content, view-specific noise and offset."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.rand(n, 3, 20, 20, generator=g), 5, stride=1)  # 16 x 16
    x = 0.2 + 0.5 * base + 0.02 * torch.randn(n, 3, 16, 16, generator=g)
    x_pair = 0.25 + 0.5 * base + 0.05 * torch.randn(n, 3, 16, 16, generator=g)
    return {"x": x, "x_pair": x_pair}


@pytest.mark.parametrize("kind, extra", VARIANTS)
def test_dense_encoding_equals_patchwise_encoding(kind, extra):
    model = build_model(kind, seed=1, latent_dim=8, width=8, **extra).eval()
    slab = torch.rand(2, 3, 37, 45, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model.encode_dense(slab)
        assert dense.shape == (2, 8, (37 - 16) // 4 + 1, (45 - 16) // 4 + 1)
        for i in range(dense.shape[2]):
            for j in range(dense.shape[3]):
                patch = slab[:, :, 4 * i: 4 * i + 16, 4 * j: 4 * j + 16]
                torch.testing.assert_close(dense[:, :, i, j], model.encode(patch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, extra", VARIANTS)
def test_each_variant_loss_decreases(kind, extra):
    torch.manual_seed(0)
    model = build_model(kind, seed=0, latent_dim=8, width=8, **extra)
    batch = paired_patches()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        out = model.loss(batch)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert set(out) >= {"loss", "recon"}


def test_low_attenuation_channel_marks_voxels_below_the_threshold():
    hu = torch.tensor([-1050.0, -990.0, -950.0, -910.0, -850.0, 40.0]).view(1, 1, 1, 6)
    x = (hu + 1100.0) / 1400.0  # normalised over the [-1100, 300] window, as patches are
    out = LowAttenuationChannels([-1100.0, 300.0], threshold_hu=-950.0, width_hu=15.0)(x)
    assert out.shape == (1, 2, 1, 6)
    torch.testing.assert_close(out[:, :1], x)  # intensities pass through unchanged
    low = out[0, 1, 0]
    assert low[:2].min() > 0.9 and abs(low[2].item() - 0.5) < 1e-5 and low[3:].max() < 0.1


def test_low_attenuation_model_decodes_intensities_only_and_rebuilds():
    model = build_model("ae", seed=2, latent_dim=6, width=8, **LOW_ATTENUATION)
    assert model.config == {"kind": "ae", "latent_dim": 6, "width": 8, **LOW_ATTENUATION}
    assert model.encoder.body[0].in_channels == 6  # 3 slices + 3 low-attenuation channels
    z = torch.zeros(2, 6)
    assert model.decode(z).shape == (2, 3, 16, 16) and model.decoder(z).shape == (2, 6, 16, 16)
    rebuilt = build_model(**model.config, seed=2)
    rebuilt.load_state_dict(model.state_dict())
    patch = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rebuilt.encode(patch), model.encode(patch))
    assert "low_attenuation" in model.loss({"x": patch})


def test_build_model_is_seeded_and_rebuildable():
    a = build_model("vae", seed=3, latent_dim=6, width=8)
    b = build_model(**a.config, seed=3)
    assert a.config == {"kind": "vae", "latent_dim": 6, "width": 8, "beta": 1e-4}
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    c = build_model("vae", seed=4, latent_dim=6, width=8)
    assert not torch.equal(a.state_dict()["encoder.body.0.weight"], c.state_dict()["encoder.body.0.weight"])


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="Unknown encoder 'gan'"):
        build_model("gan")
    model = build_model("ae", latent_dim=4, width=8)
    with pytest.raises(ValueError, match="16 x 16"):
        model.encode(torch.zeros(1, 3, 20, 20))
    with pytest.raises(InputError, match="needs the hu_window"):
        build_model("ae", latent_dim=4, width=8, low_attenuation_hu=-950.0)
    with pytest.raises(InputError, match="paired"):
        build_model("unoranic", latent_dim=4, width=8).loss({"x": torch.zeros(2, 3, 16, 16)})
