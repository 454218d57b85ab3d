"""The evaluated models of the harness: :class:`Defense` (a model, its differentiable variants and its cheaper
surrogates) and its constructors: the bare classifier, any purifier in front of a classifier
(:func:`purifier_defense`, from a :class:`manifold_defense.purification.PurifiedClassifier`'s parts) and the
projection defense (Defense-GAN), which is one purifier among others.

A *surrogate* is a cheaper model that stands in for the defense inside an attack's inner loop (its gradients, or
its queries for Square); the verdict on every adversarial example is still decided by the real defense (worst case
over fresh draws), and the points that survive the cascade get a final round of real-forward BPDA + EOT steps
(``real-bpda-eot``). For the Defense-GAN schedule (2010 generator passes per image) the surrogates are the fast
schedule (encoder start, 102 passes, lower projection error on the zoo GAN) and the differentiable ``G(E(x))``.

Paper: Samangouei, Kabkab, Chellappa, "Defense-GAN" (ICLR 2018); the surrogate-gradient idea is BPDA's
(Athalye, Carlini, Wagner, ICML 2018), the transfer check is Tramer et al., "On Adaptive Attacks to Adversarial
Example Defenses" (NeurIPS 2020).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from manifold_defense.defense import LatentProjector, ProjectedClassifier
from manifold_defense.inversion import InversionConfig
from manifold_defense.purification import FixedSeed, PurifiedClassifier

__all__ = [
    "Defense",
    "EncoderProjection",
    "diffpure_defense",
    "projection_defense",
    "projection_surrogates",
    "purifier_defense",
    "undefended_defense",
]


@dataclass
class Defense:
    """One evaluated model and the differentiable variants the adaptive attacks need.

    Args:
        name: shown in the report and the JSON (no ``|``).
        model: the defended model as given, ``(B, C, H, W)`` in [0, 1] -> ``(B, K)`` logits, eval mode; every
            verdict uses its forward pass. Without ``classifier``, ``pgd`` uses its autograd gradient.
        classifier: the bare classifier behind a preprocessing step (``pgd`` takes its gradient, the latent
            attacks attack it); ``None``: the model is not preprocessed (``model`` plays this role).
        preprocess: the preprocessing module itself (images -> images), deterministic, used for the projection
            statistics and to show projected adversarial examples; ``None`` for a plain model.
        bpda_model: same forward as ``model`` with an identity (BPDA) backward through the preprocessing;
            enables ``bpda-pgd``, ``bpda-eot-pgd`` and routes ``apgd`` through it.
        unrolled_model: same forward with the exact gradient through the preprocessing; enables
            ``unrolled-pgd``.
        randomized: whether the forward pass is random; ``None`` (default): detected by two forward passes.
        surrogates: cheaper models of the defense, ``name -> module`` (images -> logits, differentiable, eval
            mode); ``surrogate-pgd`` attacks through each in turn, and ``real-bpda-eot`` then runs on the
            survivors. Empty (default): the cascade attacks the real defense only.
        surrogate: the name (among ``surrogates``) that replaces ``bpda_model`` / ``model`` inside the inner
            loops of ``bpda-pgd``, ``bpda-eot-pgd``, ``apgd``, ``square`` and the curves; ``None``: no replacement.
        query_stand_in: ``(name, module)``, a cheap stand-in of the whole defense (images -> logits) that the
            ``square`` stage queries instead of the defense when its settings say ``queries_to="stand-in"`` (the
            lean cascade); its examples are still judged on the real defense. ``None``: none (Square then queries
            as in the full cascade). It is not a surrogate: no other stage uses it.
    """

    name: str
    model: nn.Module
    classifier: nn.Module | None = None
    preprocess: nn.Module | None = None
    bpda_model: nn.Module | None = None
    unrolled_model: nn.Module | None = None
    randomized: bool | None = None
    surrogates: Mapping[str, nn.Module] = field(default_factory=dict)
    surrogate: str | None = None
    query_stand_in: tuple[str, nn.Module] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "|" in self.name:
            raise ValueError(f"expected a non-empty defense name without '|', got {self.name!r}")
        if self.model is None:
            raise TypeError(f"expected the model of defense {self.name!r} as an nn.Module, got None")
        for attr in ("model", "classifier", "preprocess", "bpda_model", "unrolled_model"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, nn.Module):
                raise TypeError(
                    f"expected {attr} of defense {self.name!r} as an nn.Module, got {type(value).__name__}"
                )
        if not isinstance(self.surrogates, Mapping):
            raise TypeError(
                f"expected surrogates of defense {self.name!r} as a mapping name -> nn.Module, "
                f"got {type(self.surrogates).__name__}"
            )
        self.surrogates = dict(self.surrogates)
        for key, value in self.surrogates.items():
            if not isinstance(key, str) or not key or not isinstance(value, nn.Module):
                raise TypeError(
                    f"expected surrogates of defense {self.name!r} as non-empty names -> nn.Module, got "
                    f"{key!r} -> {type(value).__name__}"
                )
        if self.surrogate is not None and self.surrogate not in self.surrogates:
            raise ValueError(
                f"expected surrogate of defense {self.name!r} to be one of its surrogates "
                f"{sorted(self.surrogates)} or None, got {self.surrogate!r}"
            )
        q = self.query_stand_in
        if q is not None and not (
            isinstance(q, tuple) and len(q) == 2 and isinstance(q[0], str) and q[0] and isinstance(q[1], nn.Module)
        ):
            raise TypeError(
                f"expected query_stand_in of defense {self.name!r} as (name, nn.Module) or None, got {q!r:.80}"
            )

    def modules(self) -> list[nn.Module]:
        """The distinct modules of the defense (surrogates included)."""
        found: list[nn.Module] = []
        candidates = (self.model, self.classifier, self.preprocess, self.bpda_model, self.unrolled_model)
        queried = () if self.query_stand_in is None else (self.query_stand_in[1],)
        for m in (*candidates, *self.surrogates.values(), *queried):
            if m is not None and all(m is not f for f in found):
                found.append(m)
        return found

    def inner_model(self) -> nn.Module:
        """The model the BPDA-family inner loops attack: the named surrogate, else the BPDA model, else the model."""
        if self.surrogate is not None:
            return self.surrogates[self.surrogate]
        return self.bpda_model if self.bpda_model is not None else self.model


class EncoderProjection(nn.Module):
    """``x -> G(E(x))``: the differentiable one-shot projection of an encoder and its generator.

    Args:
        generator: ``(B, k) -> (B, C, H, W)`` in [0, 1], with int ``latent_dim``.
        encoder: ``(B, C, H, W) -> (B, k)``.

    Shapes: ``(B, C, H, W)`` in [0, 1] -> ``(B, C, H, W)``; gradients flow through both networks.
    """

    def __init__(self, generator: nn.Module, encoder: nn.Module) -> None:
        super().__init__()
        if not isinstance(generator, nn.Module) or not isinstance(encoder, nn.Module):
            raise TypeError(
                f"expected generator and encoder as nn.Modules, got {type(generator).__name__} and "
                f"{type(encoder).__name__}"
            )
        self.generator, self.encoder = generator, encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.generator(self.encoder(x))


def undefended_defense(classifier: nn.Module, name: str = "undefended") -> Defense:
    """The bare classifier as a :class:`Defense` (no preprocessing: BPDA and unrolled attacks are skipped)."""
    return Defense(name=name, model=classifier.eval())


def projection_surrogates(
    classifier: nn.Module,
    generator: nn.Module,
    encoder: nn.Module,
    fast_config: InversionConfig,
    *,
    seed: int = 0,
    randomized: bool = True,
) -> dict[str, nn.Module]:
    """The cheaper stand-ins of a projection defense: ``"fast"`` = the classifier behind the ``fast_config``
    projection (BPDA backward, fresh restarts per call if ``randomized``) and ``"encoder"`` = the classifier on the
    differentiable ``G(E(x))``.

    Args:
        classifier: [0, 1] images -> logits; generator: with int ``latent_dim``; encoder: images -> latents.
        fast_config: the cheap projection schedule (e.g. ``manifold_defense.presets.schedule_config("fast")``).
        seed: seed of the fast projection's restart noise.
    """
    enc = encoder if fast_config.init == "encoder" else None
    fast = LatentProjector(generator, fast_config, "bpda", encoder=enc, seed=seed, randomize=randomized)
    return {
        "fast": ProjectedClassifier(classifier, fast).eval(),
        "encoder": ProjectedClassifier(classifier, EncoderProjection(generator, encoder)).eval(),
    }


def purifier_defense(
    name: str,
    classifier: nn.Module,
    purifier: nn.Module,
    *,
    randomized: bool,
    surrogates: Mapping[str, nn.Module] | None = None,
    exact: nn.Module | bool | None = None,
    seed: int = 0,
    preprocess: nn.Module | None = None,
    stand_ins: Mapping[str, nn.Module] | None = None,
    surrogate: str | None = None,
    query_stand_in: tuple[str, nn.Module] | None = None,
) -> Defense:
    """A classifier behind any purifier as a :class:`Defense`: every stage of the cascade that applies runs.

    Built from :class:`manifold_defense.purification.PurifiedClassifier`: ``model`` = ``bpda_model`` =
    ``classifier(purifier(x))`` with a BPDA (identity) backward; ``unrolled_model`` (the ``unrolled-pgd``
    stage) = the exact-gradient variant when ``exact`` is given; ``surrogates`` = ``classifier(surrogate(x))``
    per purifier surrogate (the ``surrogate-pgd`` stage, then ``real-bpda-eot`` on the survivors); ``classifier``
    = the bare classifier (the naive ``pgd`` and the latent attacks); ``preprocess`` = a deterministic purifier.

    Args:
        name: shown in the report (no ``|``).
        classifier: [0, 1] images -> logits; purifier: [0, 1] images -> [0, 1] images of the same shape.
        randomized, surrogates, exact, seed: see :class:`~manifold_defense.purification.PurifiedClassifier`
            (surrogates: purifier-level, images -> images; exact: an exact-gradient module or ``True``).
        preprocess: the deterministic purifier of the projection figures and the example grids; default the
            purifier under a fixed seed (:class:`~manifold_defense.purification.FixedSeed`), or for a randomized
            :class:`~manifold_defense.defense.LatentProjector` the same projector with ``randomize=False``; a
            purifier with another seed stream of its own needs its own.
        stand_ins: ready-made cheaper models of the whole defense (images -> logits), added to the surrogates.
        surrogate: a surrogate name that replaces the BPDA model in the inner loops (see :class:`Defense`).
        query_stand_in: the cheap stand-in the lean cascade's Square queries (see :class:`Defense`).
    """
    label = f"{type(purifier).__name__} of defense {name}"
    real = PurifiedClassifier(classifier, purifier, randomized=randomized, seed=seed, name=label).eval()
    spec = PurifiedClassifier(  # validates the parts and builds the stand-ins
        classifier, purifier, randomized=randomized, surrogates=surrogates, exact=exact, seed=seed, name=label
    )
    unrolled = None  # registers only the module it runs (the records name its schedule; the fingerprint hashes it)
    if spec.exact is not None or spec.exact_is_purifier:
        module = spec.exact if spec.exact is not None else purifier
        unrolled = PurifiedClassifier(
            classifier, module, randomized=randomized, exact=True, gradient="exact", seed=seed, name=label
        ).eval()
    models: dict[str, nn.Module] = {n: spec.surrogate_model(n).eval() for n in spec.surrogates}
    clash = sorted(set(models) & set(stand_ins or {}))
    if clash:
        raise ValueError(f"expected distinct surrogate names for defense {name!r}, got {clash} twice")
    models |= dict(stand_ins or {})
    if preprocess is None and isinstance(purifier, LatentProjector) and purifier.randomize:
        preprocess = purifier.with_gradient("bpda", randomize=False)  # its own seed stream, fixed
    elif preprocess is None:
        preprocess = FixedSeed(purifier, seed)
    return Defense(
        name=name,
        model=real,
        classifier=classifier.eval(),
        preprocess=preprocess.eval(),
        bpda_model=real,
        unrolled_model=unrolled,
        randomized=randomized,
        surrogates=models,
        surrogate=surrogate,
        query_stand_in=query_stand_in,
    )


def projection_defense(
    name: str,
    classifier: nn.Module,
    generator: nn.Module,
    config: InversionConfig,
    *,
    encoder: nn.Module | None = None,
    randomized: bool = True,
    seed: int = 0,
    surrogates: Mapping[str, nn.Module] | None = None,
    surrogate: str | None = None,
    unrolled_config: InversionConfig | None = None,
    query_stand_in: tuple[str, nn.Module] | None = None,
) -> Defense:
    """The projection defense ``classifier(G(z*(x)))`` (Defense-GAN): :func:`purifier_defense` with the latent
    projection as purifier, its unrolled projection as exact variant and the same projection with a fixed seed
    as preprocess.

    Args:
        name: e.g. ``"projection-fast"``.
        classifier: [0, 1] images -> logits; generator: ``nn.Module`` with int ``latent_dim``.
        config: projection schedule (e.g. :func:`manifold_defense.presets.schedule_config`).
        encoder: needed when ``config.init == "encoder"``.
        randomized: fresh restart noise on every call (Defense-GAN's random restarts; the honest setting);
            ``False``: a deterministic function of the input.
        seed: seed of the restart noise.
        surrogates: cheaper models of the whole defense (images -> logits, e.g. :func:`projection_surrogates`);
            surrogate: see :class:`Defense`.
        unrolled_config: the schedule the ``unrolled-pgd`` stage differentiates through (default ``config``); a
            cheaper one (the fast schedule for Defense-GAN's 2010-pass projection) makes the unrolled attack a
            surrogate attack: its verdicts stay the real defense's and its transfer counts are reported.
        query_stand_in: the cheap stand-in the lean cascade's Square queries (see :class:`Defense`), e.g.
            ``("encoder", classifier(G(E(x))))``.
    """

    def projector(gradient: str, randomize: bool, cfg: InversionConfig) -> LatentProjector:
        start = encoder if cfg.init == "encoder" else None
        return LatentProjector(generator, cfg, gradient, encoder=start, seed=seed, randomize=randomize)  # type: ignore[arg-type]

    return purifier_defense(
        name,
        classifier,
        projector("bpda", randomized, config),
        randomized=randomized,
        exact=projector("unrolled", randomized, unrolled_config or config),
        seed=seed,
        preprocess=projector("bpda", False, config),
        stand_ins=surrogates,
        surrogate=surrogate,
        query_stand_in=query_stand_in,
    )


def diffpure_defense(
    classifier: nn.Module,
    prior: nn.Module,
    t_star: int,
    steps: int = 10,
    *,
    eta: float = 0.0,
    seed: int = 0,
    surrogate_steps: int | None = 2,
    randomize: bool = True,
    name: str = "diffpure",
) -> Defense:
    """DiffPure (Nie et al., ICML 2022) as a :class:`Defense`: the classifier behind
    :class:`~manifold_defense.diffpure.DiffusionPurifier` (``prior`` a
    :class:`~manifold_defense.diffusion.DiffusionModel`, diffused to ``t_star``, ``steps`` DDIM steps back),
    randomized, with its exact gradient through every reverse step (the ``unrolled-pgd`` stage, gradient
    checkpointed) and, unless ``surrogate_steps`` is ``None``, the ``ddim-<surrogate_steps>`` surrogate reverse
    process (the ``surrogate-pgd`` stage; Lee and Kim, ICCV 2023), whose examples are judged on the real purifier.
    ``randomize=False`` fixes the purifier's noise (the seed ``seed`` on every call, surrogate included): a
    deterministic white-box defense.
    """
    from manifold_defense.diffpure import DiffusionPurifier, diffpure_classifier
    from manifold_defense.diffusion import DiffusionModel

    if not isinstance(prior, DiffusionModel):
        raise TypeError(f"expected the DiffPure prior as a DiffusionModel, got {type(prior).__name__}")
    spec = diffpure_classifier(
        classifier, prior, t_star, steps, eta=eta, seed=seed, surrogate_steps=surrogate_steps or 2, randomize=randomize
    )
    surrogates = dict(spec.surrogates.items()) if surrogate_steps is not None else {}
    fixed = DiffusionPurifier(prior, t_star, steps, eta=eta, seed=seed, randomize=False)  # for grids and stats
    defense = purifier_defense(
        name, classifier, spec.purifier, randomized=randomize, surrogates=surrogates, exact=True, seed=seed, preprocess=fixed
    )
    if surrogates:  # the lean cascade's Square queries the surrogate reverse process
        key = next(iter(defense.surrogates))
        defense.query_stand_in = (key, defense.surrogates[key])
    return defense
