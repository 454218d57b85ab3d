"""The projection defense's presets: the named projection schedules (Defense-GAN's and the fast one) and the
defended models built on them, as library objects.

Paper: Samangouei, Kabkab, Chellappa, "Defense-GAN: Protecting Classifiers Against Adversarial Attacks Using
Generative Models" (ICLR 2018): its schedule is ``"defense-gan"``. The latent projection is one purifier among
others (:mod:`manifold_defense.purification`): :func:`projection_purifier` builds it,
:func:`projection_classifier` puts a classifier behind it with its exact (unrolled) gradient variant.

Example:
    >>> config = schedule_config("fast")                                       # doctest: +SKIP
    >>> defended = projection_classifier(classifier, generator, "fast", encoder=encoder)  # doctest: +SKIP
    >>> exact = defended.variant("exact")       # gradients through every projection step  # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from manifold_defense.defense import GradientMode, LatentProjector, ProjectedClassifier
from manifold_defense.inversion import InversionConfig
from manifold_defense.purification import PurifiedClassifier

__all__ = [
    "SCHEDULES",
    "defended_model",
    "projection_classifier",
    "projection_purifier",
    "schedule_config",
]

SCHEDULES: tuple[str, ...] = ("defense-gan", "fast")
"""Projection schedules by name. "defense-gan": Defense-GAN's own (SGD momentum 0.7, lr 10, L = 200, R = 10,
lr x0.1 at 0.8 L, z ~ N(0, 1/k): 2000 generator passes per image). "fast": Adam lr 0.05, 50 steps,
2 restarts, restart 0 at the encoder's E(x), restart 1 at E(x) + N(0, 1/k) noise (102 generator passes)."""


def schedule_config(name: str, seed: int = 0) -> InversionConfig:
    """The :class:`InversionConfig` of a named projection schedule (see :data:`SCHEDULES`).

    Args:
        name: ``"defense-gan"`` or ``"fast"``.
        seed: default per-sample seed of the restart noise.

    Raises:
        ValueError: unknown name.
    """
    if name == "defense-gan":
        return InversionConfig.defense_gan(seed=seed)
    if name == "fast":
        return InversionConfig(
            optimizer="adam", lr=0.05, steps=50, restarts=2, init="encoder", init_std=None, seed=seed
        )
    raise ValueError(f"expected schedule to be one of {list(SCHEDULES)}, got {name!r}")


def _config(schedule: str | InversionConfig, seed: int) -> InversionConfig:
    if isinstance(schedule, InversionConfig):
        return schedule
    if isinstance(schedule, str):
        return schedule_config(schedule, seed)
    raise TypeError(
        f"expected schedule as a name in {list(SCHEDULES)} or an InversionConfig, got {type(schedule).__name__}"
    )


def projection_purifier(
    generator: nn.Module,
    schedule: str | InversionConfig = "fast",
    *,
    encoder: nn.Module | None = None,
    gradient: GradientMode = "bpda",
    randomize: bool = True,
    seed: int = 0,
) -> LatentProjector:
    """The latent projection ``x -> G(z*(x))`` as a purifier (images in [0, 1] -> images in [0, 1]).

    Args:
        generator: ``nn.Module`` with int ``latent_dim``, ``(N, k) -> (N, C, H, W)`` in [0, 1].
        schedule: a name of :data:`SCHEDULES` or an :class:`InversionConfig`.
        encoder: images -> latents; used (and then required) when the schedule starts from ``E(x)``
            (``init == "encoder"``, as ``"fast"``), ignored otherwise.
        gradient: ``"bpda"`` (identity backward) or ``"unrolled"`` (exact: through every projection step).
        randomize: fresh restart noise on every call (a randomized purifier, Defense-GAN's random restarts);
            ``False``: a deterministic function of the input (seed ``seed``).
        seed: seed of the restart noise (stream).

    Raises:
        ValueError: an encoder-started schedule without ``encoder``; unknown schedule name.
    """
    config = _config(schedule, seed)
    if config.init == "encoder" and encoder is None:
        raise ValueError(
            "the projection schedule starts from the encoder's E(x) (init='encoder'): expected an encoder, got None"
        )
    start = encoder if config.init == "encoder" else None
    return LatentProjector(generator, config, gradient, encoder=start, seed=seed, randomize=randomize)


def projection_classifier(
    classifier: nn.Module,
    generator: nn.Module,
    schedule: str | InversionConfig = "fast",
    *,
    encoder: nn.Module | None = None,
    randomized: bool = True,
    seed: int = 0,
    exact_schedule: str | InversionConfig | None = None,
) -> PurifiedClassifier:
    """``classifier(G(z*(x)))``: the projection defense as a :class:`PurifiedClassifier` (BPDA gradient), with
    its exact variant (``variant("exact")``: back-propagation through every projection step), in eval mode.

    Args:
        classifier: [0, 1] images -> logits; generator, schedule, encoder, seed: see :func:`projection_purifier`.
        randomized: fresh restart noise on every call (the honest setting); ``False``: deterministic.
        exact_schedule: the schedule the exact variant differentiates through (default ``schedule``); a cheaper
            one makes that variant a surrogate of the real projection.
    """
    purifier = projection_purifier(generator, schedule, encoder=encoder, randomize=randomized, seed=seed)
    exact = projection_purifier(
        generator,
        schedule if exact_schedule is None else exact_schedule,
        encoder=encoder,
        gradient="unrolled",
        randomize=randomized,
        seed=seed,
    )
    return PurifiedClassifier(classifier, purifier, randomized=randomized, exact=exact, seed=seed).eval()


def defended_model(
    classifier: nn.Module,
    generator: nn.Module,
    config: InversionConfig,
    *,
    encoder: nn.Module | None = None,
    randomize: bool = False,
    seed: int = 0,
) -> ProjectedClassifier:
    """``classifier(G(z*(x)))`` with a BPDA (identity-backward) projection, in eval mode.

    Args:
        classifier: [0, 1] images -> logits.
        generator: ``nn.Module`` with int ``latent_dim``.
        config: projection schedule (e.g. :func:`schedule_config`).
        encoder: needed when ``config.init == "encoder"``.
        randomize: fresh restart noise on every call (the randomized defense EOT and worst-case evaluation
            are run against); ``False``: a deterministic function of the input (seed ``seed``).
        seed: seed of the restart noise (stream).
    """
    projector = LatentProjector(
        generator, config, gradient="bpda", encoder=encoder, seed=seed, randomize=randomize
    )
    return ProjectedClassifier(classifier, projector).eval()
