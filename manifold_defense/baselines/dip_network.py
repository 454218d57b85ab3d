"""The network side of the CS-DIP baseline (:mod:`manifold_defense.baselines.dip`).

Papers: Ulyanov, Vedaldi, Lempitsky 2018, "Deep Image Prior"; Van Veen et al. 2018, "Compressed Sensing with
Deep Image Prior and Learned Regularization" (code: davevanveen/compsensing_dip).

Holds CS-DIP's DCGAN-style generator generalised to any image size (:class:`DIPGenerator`, sigmoid output in
[0, 1]), its initialisation from an explicit ``torch.Generator`` (:func:`init_dip_parameters`) and the initial
state of one network from ``(seed, restart)`` alone, and the learned regularizer's Gaussian on the per-layer
mean weights (:class:`LayerGaussianPrior`, serialised with safetensors). The fitting loops,
:func:`~manifold_defense.baselines.dip.dip_recover` and
:func:`~manifold_defense.baselines.dip.fit_learned_regularizer`, are in :mod:`manifold_defense.baselines.dip`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = ["DIPGenerator", "LayerGaussianPrior", "init_dip_parameters"]


def _image_shape(image_shape: object) -> tuple[int, int, int]:
    if not isinstance(image_shape, Sequence) or isinstance(image_shape, str):
        raise TypeError(f"expected image_shape as a tuple (C, H, W) or (H, W), got {image_shape!r}")
    shape = tuple(image_shape)
    if len(shape) not in (2, 3) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(f"expected image_shape (C, H, W) or (H, W) of positive ints, got {image_shape!r}")
    if len(shape) == 2:
        shape = (1, *shape)
    c, h, w = (int(s) for s in shape)
    if h < 4 or w < 4:
        raise ValueError(f"expected image height and width >= 4 for the DIP generator, got {h}x{w}")
    return c, h, w


def _num_upsamplings(h: int, w: int) -> int:
    k = 0
    while (
        h % 2 ** (k + 1) == 0 and w % 2 ** (k + 1) == 0 and h // 2 ** (k + 1) >= 4 and w // 2 ** (k + 1) >= 4
    ):
        k += 1
    return k


class DIPGenerator(nn.Module):
    """CS-DIP's DCGAN-style generator, generalised to any image size, with a sigmoid output in [0, 1].

    For 28 x 28 it is exactly CS-DIP's ``DCGAN_MNIST`` (sigmoid instead of tanh):
    ``z (k,1,1) -> ConvT k2 (2x2) -> up (4x4) -> ConvT k4 (7x7) -> ConvT k3 -> up (14) -> ConvT k3 -> up (28)
    -> ConvT k3 -> image``, with BatchNorm + ReLU after every hidden layer and nearest-neighbour upsampling.
    In general, ``u`` = the number of times H and W can both be halved while staying >= 4; the second layer
    maps 4x4 to the base size ``(H, W) / 2**u`` and ``u`` blocks upsample to (H, W). BatchNorm always uses the
    statistics of its input (``track_running_stats=False``): each network sees one ``z``, so it normalizes
    over spatial positions as CS-DIP's batch-size-1 training does, and nothing couples networks.

    Construction draws no random numbers; initialise with :func:`init_dip_parameters`.

    Args:
        latent_dim: channels of the (latent_dim, 1, 1) input ``z``.
        image_shape: ``(C, H, W)`` or ``(H, W)``, H, W >= 4.
        ngf: base filter count (CS-DIP: 64).
    Shapes: ``(N, latent_dim)`` or ``(N, latent_dim, 1, 1)`` -> ``(N, C, H, W)``.
    """

    def __init__(self, latent_dim: int, image_shape: Sequence[int], ngf: int = 64) -> None:
        super().__init__()
        c, h, w = _image_shape(image_shape)
        self.latent_dim = int(latent_dim)
        self.image_shape = (c, h, w)
        up = _num_upsamplings(h, w)
        base = (h // 2**up, w // 2**up)
        with torch.device("meta"):  # no parameter initialisation (and no global RNG use) here
            layers: list[nn.Module] = [
                nn.ConvTranspose2d(latent_dim, ngf * 8, 2, 1, 0, bias=False),
                nn.BatchNorm2d(ngf * 8, track_running_stats=False),
                nn.ConvTranspose2d(ngf * 8, ngf * 4, (base[0] - 3, base[1] - 3), 1, 0, bias=False),
                nn.BatchNorm2d(ngf * 4, track_running_stats=False),
            ]
            channels = ngf * 4
            for j in range(up):
                out = max(ngf, (ngf * 4) // 2 ** (j + 1))
                layers += [
                    nn.ConvTranspose2d(channels, out, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(out, track_running_stats=False),
                ]
                channels = out
            layers.append(nn.ConvTranspose2d(channels, c, 3, 1, 1, bias=False))
        self.layers = nn.ModuleList(layers)
        self.num_upsamplings = up
        self.to_empty(device="cpu")
        init_dip_parameters(self, torch.Generator().manual_seed(0))

    def forward(self, z: Tensor) -> Tensor:
        x = z.reshape(z.shape[0], self.latent_dim, 1, 1)
        x = F.relu(self.layers[1](self.layers[0](x)))
        x = F.interpolate(x, scale_factor=2.0)
        x = F.relu(self.layers[3](self.layers[2](x)))
        for j in range(self.num_upsamplings):
            x = F.relu(self.layers[5 + 2 * j](self.layers[4 + 2 * j](x)))
            x = F.interpolate(x, scale_factor=2.0)
        return torch.sigmoid(self.layers[-1](x))


def init_dip_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise a :class:`DIPGenerator` in place as PyTorch's defaults would, but from ``generator``.

    Transposed convolutions: ``kaiming_uniform_(a=sqrt(5))`` (PyTorch's ``reset_parameters``, as CS-DIP used);
    BatchNorm: weight 1, bias 0. The generator must live on the parameters' device.
    """
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.ConvTranspose2d):
                nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5), generator=generator)
            elif isinstance(sub, nn.BatchNorm2d):
                nn.init.ones_(sub.weight)
                nn.init.zeros_(sub.bias)


@dataclass(frozen=True)
class LayerGaussianPrior:
    """CS-DIP's learned regularizer: a Gaussian on the vector of per-layer mean weights.

    Attributes:
        names: parameter names of :class:`DIPGenerator`, one per entry (L).
        mean: (L,) float64.
        covariance: (L, L) float64, symmetric positive definite.
        precision: (L, L) inverse of ``covariance`` (derived).
    Serialise with :meth:`save` / :meth:`load` (safetensors) or :meth:`to_tensors` / :meth:`from_tensors`.
    """

    names: tuple[str, ...]
    mean: Tensor
    covariance: Tensor
    precision: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        num = len(self.names)
        if self.mean.shape != (num,) or self.covariance.shape != (num, num):
            raise ValueError(
                f"expected mean ({num},) and covariance ({num}, {num}) for {num} layer names, "
                f"got {tuple(self.mean.shape)} and {tuple(self.covariance.shape)}"
            )
        cov = self.covariance.detach().to(torch.float64)
        if not torch.all(torch.isfinite(cov)) or not torch.all(torch.isfinite(self.mean)):
            raise ValueError("expected a finite mean and covariance, got NaN or inf entries")
        object.__setattr__(self, "mean", self.mean.detach().to(torch.float64).clone())
        object.__setattr__(self, "covariance", cov.clone())
        try:
            chol = torch.linalg.cholesky(cov)
        except RuntimeError as exc:
            raise ValueError("expected a symmetric positive definite covariance") from exc
        object.__setattr__(self, "precision", torch.cholesky_inverse(chol))

    def penalty(self, layer_means: Tensor) -> Tensor:
        """Squared Mahalanobis distance ``(v - mu)^T Sigma^{-1} (v - mu)``: layer means (N, L) -> (N,)."""
        if layer_means.ndim != 2 or layer_means.shape[1] != len(self.names):
            raise ValueError(
                f"expected layer means of shape (N, {len(self.names)}), got {tuple(layer_means.shape)}"
            )
        mu = self.mean.to(layer_means)
        prec = self.precision.to(layer_means)
        d = layer_means - mu
        return ((d @ prec) * d).sum(dim=1)

    def to_tensors(self) -> dict[str, Tensor]:
        """Tensors for safetensors (the names go in :meth:`save`'s metadata)."""
        return {"mean": self.mean.contiguous(), "covariance": self.covariance.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], names: Sequence[str]) -> LayerGaussianPrior:
        """Inverse of :meth:`to_tensors`."""
        for key in ("mean", "covariance"):
            if key not in tensors:
                raise ValueError(f"expected tensors with keys 'mean' and 'covariance', got {sorted(tensors)}")
        return cls(tuple(names), tensors["mean"], tensors["covariance"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (layer names stored as JSON metadata)."""
        save_file(self.to_tensors(), os.fspath(path), metadata={"names": json.dumps(list(self.names))})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LayerGaussianPrior:
        """Read a file written by :meth:`save`."""
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "names" not in meta:
                raise ValueError(
                    f"expected a LayerGaussianPrior file with 'names' metadata, got {sorted(meta)}"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
        return cls.from_tensors(tensors, json.loads(meta["names"]))


def _network_seed(seed: int, restart: int) -> int:
    return int(np.random.SeedSequence([seed, restart]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _initial_state(
    template: DIPGenerator, latent_dim: int, seed: int, restart: int
) -> tuple[dict[str, Tensor], Tensor]:
    """CPU parameters and latent ``z`` of one network, from (seed, restart) only."""
    gen = torch.Generator().manual_seed(_network_seed(seed, restart))
    init_dip_parameters(template, gen)
    params = {k: v.detach().clone() for k, v in template.named_parameters()}
    z = torch.randn(latent_dim, generator=gen)
    return params, z
