"""The evaluation the ``robustness``, ``defense`` and ``demo`` commands run, as a typed request: which models
(zoo names, ``package.module:factory`` or ``path.py:factory``, safetensors weights), which data, which defenses
(:data:`DEFENSES`, and a user's purifier), where and how; :func:`run_evaluation` loads them and runs
:func:`eval.harness.run_robustness` (distributed under ``torchrun``).

Defenses: ``undefended`` (the classifier alone), ``projection-defense-gan`` (Defense-GAN's schedule: 2010
generator passes per projection; with an encoder it attacks through its surrogates, the fast schedule and the
differentiable ``G(E(x))``, unless ``verbatim``) and ``projection-fast`` (Adam, 50 steps, 2 restarts from the
encoder's ``E(x)``: 102 passes; needs an encoder). Both projection defenses draw fresh restart noise on every call.
``diffpure`` (DiffPure with the zoo's ``mnist-ddpm``: diffuse to ``t*``, DDIM back; :class:`DiffPureSpec`) runs only
when named; ``diffpure-fixed`` is the same purifier with its noise fixed (one seed for every call): a deterministic
white-box defense, the figure an attacker gets when the purifier's randomness is known (arXiv 2505.22839).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from eval.harness.api import run_robustness
from eval.harness.defenses import (
    Defense,
    EncoderProjection,
    diffpure_defense,
    projection_defense,
    projection_surrogates,
    undefended_defense,
)
from eval.harness.models import check_data_fits_models, load_data, load_model
from eval.harness.purifiers import PurifierSpec, purifier_defense_from_spec
from eval.harness.settings import DEFAULT_THREATS, MNIST_SHAPE, RobustnessSettings, default_curve_eps
from manifold_defense import zoo
from manifold_defense.defense import ProjectedClassifier

__all__ = [
    "CLASSIFIERS",
    "DEFENSES",
    "QUICK_DEFENSES",
    "DefenseModels",
    "DiffPureSpec",
    "Evaluation",
    "ModelSpecs",
    "Models",
    "build_defenses",
    "check_image_shape",
    "evaluation_defenses",
    "load_models",
    "load_zoo_models",
    "run_evaluation",
]

#: The defenses by name.
DEFENSES: tuple[str, ...] = ("undefended", "projection-defense-gan", "projection-fast", "diffpure", "diffpure-fixed")
#: The defenses of a quick run with an encoder (without one: ``projection-defense-gan`` on 2 points).
QUICK_DEFENSES: tuple[str, ...] = ("undefended", "projection-fast")
#: Zoo classifiers (any other classifier: ``module:factory`` or ``path.py:factory``).
CLASSIFIERS: tuple[str, ...] = zoo.CLASSIFIERS
_SCHEDULE = {"projection-defense-gan": "defense-gan", "projection-fast": "fast"}


class DefenseModels(NamedTuple):
    """The zoo models the MNIST evaluations need: classifier ([0, 1] images -> logits), generator (``latent_dim``)
    and the generator's encoder (images -> latents, for warm starts)."""

    classifier: nn.Module
    generator: nn.Module
    encoder: nn.Module


@dataclass(frozen=True)
class DiffPureSpec:
    """The ``diffpure`` defense's purifier: the zoo's ``mnist-ddpm`` (from ``weights_dir``, default the package's),
    diffused to ``t_star`` and taken back in ``steps`` DDIM steps (``eta``: their noise), attacked through its exact
    gradient and the ``ddim-<surrogate_steps>`` surrogate reverse process (see
    :func:`eval.harness.defenses.diffpure_defense`)."""

    t_star: int
    steps: int = 10
    eta: float = 0.0
    surrogate_steps: int = 2
    weights_dir: Path | None = None

    def __post_init__(self) -> None:
        for name, low in (("t_star", 0), ("steps", 1), ("surrogate_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"expected DiffPure's {name} as an int >= {low}, got {value!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"expected DiffPure's eta in [0, 1], got {self.eta!r}")


class Models(NamedTuple):
    """Models of an evaluation: the classifier, and the generator and encoder if any."""

    classifier: nn.Module
    generator: nn.Module | None
    encoder: nn.Module | None
    description: str


@dataclass(frozen=True)
class ModelSpecs:
    """The models of an evaluation by name.

    Args:
        classifier: a zoo name (:data:`CLASSIFIERS`), ``package.module:factory`` or ``path.py:factory``.
        generator: as ``classifier``; ``None``: ``mnist-gan`` on MNIST data, none on other data; ``"none"``: none.
        encoder: as ``classifier``; ``None``: ``mnist-encoder`` with ``mnist-gan``, else none; ``"none"``: none.
        classifier_weights, generator_weights, encoder_weights: ``FILE.safetensors`` loaded into each (never a
            pickle).
        classifier_dir: folder of a zoo classifier's weights if not ``weights_dir`` (a training run's ``--out``).
        weights_dir: the zoo folder (default: the package's).
    """

    classifier: str = "mnist-classifier"
    generator: str | None = None
    encoder: str | None = None
    classifier_weights: Path | None = None
    generator_weights: Path | None = None
    encoder_weights: Path | None = None
    classifier_dir: Path | None = None
    weights_dir: Path | None = None


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the harness on named models and data (:func:`run_evaluation`).

    Args:
        settings: the harness settings; out: the output folder.
        defenses: names among :data:`DEFENSES`; ``None``: every one the models allow (quick: the classifier and
            one projection), or only ``undefended`` beside a ``purifier``.
        models: :class:`ModelSpecs`; data: ``"mnist"`` (the test split), ``FILE.safetensors`` (``images``,
            ``labels``) or a factory returning ``(images, labels)``.
        threats_chosen: the settings' threats were chosen for these images; without it MNIST's default threats
            are refused on images of another shape.
        purifier: a user's purifier, evaluated as defense ``purified`` (:class:`PurifierSpec`).
        diffpure: the ``diffpure`` defense's settings (:class:`DiffPureSpec`), needed when it is named.
        verbatim: no surrogates: every attack's inner loop runs on the real defense.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; threads: torch CPU threads (``None``: torch's).
        fresh: discard this harness's saved state in ``out``; progress: progress bar.
        report_partial: run nothing, write the outputs of a stopped run (see :func:`eval.harness.run_robustness`).
        command: the command owning ``out`` (``robustness`` or ``defense``); command_line: recorded as is.
    """

    settings: RobustnessSettings
    out: Path
    defenses: tuple[str, ...] | None = None
    models: ModelSpecs = dataclasses.field(default_factory=ModelSpecs)
    data: str = "mnist"
    threats_chosen: bool = False
    purifier: PurifierSpec | None = None
    diffpure: DiffPureSpec | None = None
    verbatim: bool = False
    device: str = "auto"
    threads: int | None = None
    fresh: bool = False
    progress: bool = True
    report_partial: bool = False
    command: str = "robustness"
    command_line: str = "(Python API)"

    def __post_init__(self) -> None:
        if not isinstance(self.settings, RobustnessSettings):
            raise TypeError(f"expected settings as RobustnessSettings, got {type(self.settings).__name__}")
        if self.defenses is not None:
            unknown = [n for n in self.defenses if n not in DEFENSES]
            if unknown:
                raise ValueError(f"unknown defense {unknown}: expected a subset of {list(DEFENSES)}")


def load_zoo_models(
    device: torch.device,
    weights_dir: Path | None = None,
    *,
    classifier: str = "mnist-classifier",
    classifier_dir: Path | None = None,
) -> DefenseModels:
    """The zoo classifier ``classifier``, ``mnist-gan`` and ``mnist-encoder``, in eval mode on ``device``.

    Args:
        device: where the models go.
        weights_dir: zoo folder of the generator and encoder (and of the classifier unless ``classifier_dir``).
        classifier: :data:`CLASSIFIERS` name (``mnist-pgd-at``, ``mnist-l2-at`` and ``mnist-rmd`` are the robustly
            trained ones).
        classifier_dir: folder of the classifier's weights if not ``weights_dir`` (e.g. a training run's ``--out``).
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}: expected one of {list(CLASSIFIERS)}")
    return DefenseModels(
        zoo.load(classifier, device, weights_dir=classifier_dir or weights_dir).eval(),
        zoo.load("mnist-gan", device, weights_dir=weights_dir).eval(),
        zoo.load("mnist-encoder", device, weights_dir=weights_dir).eval(),
    )


def load_models(specs: ModelSpecs, device: torch.device, mnist: bool) -> Models:
    """The models ``specs`` names (zoo defaults on MNIST data; see :class:`ModelSpecs`)."""
    gen_name = specs.generator if specs.generator is not None else ("mnist-gan" if mnist else "none")
    enc_name = (
        specs.encoder
        if specs.encoder is not None
        else ("mnist-encoder" if gen_name == "mnist-gan" else "none")
    )
    zoo_dir = specs.weights_dir
    classifier = load_model(
        specs.classifier,
        "classifier",
        device,
        weights=specs.classifier_weights,
        zoo_dir=specs.classifier_dir or zoo_dir,
    )
    generator = encoder = None
    if gen_name != "none":
        generator = load_model(
            gen_name, "generator", device, weights=specs.generator_weights, zoo_dir=zoo_dir
        )
    if enc_name != "none":
        if generator is None:
            raise ValueError(
                "--encoder maps images to a generator's latents: expected --generator too, got none"
            )
        encoder = load_model(enc_name, "encoder", device, weights=specs.encoder_weights, zoo_dir=zoo_dir)
    what = f"classifier {specs.classifier}, generator {gen_name}, encoder {enc_name}"
    return Models(classifier, generator, encoder, what)


def build_defenses(
    names: tuple[str, ...],
    models: Models,
    seed: int = 0,
    *,
    surrogates: bool = True,
    diffpure: DiffPureSpec | None = None,
) -> list[Defense]:
    """The named defenses (:data:`DEFENSES`) over the given models.

    ``projection-defense-gan`` attacks through the fast schedule (its inner loops) and ``G(E(x))`` (the
    ``surrogate-pgd`` stage) when an encoder is given and ``surrogates``; ``projection-fast`` is cheap enough to
    be attacked directly (no surrogates: on the demo's 10 points ``G(E(x))``'s successes did not transfer to it).
    Raises ``ValueError`` for a defense the models do not allow (no generator / encoder).
    """
    from manifold_defense.presets import schedule_config

    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise ValueError(f"unknown defense {unknown}: expected a subset of {list(DEFENSES)}")
    clf, gen, enc = models.classifier, models.generator, models.encoder
    out: list[Defense] = []
    for name in names:
        if name == "undefended":
            out.append(undefended_defense(clf))
            continue
        if name in ("diffpure", "diffpure-fixed"):
            out.append(_diffpure(clf, diffpure, seed, surrogates, fixed=name == "diffpure-fixed"))
            continue
        if gen is None:
            raise ValueError(f"defense {name} projects onto a generator: expected --generator, got none")
        if name == "projection-fast" and enc is None:
            raise ValueError(
                "defense projection-fast starts from the encoder's E(x): expected --encoder, got none"
            )
        sur: dict[str, nn.Module] = {}
        inner = None
        if surrogates and enc is not None and name == "projection-defense-gan":
            sur = projection_surrogates(clf, gen, enc, schedule_config("fast", seed), seed=seed)
            inner = "fast"
        # Defense-GAN's schedule unrolls 2010 generator passes per image: with surrogates, the unrolled attack
        # differentiates through the fast schedule instead (verdicts stay the real defense's)
        unrolled = schedule_config("fast", seed) if inner == "fast" else None
        # the lean cascade's Square queries the differentiable one-shot projection G(E(x)) (verdicts: real defense)
        query = None if enc is None else ("encoder", ProjectedClassifier(clf, EncoderProjection(gen, enc)).eval())
        out.append(projection_defense(name, clf, gen, schedule_config(_SCHEDULE[name], seed), encoder=enc, seed=seed,
                                      surrogates=sur, surrogate=inner, unrolled_config=unrolled,
                                      query_stand_in=query))  # fmt: skip
    return out


def _diffpure(
    classifier: nn.Module, spec: DiffPureSpec | None, seed: int, surrogates: bool, *, fixed: bool = False
) -> Defense:
    if spec is None:
        raise ValueError("defense diffpure needs its diffusion time: expected --diffpure-t-star (DiffPureSpec), got none")
    device = next(classifier.parameters()).device
    prior = zoo.load("mnist-ddpm", device, weights_dir=spec.weights_dir)
    return diffpure_defense(
        classifier, prior, spec.t_star, spec.steps, eta=spec.eta, seed=seed,
        surrogate_steps=spec.surrogate_steps if surrogates else None, randomize=not fixed,
        name="diffpure-fixed" if fixed else "diffpure",
    )  # fmt: skip


def check_image_shape(shape: tuple[int, ...], threats_chosen: bool) -> None:
    """Refuse MNIST's default budgets on images of another shape (``ValueError`` naming ``--threats``)."""
    if shape != MNIST_SHAPE and not threats_chosen:
        raise ValueError(
            f"the images have shape {shape}, not MNIST's {MNIST_SHAPE}: the default threat models "
            f"{','.join(DEFAULT_THREATS)} are MNIST's budgets; pass --threats NORM-EPS[,...] chosen for your images"
        )


def _default_defenses(models: Models, quick: bool) -> tuple[str, ...]:
    """Every defense the models allow (quick: the classifier and one projection)."""
    full: list[str] = [
        d
        for d in DEFENSES
        if not d.startswith("diffpure")  # only when named: it needs its t* and the diffusion prior
        and (
            d == "undefended"
            or (models.generator is not None and (d != "projection-fast" or models.encoder is not None))
        )
    ]
    if quick:
        full = full[:1] + [str(d) for d in ("projection-fast", "projection-defense-gan") if d in full][:1]
    return tuple(full)


def evaluation_defenses(
    request: Evaluation, models: Models, x: torch.Tensor, settings: RobustnessSettings | None = None
) -> list[Defense]:
    """The defenses ``request`` evaluates over ``models``: its named ones (:func:`build_defenses`; ``None``:
    every one the models allow, or only ``undefended`` beside a user's purifier), then the user's purifier
    (defense ``purified``), whose calibration reads the points ``x``. ``settings``: the settings the run uses
    (default ``request.settings``). The same defenses a run of ``request`` attacks, so a later reader of the
    run (e.g. ``break-anatomy``) rebuilds them from its recorded command."""
    settings = request.settings if settings is None else settings
    purified = None
    if request.purifier is not None:
        purified = purifier_defense_from_spec(
            request.purifier, models.classifier, x, settings.seed, request.verbatim
        )
    names = request.defenses
    if names is None:
        names = ("undefended",) if purified is not None else _default_defenses(models, settings.quick)
    built = build_defenses(
        names, models, settings.seed, surrogates=not request.verbatim, diffpure=request.diffpure
    )
    return built + ([purified] if purified is not None else [])


def run_evaluation(request: Evaluation) -> dict[str, Any]:
    """Load the data and models of ``request`` and run :func:`eval.harness.run_robustness` (distributed under
    torchrun); its results record.

    Images of another shape than MNIST's need threats chosen for them (:func:`check_image_shape`); their curve
    budgets are derived from the threats (:func:`eval.harness.settings.default_curve_eps`).
    """
    from manifold_defense.presets import schedule_config
    from manifold_defense.training.distributed import setup_distributed

    if request.threads is not None:
        torch.set_num_threads(request.threads)
    settings = request.settings
    ctx = setup_distributed(request.device)
    x, y, what = load_data(request.data, settings.n, ctx.device)
    shape = tuple(int(s) for s in x.shape[1:])
    check_image_shape(shape, request.threats_chosen or request.data == "mnist")
    if shape != MNIST_SHAPE and (settings.curve_eps_linf or settings.curve_eps_l2):
        settings = dataclasses.replace(settings, **default_curve_eps(settings.threats, shape))  # type: ignore[arg-type]
    models = load_models(request.models, ctx.device, mnist=request.data == "mnist")
    check_data_fits_models(x, y, what, models.classifier, models.generator, models.encoder)
    built = evaluation_defenses(request, models, x, settings)
    meta = {
        "command": request.command_line,
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": what,
        "models": models.description,
        "latent_start": "fast schedule (encoder warm start) inversion of each point"
        if models.encoder is not None
        else "Defense-GAN schedule inversion of each point",
    }
    latent_cfg = schedule_config("fast" if models.encoder is not None else "defense-gan", settings.seed)
    return run_robustness(
        settings, built, x, y, request.out, generator=models.generator, encoder=models.encoder,
        latent_config=latent_cfg, ctx=ctx, progress=request.progress, fresh=request.fresh, meta=meta,
        command=request.command, report_partial=request.report_partial,
    )  # fmt: skip
