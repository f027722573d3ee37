"""Patch encoders and decoders: plain autoencoder, beta-VAE and unORANIC-style anatomy/characteristics model.

The encoder is fully convolutional with valid (unpadded) convolutions only: two stride-2 kernel-2 stages
(non-overlapping 4 x 4 cells), 1 x 1 mixing, then a kernel-4 valid convolution over 4 x 4 cells. A 2.5D patch of
3 slices x 16 x 16 px therefore maps to exactly one latent, and a whole slab [B, 3, H, W] maps to a dense map
[B, D, (H - 16) // 4 + 1, (W - 16) // 4 + 1] whose entry (i, j) is *exactly* the latent of the patch whose top-left
pixel is (4 i, 4 j). Analyze encodes whole slabs at once; training uses single patches. No normalisation layer
depends on the spatial extent (none is used), which keeps the two paths identical.

Every model exposes ``encode(x) -> [B, D]``, ``encode_dense(slab) -> [B, D, H', W']``, ``reconstruct(x)`` and
``loss(batch) -> dict`` (key ``"loss"`` is the total to minimise), so one training loop drives all variants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .densitometry import LAA_THRESHOLD_HU
from .errors import InputError

PATCH_SIZE = 16
SLICES = 3
STRIDE = 4
DEFAULT_LATENT_DIM = 24
DEFAULT_WIDTH = 32


class PatchEncoder(nn.Module):
    """3 x 16 x 16 patch -> ``out_channels`` latent; dense over slabs with in-plane stride 4."""

    patch_size = PATCH_SIZE
    stride = STRIDE

    def __init__(self, out_channels: int = DEFAULT_LATENT_DIM, width: int = DEFAULT_WIDTH, in_channels: int = SLICES):
        super().__init__()
        act = nn.LeakyReLU(0.1)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 2, stride=2), act,
            nn.Conv2d(width, width, 1), act,
            nn.Conv2d(width, 2 * width, 2, stride=2), act,
            nn.Conv2d(2 * width, 2 * width, 1), act,
            nn.Conv2d(2 * width, 4 * width, 4), act,  # valid: receptive field 16 px, stride 4
            nn.Conv2d(4 * width, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] < PATCH_SIZE or x.shape[-2] < PATCH_SIZE:
            raise ValueError(f"expected [B, {SLICES}, H>=16, W>=16], got {tuple(x.shape)}")
        return self.body(x)


class PatchDecoder(nn.Module):
    """Latent vector -> 3 x 16 x 16 patch (normalised intensities)."""

    def __init__(self, in_features: int, width: int = DEFAULT_WIDTH, out_channels: int = SLICES):
        super().__init__()
        self.width = width
        act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(in_features, 2 * width * 4 * 4)
        self.body = nn.Sequential(
            act,
            nn.ConvTranspose2d(2 * width, width, 2, stride=2), act,
            nn.Conv2d(width, width, 3, padding=1), act,
            nn.ConvTranspose2d(width, width, 2, stride=2), act,
            nn.Conv2d(width, out_channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).view(-1, 2 * self.width, 4, 4))


class LowAttenuationChannels(nn.Module):
    """Append to each slice a soft indicator of voxels below ``threshold_hu``: [B, S, H, W] -> [B, 2S, H, W].

    Emphysematous air spaces lie about 90 HU below normal parenchyma, a few percent of the intensity window, so in
    the intensity channels alone they hardly move the reconstruction error, while one vessel moves it by the whole
    window; the autoencoder then spends its latent on vessels. Reconstructing this channel too makes it keep the
    low-attenuation pattern. Elementwise, so dense slab encoding stays exact.
    """

    def __init__(self, hu_window, threshold_hu: float = LAA_THRESHOLD_HU, width_hu: float = 15.0):
        super().__init__()
        low, high = (float(v) for v in hu_window)
        if not high > low:
            raise InputError(f"hu_window must be [low, high] with low < high, got {list(hu_window)}.")
        self.low, self.span, self.threshold, self.width = low, high - low, float(threshold_hu), float(width_hu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hu = self.low + self.span * x
        return torch.cat([x, torch.sigmoid((self.threshold - hu) / self.width)], 1)


def _training_views(batch: dict) -> torch.Tensor:
    """Both views of a paired batch as independent samples (single-view batches pass through)."""
    x = batch["x"]
    return torch.cat([x, batch["x_pair"]]) if "x_pair" in batch else x


class _PatchModel(nn.Module):
    kind = ""
    patch_size = PATCH_SIZE
    stride = STRIDE

    def __init__(self, **config):
        super().__init__()
        self.config = {"kind": self.kind, **config}

    @property
    def latent_dim(self) -> int:
        return int(self.config["latent_dim"])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Patches [B, 3, 16, 16] (normalised intensities) decoded from latents [B, D], for latent traversals."""
        return self.decoder(z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent [B, D] of 3 x 16 x 16 patches."""
        if x.shape[-2:] != (PATCH_SIZE, PATCH_SIZE):
            raise ValueError(f"encode() takes 16 x 16 patches, got {tuple(x.shape)}; use encode_dense() for slabs")
        return self.encode_dense(x).flatten(1)


class AutoEncoder(_PatchModel):
    """Plain autoencoder; with ``low_attenuation_hu`` (and the spec's ``hu_window``) it also encodes and
    reconstructs ``LowAttenuationChannels``, weighted like the intensities."""

    kind = "ae"

    def __init__(self, latent_dim: int = DEFAULT_LATENT_DIM, width: int = DEFAULT_WIDTH,
                 low_attenuation_hu: float | None = None, hu_window=None):
        if low_attenuation_hu is not None and hu_window is None:
            raise InputError("low_attenuation_hu needs the hu_window the patches were normalised with.")
        extra = {} if low_attenuation_hu is None else {"low_attenuation_hu": float(low_attenuation_hu),
                                                       "hu_window": [float(v) for v in hu_window]}
        super().__init__(latent_dim=latent_dim, width=width, **extra)
        self.channels = None if low_attenuation_hu is None else LowAttenuationChannels(hu_window, low_attenuation_hu)
        n_channels = SLICES if self.channels is None else 2 * SLICES
        self.encoder = PatchEncoder(latent_dim, width, in_channels=n_channels)
        self.decoder = PatchDecoder(latent_dim, width, out_channels=n_channels)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.channels is None else self.channels(x)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._inputs(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)[:, :SLICES]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, batch: dict) -> dict:
        inputs = self._inputs(_training_views(batch))
        out = self.decoder(self.encoder(inputs).flatten(1))
        recon = F.mse_loss(out[:, :SLICES], inputs[:, :SLICES])
        if self.channels is None:
            return {"loss": recon, "recon": recon}
        low = F.mse_loss(out[:, SLICES:], inputs[:, SLICES:])
        return {"loss": recon + low, "recon": recon, "low_attenuation": low}


class VariationalAutoEncoder(_PatchModel):
    """beta-VAE; the posterior mean is the latent used downstream.

    ``beta`` weighs the KL divergence (nats per patch) against the mean squared error per pixel.
    """

    kind = "vae"

    def __init__(self, latent_dim: int = DEFAULT_LATENT_DIM, width: int = DEFAULT_WIDTH, beta: float = 1e-4):
        super().__init__(latent_dim=latent_dim, width=width, beta=beta)
        self.encoder = PatchEncoder(2 * latent_dim, width)
        self.decoder = PatchDecoder(latent_dim, width)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[:, : self.latent_dim]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))

    def loss(self, batch: dict) -> dict:
        x = _training_views(batch)
        stats = self.encoder(x).flatten(1)
        mu, logvar = stats[:, : self.latent_dim], stats[:, self.latent_dim:].clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
        recon = F.mse_loss(self.decoder(z), x)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        return {"loss": recon + self.config["beta"] * kl, "recon": recon, "kl": kl}


class UnoranicModel(_PatchModel):
    """unORANIC-style model (Doerrich et al.): anatomy and characteristics encoders.

    Training needs paired views (``x``, ``x_pair``): one lung location under two acquisitions. The anatomy latents
    of the two views are pulled together (consistency loss, relative to their spread so it cannot be met by
    shrinking the latent); anatomy + characteristics reconstruct each view; the anatomy decoder alone reconstructs
    the *other* view, so acquisition-specific detail has to live in the characteristics branch. The anatomy latent
    is the representation.
    """

    kind = "unoranic"

    def __init__(self, latent_dim: int = DEFAULT_LATENT_DIM, width: int = DEFAULT_WIDTH, char_dim: int = 8,
                 consistency_weight: float = 0.01):
        super().__init__(latent_dim=latent_dim, width=width, char_dim=char_dim, consistency_weight=consistency_weight)
        self.anatomy_encoder = PatchEncoder(latent_dim, width)
        self.characteristics_encoder = PatchEncoder(char_dim, max(width // 2, 8))
        self.decoder = PatchDecoder(latent_dim + char_dim, width)
        self.anatomy_decoder = PatchDecoder(latent_dim, width)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.anatomy_encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.anatomy_decoder(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        chars = self.characteristics_encoder(x).flatten(1)
        return self.decoder(torch.cat([self.encode(x), chars], 1))

    def loss(self, batch: dict) -> dict:
        if "x_pair" not in batch:
            raise InputError("The unoranic encoder needs paired patches (each patient scanned under at least two "
                             "acquisitions). Use --encoder ae or vae for cohorts without pairs.")
        x1, x2 = batch["x"], batch["x_pair"]
        a1, a2 = self.encode(x1), self.encode(x2)
        c1 = self.characteristics_encoder(x1).flatten(1)
        c2 = self.characteristics_encoder(x2).flatten(1)
        recon = 0.5 * (F.mse_loss(self.decoder(torch.cat([a1, c1], 1)), x1)
                       + F.mse_loss(self.decoder(torch.cat([a2, c2], 1)), x2))
        cross = 0.5 * (F.mse_loss(self.anatomy_decoder(a1), x2) + F.mse_loss(self.anatomy_decoder(a2), x1))
        spread = 0.5 * (a1.var(0) + a2.var(0)).mean() + 1e-4
        consistency = F.mse_loss(a1, a2) / spread
        total = recon + cross + self.config["consistency_weight"] * consistency
        return {"loss": total, "recon": recon, "cross": cross, "consistency": consistency}


MODEL_KINDS = {cls.kind: cls for cls in (AutoEncoder, VariationalAutoEncoder, UnoranicModel)}


def build_model(kind: str = "ae", seed: int | None = None, **kwargs) -> _PatchModel:
    """Build an encoder model by name (``ae``, ``vae``, ``unoranic``); ``seed`` fixes the initial weights.

    ``model.config`` holds everything needed to build it again: ``build_model(**model.config)``.
    """
    if kind not in MODEL_KINDS:
        raise InputError(f"Unknown encoder {kind!r}; choose one of {', '.join(MODEL_KINDS)}.")
    if seed is None:
        return MODEL_KINDS[kind](**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_KINDS[kind](**kwargs)
