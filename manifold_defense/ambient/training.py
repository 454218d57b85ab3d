"""AmbientGAN's data and training (see :mod:`manifold_defense.ambient`): measured datasets, the paper's baselines,
the measurement discriminator and :func:`train_ambient`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from manifold_defense.ambient.measurements import (
    METHODS,
    GaussianProjection,
    Method,
    RandomMeasurement,
    _check_finite_images,
    _check_images,
    _check_int,
)
from manifold_defense.training.gan import GANTrainConfig, _train_gan

__all__ = ["MeasurementDiscriminator", "measure_dataset", "train_ambient", "training_data"]


class MeasurementDiscriminator(nn.Module):
    """An MLP discriminator on flattened measurements ``(B, ...)`` to logits ``(B,)`` (for :class:`GaussianProjection`):
    ``in_features - hidden - hidden/2 - 1`` with leaky ReLU, no batch norm (fine for WGAN-GP)."""

    def __init__(self, in_features: int, hidden: int = 512) -> None:
        super().__init__()
        _check_int(in_features, "in_features")
        _check_int(hidden, "hidden")
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden // 2 or 1),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden // 2 or 1, 1),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y).squeeze(1)


def _chunks(
    images: torch.Tensor, measurement: RandomMeasurement, seed: int, batch_size: int
) -> Any:
    """``(y, theta)`` per chunk of ``batch_size`` images, from one CPU generator seeded by ``seed``."""
    if not isinstance(measurement, RandomMeasurement):
        raise TypeError(f"expected a RandomMeasurement, got {type(measurement).__name__}")
    images = _check_images(images, "images to measure")
    _check_finite_images(images, "images to measure")  # here, so the message counts images over the whole set
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"expected an int seed, got {type(seed).__name__}")
    _check_int(batch_size, "batch_size")
    generator = torch.Generator().manual_seed(seed)
    measurement = measurement.to(images.device)
    with torch.no_grad():
        for chunk in images.split(batch_size):
            yield measurement.measure(chunk, generator)


def measure_dataset(
    images: torch.Tensor,
    measurement: RandomMeasurement,
    seed: int = 0,
    *,
    batch_size: int = 1000,
    return_theta: bool = False,
) -> Any:
    """The measured copy of a training set, made once: ``y = f_theta(x)`` with ``theta`` per image from a CPU
    ``torch.Generator`` seeded by ``seed`` (chunks of ``batch_size``; the same seed and chunk size give the same
    measurements on any device). The caller's images are not modified.

    Args:
        images: ``(N, C, H, W)`` clean images.
        measurement: the random measurement model.
        seed: seed of the measurement draws.
        batch_size: images measured per draw.
        return_theta: also return the ``theta`` of each image (the masks, noise or projection vectors).

    Returns:
        ``y`` ``(N, ...)``, or ``(y, theta)`` with ``return_theta``.
    """
    ys, thetas = [], []
    for y, theta in _chunks(images, measurement, seed, batch_size):
        ys.append(y)
        if return_theta:
            thetas.append(theta)
    y_all = torch.cat(ys)
    return (y_all, torch.cat(thetas)) if return_theta else y_all


def training_data(
    images: torch.Tensor,
    measurement: RandomMeasurement,
    method: Method = "ambient",
    seed: int = 0,
    *,
    batch_size: int = 1000,
    **unmeasure_kwargs: Any,
) -> torch.Tensor:
    """What each method trains on, from the same measurements (:func:`measure_dataset` with ``seed``):

    ``"ambient"``: the measurements ``y``; ``"ignore"``: ``measurement.as_image(y)`` (read as clean images);
    ``"unmeasure"``: ``measurement.unmeasure(y, theta, **unmeasure_kwargs)`` (restored images in [0, 1], e.g.
    ``inpaint="normalized-convolution"`` for the masks, ``balance=`` for Wiener). The clean images are used only to
    make the measurements.
    """
    if method not in METHODS:
        raise ValueError(f"expected method in {METHODS}, got {method!r}")
    if unmeasure_kwargs and method != "unmeasure":
        raise ValueError(f"restoration settings {sorted(unmeasure_kwargs)} apply to method 'unmeasure' only")
    out = []
    for y, theta in _chunks(images, measurement, seed, batch_size):
        if method == "ambient":
            out.append(y)
        elif method == "ignore":
            out.append(measurement.as_image(y))
        else:
            extra = {"image_shape": tuple(images.shape[1:])} if isinstance(measurement, GaussianProjection) else {}
            out.append(measurement.unmeasure(y, theta, **extra, **unmeasure_kwargs))
    return torch.cat(out)


def train_ambient(
    generator: nn.Module,
    discriminator: nn.Module,
    data: torch.Tensor,
    measurement: RandomMeasurement,
    method: Method = "ambient",
    config: GANTrainConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    validate: Callable[[nn.Module, int], Mapping[str, float]] | None = None,
    validate_every: int | None = None,
    data_settings: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train ``generator`` by ``method`` on ``data`` made by :func:`training_data` for the same ``method``.

    ``"ambient"``: :func:`~manifold_defense.training.train_gan` with ``measurement`` between the generator and
    the discriminator (``data`` holds measurements; the discriminator takes them: a
    :class:`~manifold_defense.models.Critic` for image measurements, a :class:`MeasurementDiscriminator` for
    projections). ``"ignore"`` / ``"unmeasure"``: the same GAN trained on ``data`` as clean images. ``config``
    defaults to ``GANTrainConfig()``; other arguments and the returned history are
    :func:`~manifold_defense.training.train_gan`'s.

    ``data_settings``: how ``data`` was made beyond ``method`` and ``measurement`` (JSON-like, e.g.
    ``{"measure_seed": 0, "inpaint": "biharmonic"}``). The checkpoint records the ``ambient`` trainer, the run-defining
    fields of ``config`` (:class:`~manifold_defense.training.GANTrainConfig` says which may change),
    ``method``, ``measurement.spec()`` and ``data_settings``; a resume with other ones is refused, naming them.
    """
    if method not in METHODS:
        raise ValueError(f"expected method in {METHODS}, got {method!r}")
    if not isinstance(measurement, RandomMeasurement):
        raise TypeError(f"expected a RandomMeasurement, got {type(measurement).__name__}")
    if data_settings is not None and not isinstance(data_settings, Mapping):
        raise TypeError(f"expected data_settings to be a mapping or None, got {type(data_settings).__name__}")
    if not isinstance(data, torch.Tensor):
        raise TypeError(
            f"expected data as one tensor (N, ...) made by training_data (measurements or images), got "
            f"{type(data).__name__}"
        )
    return _train_gan(
        generator,
        discriminator,
        TensorDataset(data),
        config if config is not None else GANTrainConfig(),
        device=device,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        validate=validate,
        validate_every=validate_every,
        encoder=None,
        measurement=measurement if method == "ambient" else None,
        conditional=False,
        trainer="ambient",
        extra_settings={"method": method, "measured_by": measurement.spec(), "data": dict(data_settings or {})},
    )
