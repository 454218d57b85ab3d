"""Purification defenses: a classifier behind a purifier, ``classifier(purifier(x))``, for any purifier.

A *purifier* is an ``nn.Module`` from images ``(B, C, H, W)`` in [0, 1] to images of the same shape in [0, 1]:
a projection onto a generator's range (:class:`manifold_defense.defense.LatentProjector`, Defense-GAN), a diffusion
purification, an autoencoder, a denoiser, an input transformation (smoothing, JPEG, quantization). It is declared
*randomized* (fresh noise on every call: each call then runs under its own seed, drawn from a stream that
:meth:`PurifiedClassifier.reseed` restarts) or deterministic. How an attack differentiates the defense is an
explicit choice, the *gradient* of :class:`PurifiedClassifier`:

- ``"bpda"``: forward = the purifier, computed without a graph; backward = the identity (Athalye, Carlini, Wagner,
  "Obfuscated Gradients Give a False Sense of Security", ICML 2018: BPDA);
- ``"exact"``: back-propagation through the purifier's exact-gradient variant (``exact``: a module computing the
  same function with its true gradient, e.g. a projection unrolled through every step; or ``exact=True``: the
  purifier's own autograd gradient is exact);
- ``"surrogate:<name>"``: forward = the purifier, backward = the gradient of the differentiable surrogate
  ``surrogates[name]`` (BPDA with a learned or smooth approximation: e.g. a soft quantizer for a quantizer).

Each variant is again an ``nn.Module`` from [0, 1] images to logits (:meth:`PurifiedClassifier.variant`), so every
attack of :mod:`attacks` applies; :meth:`PurifiedClassifier.surrogate_model` is the cheaper stand-in
``classifier(surrogate(x))`` an evaluation can attack instead (verdicts still on the real defense). The robustness
harness evaluates such a defense with every stage that applies: ``eval.harness.purifier_defense``.

Checks: inputs are finite float images in [0, 1]; the purifier (and every variant or surrogate) must return a
finite float tensor of the input's shape, device and range [0, 1], else a ``ValueError`` / ``TypeError`` names it.
The caller's tensors are never modified (the purifier receives a copy).

Example:
    >>> smooth = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)   # a differentiable purifier
    >>> defended = PurifiedClassifier(classifier, smooth, randomized=False, exact=True)  # doctest: +SKIP
    >>> PGD(ThreatModel(Norm.LINF, 0.1))(defended.variant("exact"), x, y)                # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from manifold_defense.defense import _check_images

__all__ = [
    "FixedSeed",
    "PurifiedClassifier",
    "check_purified",
    "detect_randomized",
    "fork_seeded",
    "parse_gradient",
]

_TOL = 1e-6  # tolerance of the [0, 1] range check (float rounding of sigmoid outputs and the like)


def parse_gradient(gradient: object, surrogates: Mapping[str, object], has_exact: bool) -> str:
    """Validate a gradient mode: ``"bpda"``, ``"exact"`` (needs an exact variant) or ``"surrogate:<name>"`` (a
    name of ``surrogates``). Returns it; ``ValueError`` names the modes available otherwise."""
    available = ["bpda", *(["exact"] if has_exact else []), *(f"surrogate:{n}" for n in surrogates)]
    if not isinstance(gradient, str) or gradient not in available:
        hint = ""
        if gradient == "exact":
            hint = " (the purifier declares no exact gradient: pass exact=True or an exact-gradient module)"
        raise ValueError(f"expected gradient to be one of {available}{hint}, got {gradient!r}")
    return gradient


def check_purified(out: object, x: Tensor, name: str) -> Tensor:
    """Return ``out`` if it is a finite float tensor of ``x``'s shape and device with values in [0, 1].

    Args:
        out: what the purifier ``name`` returned for the images ``x``.
        x: its input, ``(B, C, H, W)``.
        name: the purifier's name, for the error message.

    Raises:
        TypeError: not a float tensor. ValueError: another shape or device, non-finite values, values outside
        [0, 1].
    """
    if not isinstance(out, Tensor) or not out.is_floating_point():
        got = f"{out.dtype} tensor" if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"purifier {name!r}: expected a float tensor of images, got {got}")
    if out.shape != x.shape or out.device != x.device:
        raise ValueError(
            f"purifier {name!r}: expected images of the input's shape {tuple(x.shape)} on {x.device}, got "
            f"{tuple(out.shape)} on {out.device}"
        )
    if out.numel():
        lo, hi = float(out.detach().min()), float(out.detach().max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"purifier {name!r}: expected finite images, got NaN or inf")
        if lo < -_TOL or hi > 1.0 + _TOL:
            raise ValueError(f"purifier {name!r}: expected images in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return out


@contextmanager
def fork_seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under ``seed``: torch's CPU generator (and ``device``'s, on CUDA) forked and seeded, restored
    on exit, so the caller's random state is untouched."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class FixedSeed(nn.Module):
    """A purifier under a fixed seed (:func:`fork_seeded` on every call): a purifier that draws its noise from
    torch's global generators becomes a deterministic function of its input (e.g. to show what it does to given
    images). Shapes: the purifier's; it receives a copy of its input."""

    def __init__(self, purifier: nn.Module, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(purifier, nn.Module):
            raise TypeError(f"expected the purifier as an nn.Module, got {type(purifier).__name__}")
        self.purifier, self.seed = purifier, seed

    def forward(self, x: Tensor) -> Tensor:
        with fork_seeded(self.seed, x.device):
            return self.purifier(x.clone())


@torch.no_grad()
def detect_randomized(purifier: nn.Module, x: Tensor) -> bool:
    """Whether two calls of ``purifier`` on the same images differ (``x`` is not modified)."""
    return not torch.equal(purifier(x.clone()), purifier(x.clone()))


class PurifiedClassifier(nn.Module):
    """The defended model ``classifier(purifier(x))``: [0, 1] images ``(B, C, H, W)`` to logits ``(B, K)``.

    Args:
        classifier: ``nn.Module`` from [0, 1] images to logits (normalization inside it).
        purifier: ``nn.Module`` from [0, 1] images to [0, 1] images of the same shape.
        randomized: whether the purifier draws fresh noise on every call (declared, never guessed; a purifier
            with a bool ``randomize`` attribute, as :class:`~manifold_defense.defense.LatentProjector`, must agree).
            A randomized purifier runs each call under its own seed (torch's global generators forked, so the
            caller's random state is untouched), drawn from a stream seeded by ``seed``.
        surrogates: differentiable approximations of the purifier, ``name -> module`` (images -> images, same
            shape): for ``gradient="surrogate:<name>"`` and :meth:`surrogate_model`.
        exact: the exact-gradient variant: a module computing the purifier's function with its true gradient, or
            ``True`` when the purifier's own autograd gradient is exact (a differentiable purifier), or ``None``
            (default): none (``gradient="exact"`` is refused).
        gradient: ``"bpda"`` (default), ``"exact"`` or ``"surrogate:<name>"`` (module docs).
        seed: seed of the per-call seed stream (randomized purifiers).
        name: the purifier's name in error messages (default: its class name).

    Every module given is registered (``.to()`` and ``.eval()`` reach them all); the variants share them.

    Raises:
        TypeError / ValueError: modules that are not ``nn.Module``, an undeclared or contradicted ``randomized``,
        an unknown gradient mode.
    """

    def __init__(
        self,
        classifier: nn.Module,
        purifier: nn.Module,
        *,
        randomized: bool,
        surrogates: Mapping[str, nn.Module] | None = None,
        exact: nn.Module | bool | None = None,
        gradient: str = "bpda",
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        for label, module in (("classifier", classifier), ("purifier", purifier)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"expected the {label} as an nn.Module, got {type(module).__name__}")
        self.purifier_name = name if name is not None else type(purifier).__name__
        if not isinstance(randomized, bool):
            raise TypeError(
                f"purifier {self.purifier_name!r}: expected randomized as a bool (declared: does it draw fresh "
                f"noise on every call?), got {type(randomized).__name__}"
            )
        own = getattr(purifier, "randomize", None)
        if isinstance(own, bool) and own != randomized:
            raise ValueError(
                f"purifier {self.purifier_name!r} has randomize={own} but was declared randomized={randomized}"
            )
        surrogates = dict(surrogates or {})
        for key, module in surrogates.items():
            if not isinstance(key, str) or not key or not isinstance(module, nn.Module):
                raise TypeError(
                    f"purifier {self.purifier_name!r}: expected surrogates as non-empty names -> nn.Module, got "
                    f"{key!r} -> {type(module).__name__}"
                )
        if not (exact is None or isinstance(exact, (bool, nn.Module))):
            raise TypeError(
                f"purifier {self.purifier_name!r}: expected exact as an nn.Module, True or None, got "
                f"{type(exact).__name__}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"expected seed as an int >= 0, got {seed!r}")
        self.gradient = parse_gradient(gradient, surrogates, exact not in (None, False))
        self.classifier = classifier
        self.purifier = purifier
        self.exact: nn.Module | None = exact if isinstance(exact, nn.Module) else None
        self.exact_is_purifier = exact is True
        self.surrogates = nn.ModuleDict(surrogates)
        self.randomized = randomized
        self.seed = seed
        self._stream = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------------------------------- variants
    @property
    def gradients(self) -> tuple[str, ...]:
        """The gradient modes this defense offers (``"bpda"``, ``"exact"`` if any, ``"surrogate:<name>"``...)."""
        has_exact = self.exact is not None or self.exact_is_purifier
        return ("bpda", *(("exact",) if has_exact else ()), *(f"surrogate:{n}" for n in self.surrogates))

    def variant(self, gradient: str) -> PurifiedClassifier:
        """The same defense (shared modules, same seed, same train/eval mode) differentiated by ``gradient``."""
        exact: nn.Module | bool | None = True if self.exact_is_purifier else self.exact
        other = PurifiedClassifier(
            self.classifier,
            self.purifier,
            randomized=self.randomized,
            surrogates=dict(self.surrogates.items()),
            exact=exact,
            gradient=gradient,
            seed=self.seed,
            name=self.purifier_name,
        )
        return other.train(self.training)

    def surrogate_model(self, name: str) -> PurifiedClassifier:
        """``classifier(surrogates[name](x))`` differentiated through the surrogate: a cheaper stand-in of the
        defense for an attack's inner loop (its successes must still be verified on the real defense)."""
        if name not in self.surrogates:
            raise ValueError(
                f"purifier {self.purifier_name!r}: expected a surrogate among {list(self.surrogates)}, got {name!r}"
            )
        module = self.surrogates[name]
        stand_in = PurifiedClassifier(
            self.classifier,
            module,
            randomized=getattr(module, "randomize", False) is True,
            exact=True,
            gradient="exact",
            seed=self.seed,
            name=f"surrogate {name!r} of {self.purifier_name}",
        )
        return stand_in.train(self.training)

    def reseed(self, seed: int) -> None:
        """Restart the stream of per-call seeds (randomized purifiers) at ``seed``."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"expected seed as an int >= 0, got {seed!r}")
        self.seed = seed
        self._stream = torch.Generator().manual_seed(seed)

    # -------------------------------------------------------------------------------------------- forward
    @contextmanager
    def _call_seed(self, device: torch.device) -> Iterator[None]:
        """Run a randomized purifier's call under its own seed, leaving the caller's random state untouched."""
        if not self.randomized:
            yield
            return
        with fork_seeded(int(torch.randint(0, 2**62, (1,), generator=self._stream)), device):
            yield

    def _run(self, module: nn.Module, x: Tensor, name: str, differentiable: bool) -> Tensor:
        """``module`` on a copy of ``x`` (under the call's seed), its output checked."""
        with self._call_seed(x.device), torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            out = module(x.clone() if differentiable else x.detach().clone())
        return check_purified(out, x, name)

    def purify(self, x: Tensor) -> Tensor:
        """The purified images ``(B, C, H, W)`` in [0, 1], differentiable as :attr:`gradient` says."""
        x = _check_images(x, f"input of purifier {self.purifier_name!r}")
        if self.gradient == "exact":
            module = self.exact if self.exact is not None else self.purifier
            return self._run(module, x, self.purifier_name, differentiable=True)
        value = self._run(self.purifier, x, self.purifier_name, differentiable=False)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return value
        if self.gradient == "bpda":
            approx = x
        else:
            name = self.gradient.split(":", 1)[1]
            label = f"surrogate {name!r} of {self.purifier_name}"
            approx = self._run(self.surrogates[name], x, label, differentiable=True)
        return value + (approx - approx.detach()).to(value.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.purify(x))
