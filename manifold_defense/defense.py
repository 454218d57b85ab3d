"""The projection defense: map each input onto the range of a generator before the classifier sees it.

Paper: Samangouei, Kabkab, Chellappa, "Defense-GAN: Protecting Classifiers Against Adversarial Attacks Using
Generative Models" (ICLR 2018). Its evaluation: Athalye, Carlini, Wagner (ICML 2018), who break it with BPDA, and
Jalal, Ilyas, Daskalakis, Dimakis, "The Robust Manifold Defense" (2017), with on-manifold and overpowered attacks.

Threat model: white-box. The defended model is a plain ``nn.Module`` from [0, 1] images to logits, so
torchattacks, foolbox and AutoAttack accept it unchanged; how it is differentiated is an explicit choice
(:class:`LatentProjector`'s ``gradient``), never an accident:

- ``"bpda"``: forward = projection, backward = identity (Athalye et al.'s BPDA; the projection is computed without a
  graph, so an attack step costs one projection);
- ``"unrolled"``: back-propagate through every optimizer step of the projection (Defense-GAN's white-box setting;
  memory grows with steps x restarts x batch);
- a callable surrogate: forward = projection, backward = the surrogate's gradient.

The projection is :func:`manifold_defense.inversion.invert` with the Identity operator: there is no second
optimization loop. Each sample's projection is independent of the rest of its batch.

The projector is one purifier among others (images in [0, 1] -> images in [0, 1]): it goes behind a classifier in
:class:`manifold_defense.purification.PurifiedClassifier` like any other, with ``randomized=projector.randomize``
and ``exact=projector.with_gradient("unrolled")``; the named schedules and ready-made defenses are in
:mod:`manifold_defense.presets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from attacks.base import prepare_inputs
from attacks.bpda import BPDA
from manifold_defense.inversion import InversionConfig, invert

GradientMode = Literal["bpda", "unrolled"]
"""The named gradients of :class:`LatentProjector`: ``"bpda"`` (identity backward) or ``"unrolled"``
(backpropagation through the optimization steps)."""
_MODES = ("bpda", "unrolled")


def _check_images(x: object, what: str = "input") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor of images (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{what}: expected float images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    lo, hi = (float(x.detach().min()), float(x.detach().max())) if x.numel() else (0.0, 1.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what}: expected finite values, got NaN or inf")
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(f"{what}: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x


class _Projection(nn.Module):
    """``x -> G(z*)`` without a graph (the forward of the BPDA and surrogate modes)."""

    def __init__(self, owner: LatentProjector) -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, x: Tensor) -> Tensor:
        return self._owner[0].project(x).detach()


class LatentProjector(nn.Module):
    """Projection onto the range of a generator, ``x -> G(argmin_z ||G(z) - x||^2)``, as an ``nn.Module``.

    Args:
        generator: ``nn.Module`` with int ``latent_dim``, ``(N, k) -> (N, C, H, W)`` in [0, 1].
        config: the inversion schedule; default :meth:`InversionConfig.defense_gan` (SGD momentum 0.7, lr 10,
            L = 200, R = 10, lr x0.1 at 0.8 L, z ~ N(0, 1/k), per-pixel MSE, best restart kept).
        gradient: ``"bpda"`` (default), ``"unrolled"`` or a differentiable callable surrogate (see module docs).
        encoder: optional encoder ``(B, C, H, W) -> (B, k)`` for ``config.init == "encoder"`` warm starts.
        seed: seed of the restart noise. Every sample of every call uses it (the projection is then a
            deterministic function of its input) unless ``randomize`` is set.
        randomize: draw fresh restarts on every call (per-call seeds from a generator seeded by ``seed``), which
            makes the defense randomized, as an evaluator wants for EOT; :meth:`reseed` restarts the stream.

    Shapes: ``(B, C, H, W)`` in [0, 1] -> ``(B, C, H, W)`` in [0, 1]. Inputs must be finite and on the generator's
    device; floating inputs of another dtype are cast to the generator's (float64 images for a float32 generator
    give float32 outputs, and gradients flow back in float64), and images whose ``(C, H, W)`` differs from the
    generator's are refused before any layer reads them.

    Example:
        >>> projector = LatentProjector(zoo.load("mnist-gan"), gradient="bpda")  # doctest: +SKIP
        >>> defended = ProjectedClassifier(zoo.load("mnist-classifier"), projector).eval()  # doctest: +SKIP
    """

    def __init__(
        self,
        generator: nn.Module,
        config: InversionConfig | None = None,
        gradient: GradientMode | Callable[[Tensor], Tensor] = "bpda",
        *,
        encoder: nn.Module | None = None,
        seed: int = 0,
        randomize: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(generator, nn.Module) or not isinstance(
            getattr(generator, "latent_dim", None), int
        ):
            raise TypeError(
                f"expected a generator nn.Module with an int latent_dim, got {type(generator).__name__}"
            )
        config = InversionConfig.defense_gan() if config is None else config
        if not isinstance(config, InversionConfig):
            raise TypeError(f"expected config as an InversionConfig, got {type(config).__name__}")
        if isinstance(gradient, str):
            if gradient not in _MODES:
                raise ValueError(
                    f"unknown gradient mode {gradient!r}: expected one of {list(_MODES)} or a callable"
                )
        elif not callable(gradient):
            raise TypeError(
                f"expected gradient as 'bpda', 'unrolled' or a callable, got {type(gradient).__name__}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"expected seed as an int >= 0, got {seed!r}")
        self.generator = generator
        self.encoder = encoder
        self.config = config
        self.gradient = gradient
        self.seed = seed
        self.randomize = bool(randomize)
        self._stream = torch.Generator().manual_seed(seed)
        surrogate = None if isinstance(gradient, str) else gradient
        self._bpda = BPDA(_Projection(self), surrogate)
        self.last_generator_evals: Tensor | None = None

    def reseed(self, seed: int) -> None:
        """Restart the stream of per-call seeds (``randomize=True``) and set the fixed seed (``randomize=False``)."""
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"expected seed as an int >= 0, got {seed!r}")
        self.seed = seed
        self._stream = torch.Generator().manual_seed(seed)

    def with_gradient(
        self,
        gradient: GradientMode | Callable[[Tensor], Tensor],
        *,
        config: InversionConfig | None = None,
        randomize: bool | None = None,
    ) -> LatentProjector:
        """The same projection (generator, encoder, seed) differentiated by ``gradient``: e.g. the exact-gradient
        variant ``with_gradient("unrolled")`` of a BPDA projector, as a purifier's ``exact``.

        Args:
            gradient: as the constructor's.
            config: another schedule (default this one's), e.g. a cheaper one for a surrogate.
            randomize: default this one's.
        """
        cfg = self.config if config is None else config
        return LatentProjector(
            self.generator,
            cfg,
            gradient,
            encoder=self.encoder,
            seed=self.seed,
            randomize=self.randomize if randomize is None else randomize,
        ).train(self.training)

    def _call_seed(self) -> int:
        if not self.randomize:
            return self.seed
        return int(torch.randint(0, 2**62, (1,), generator=self._stream))

    def _prepare(self, x: object) -> Tensor:
        """Checked images on the generator's device, cast to its dtype (:func:`attacks.base.prepare_inputs`)."""
        return prepare_inputs(_check_images(x), self.generator, "input", "generator")

    def project(self, x: Tensor, *, differentiable: bool = False) -> Tensor:
        """``G(z*)`` for images ``x`` ``(B, C, H, W)``; differentiable through the unrolled steps if asked."""
        x = self._prepare(x)
        seed = self._call_seed()
        inv = invert(
            self.generator,
            x,
            config=self.config,
            encoder=self.encoder,
            seeds=[seed] * x.shape[0],
            differentiable=differentiable,
        )
        self.last_generator_evals = inv.generator_evals.detach()
        return inv.x_hat

    def forward(self, x: Tensor) -> Tensor:
        if self.gradient == "unrolled":
            return self.project(x, differentiable=torch.is_grad_enabled() and x.requires_grad)
        return self._bpda(self._prepare(x))

    def extra_repr(self) -> str:
        mode = self.gradient if isinstance(self.gradient, str) else "surrogate"
        c = self.config
        return (
            f"gradient={mode}, optimizer={c.optimizer}, lr={c.lr}, steps={c.steps}, restarts={c.restarts}, "
            f"seed={self.seed}, randomize={self.randomize}"
        )


class ProjectedClassifier(nn.Module):
    """The defended model: ``classifier(projector(x))``, [0, 1] images ``(B, C, H, W)`` to logits ``(B, classes)``.

    Gradients are the projector's own (its ``gradient`` mode). The general form, for any purifier, with declared
    randomness, output checks and BPDA / exact / surrogate variants:
    :class:`manifold_defense.purification.PurifiedClassifier`.

    Args:
        classifier: ``nn.Module`` from [0, 1] images to logits (normalization inside it).
        projector: a :class:`LatentProjector` (or any [0, 1] -> [0, 1] image module).
    """

    def __init__(self, classifier: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module) or not isinstance(projector, nn.Module):
            raise TypeError(
                "expected classifier and projector as nn.Modules, got "
                f"{type(classifier).__name__} and {type(projector).__name__}"
            )
        self.classifier = classifier
        self.projector = projector

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.projector(x))


__all__ = ["GradientMode", "LatentProjector", "ProjectedClassifier"]
