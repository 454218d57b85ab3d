"""The stage registry of the harness: typed stage keys, the :class:`Stage` contract and the ordered registry of
the attack cascade.

A stage of the cascade is one small class (:mod:`eval.harness.cascade` holds the built-in ones): its ``name``,
its one-line ``doc``, which defenses it applies to (:meth:`Stage.skip_reason`), its settings as the attack's own
config object (:meth:`Stage.config`), the points it attacks (:meth:`Stage.points`) and its chunk function
(:meth:`Stage.chunk_fn`). The runner (:mod:`eval.harness.runner`) runs every registered stage the settings name
through the same chunk runner (per-chunk seeds, resume, ``torchrun`` sharding: :mod:`eval.harness.state`), judges
every adversarial example on the real defense (:meth:`StageEnv.judge`) and records it.

Adding a stage is one class::

    @register_stage
    class Blur(Stage):
        name = "blur"
        doc = "a Gaussian blur of the image, judged by the defense"

        def config(self, env): return BlurConfig(sigma=1.0)
        def chunk_fn(self, env, config):
            def fn(chunk):
                x = env.x[chunk]
                return env.judge(chunk, project_onto_threat(blur(x, config.sigma), x, env.threat))
            return fn

after which ``RobustnessSettings(attacks=(..., "blur"))`` runs it, resumes it and reports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from attacks import ThreatModel
    from eval.harness.defenses import Defense
    from eval.harness.settings import RobustnessSettings

__all__ = [
    "ChunkFn",
    "Stage",
    "StageEnv",
    "StageKey",
    "StageView",
    "convergence_key",
    "curve_threats",
    "ladder_keys",
    "register_stage",
    "registered_stages",
    "stage",
    "stage_keys",
    "unregister_stage",
]

#: A stage's work on one chunk of global point indices: per-point result tensors (``robust``, ``first_ok``,
#: ``x_adv``, ``distance`` for an attack; see :meth:`StageEnv.judge`).
ChunkFn = Callable[[Tensor], dict[str, Tensor]]


@dataclass(frozen=True)
class StageKey:
    """Which stage of which defense.

    Attributes:
        defense: the defense's name.
        threat: the threat model's key (``"linf-0.3"``), or the curve budget's for ``attack == "curve"``;
            ``None`` for the stages of a defense as a whole (``info``, ``clean``, ``projection``).
        attack: the stage: an attack of the cascade, ``"convergence"``, ``"curve"``, ``"examples"``, ``"info"``,
            ``"clean"`` or ``"projection"``.
    """

    defense: str
    threat: str | None
    attack: str

    def __post_init__(self) -> None:
        for name in ("defense", "threat", "attack"):
            value = getattr(self, name)
            if value is None and name == "threat":
                continue
            if not isinstance(value, str) or not value or "|" in value:
                raise ValueError(
                    f"expected the stage key's {name} as a non-empty name without '|', got {value!r}"
                )

    @property
    def label(self) -> str:
        """The key without the defense: ``"clean"``, ``"linf-0.3|pgd"``, ``"curve|l2-1"`` (the cost table's rows)."""
        if self.threat is None:
            return self.attack
        if self.attack == "curve":
            return f"curve|{self.threat}"
        return f"{self.threat}|{self.attack}"

    @property
    def text(self) -> str:
        """``defense|label``: the key of the stage in the saved state and the label its chunk seeds derive from
        (:func:`eval.harness.state.chunk_seed`); written, never parsed back."""
        return f"{self.defense}|{self.label}"


@dataclass
class StageEnv:
    """What a stage sees of one (defense, threat) cascade.

    Attributes:
        settings: the run's :class:`~eval.harness.RobustnessSettings`; defense: the evaluated
            :class:`~eval.harness.Defense`; threat: the threat model.
        x, y: every evaluation point (``(N, C, H, W)`` images in [0, 1], ``(N,)`` labels, the run's device).
        draws: fresh forward passes per verdict (1 for a deterministic defense); randomized: the defense is
            randomized (EOT stages run).
        pool: ``(n,)`` bool, the points a stage attacks by default: those still robust (cascade) or every
            clean-correct point (each attack alone).
        survivors: ``(n,)`` bool, the points still robust after every stage so far (in either mode).
        after_pgd: ``(n,)`` bool, the points ``pgd`` left (cascade) or the clean-correct ones (each alone).
        generator: the generator of the latent attacks, or ``None``.
        surrogate_randomized: per surrogate name, whether its output changes between calls.
        judge: ``(chunk, x_adv, base_ok=None) -> results``: the real defense's verdict on ``x_adv`` (adversarial
            examples of the points ``chunk``): ``robust`` (correct in ``base_ok`` and in each of ``draws`` fresh
            passes), ``first_ok``, ``x_adv``, ``distance`` (per point, in the threat's norm).
        latents: ``chunk -> (len(chunk), k)`` starting latents ``z = invert(x)`` of the points (saved, reused).
    """

    settings: RobustnessSettings
    defense: Defense
    threat: ThreatModel
    x: Tensor
    y: Tensor
    draws: int
    randomized: bool
    pool: Tensor
    survivors: Tensor
    after_pgd: Tensor
    generator: nn.Module | None
    surrogate_randomized: Mapping[str, bool]
    judge: Callable[..., dict[str, Tensor]]
    latents: Callable[[Tensor], Tensor]

    def rerun(self) -> StageEnv:
        """This cascade as the convergence rerun sees it: every pool is the survivors."""
        s = self.survivors
        return dataclasses.replace(self, pool=s.clone(), after_pgd=s.clone())


@dataclass(frozen=True)
class StageView:
    """What a stage's report hook sees: its saved record, and the other stages of its (defense, threat).

    Attributes:
        rec: the stage's saved record; settings: the run's settings; threat: the threat key; n: the defense's
            points; newly: points this stage newly broke (cascade order); before: ``(n,)`` robust before it;
        stages: every saved record of the run by :attr:`StageKey.text`; defense: the defense's name;
        surrogate_inner: the defense's inner surrogate name, or ``None``.
    """

    rec: Mapping[str, Any]
    settings: RobustnessSettings
    threat: str
    n: int
    newly: int
    before: Tensor
    stages: Mapping[str, Any]
    defense: str
    surrogate_inner: str | None

    def other(self, attack: str) -> Mapping[str, Any] | None:
        """The saved record of another stage of this (defense, threat), ``None`` when absent."""
        return self.stages.get(StageKey(self.defense, self.threat, attack).text)


class Stage:
    """One attack of the cascade (see module docs). Subclasses set :attr:`name` and :attr:`doc` and implement
    :meth:`config` and :meth:`chunk_fn`; the other methods have defaults.

    Attributes:
        name: the stage's name (``--attacks``, the report's column, :attr:`StageKey.attack`).
        doc: one line for the report and ``results.json``'s ``attack_definitions``.
        gradient: a white-box gradient attack (the convergence check reruns the strongest of these; see
            :meth:`white_box`).
    """

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    gradient: ClassVar[bool] = False

    def config(self, env: StageEnv) -> Any:
        """The attack's own config object for this defense and threat (from ``env.settings``)."""
        raise NotImplementedError

    def white_box(self, env: StageEnv) -> bool:
        """Whether the stage is a white-box gradient attack on ``env.defense`` (a convergence rerun candidate);
        default :attr:`gradient`."""
        return self.gradient

    def skip_reason(self, env: StageEnv) -> str | None:
        """Why this stage does not apply to ``env.defense`` (recorded and shown), ``None`` when it does."""
        return None

    def points(self, env: StageEnv) -> Tensor:
        """The global indices of the points attacked (default: the pool)."""
        return env.pool.nonzero().squeeze(1)

    def chunk_size(self, env: StageEnv) -> int:
        """Points per chunk (default ``settings.batch_size``)."""
        return int(env.settings.batch_size)

    def chunk_fn(self, env: StageEnv, config: Any) -> ChunkFn:
        """The function attacking one chunk of points with ``config`` (results: :meth:`StageEnv.judge`'s, plus
        ``surrogate_broken`` when the inner loop ran on a stand-in of the defense)."""
        raise NotImplementedError

    def describe(self, env: StageEnv, config: Any) -> dict[str, Any]:
        """The settings recorded with the stage (default: the config's fields)."""
        from eval.harness.settings import jsonable

        out = jsonable(config)
        return dict(out) if isinstance(out, Mapping) else {"config": out}

    def on_surrogate(self, env: StageEnv) -> bool:
        """Whether the inner loop runs on the defense's named surrogate (its transfer is then checked)."""
        return False

    def stronger(self, env: StageEnv, config: Any) -> Any:
        """The convergence rerun's config: twice the steps, and twice the EOT samples on a randomized defense
        (:func:`eval.harness.configs.doubled`)."""
        from eval.harness.configs import doubled

        return doubled(config, eot=env.randomized)

    def record_parts(self, env: StageEnv, parts: Mapping[str, Tensor]) -> dict[str, Any]:
        """Stage-specific entries of the saved record, from the concatenated chunk results (default none)."""
        return {}

    def report(self, view: StageView) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Stage-specific fields of the record's entry and red-flag checks (default none)."""
        return {}, []


_REGISTRY: dict[str, Stage] = {}
S = TypeVar("S", bound=type[Stage])


def register_stage(cls: S, *, after: str | None = None) -> S:
    """Register the stage class ``cls`` (instantiated once) at the end of the cascade, or right ``after`` the
    stage of that name; usable as a decorator. Returns ``cls``.

    Raises:
        TypeError: ``cls`` is not a :class:`Stage` subclass. ValueError: a bad or taken name, unknown ``after``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise TypeError(f"expected a Stage subclass, got {cls!r}")
    name = cls.name
    reserved = ("clean", "convergence", "curve", "examples", "info", "projection")
    if (
        not isinstance(name, str) or not name or "|" in name or name in reserved
        or name.startswith("convergence-")
    ):  # fmt: skip
        raise ValueError(
            f"expected a stage name without '|', not one of {list(reserved)} nor 'convergence-K', got {name!r}"
        )
    if name in _REGISTRY:
        raise ValueError(f"a stage named {name!r} is registered already ({type(_REGISTRY[name]).__name__})")
    if after is not None and after not in _REGISTRY:
        raise ValueError(f"expected after= to name a registered stage {list(_REGISTRY)}, got {after!r}")
    items = list(_REGISTRY.items())
    at = len(items) if after is None else [k for k, _ in items].index(after) + 1
    items.insert(at, (name, cls()))
    _REGISTRY.clear()
    _REGISTRY.update(items)
    return cls


def unregister_stage(name: str) -> None:
    """Remove the stage ``name`` from the registry (``KeyError`` naming the registered ones otherwise)."""
    if name not in _REGISTRY:
        raise KeyError(f"no stage {name!r} is registered; registered: {list(_REGISTRY)}")
    del _REGISTRY[name]


def registered_stages() -> tuple[str, ...]:
    """The names of the registered stages, in cascade order."""
    return tuple(_REGISTRY)


def stage(name: str) -> Stage:
    """The registered stage ``name`` (``KeyError`` naming the registered ones otherwise)."""
    if name not in _REGISTRY:
        raise KeyError(f"no stage {name!r} is registered; registered: {list(_REGISTRY)}")
    return _REGISTRY[name]


def stage_keys(settings: RobustnessSettings, defense: str, projection: bool) -> list[StageKey]:
    """Every stage of defense ``defense`` that a run with ``settings`` saves, in run order: ``info``, ``clean``,
    ``projection`` (when the defense has a preprocess), the cascade of each threat, the curves, the example grids
    and the convergence rerun of each threat."""
    keys = [StageKey(defense, None, "info"), StageKey(defense, None, "clean")]
    keys += [StageKey(defense, None, "projection")] if projection else []
    keys += [StageKey(defense, t, a) for t in settings.threats for a in settings.attacks[1:]]
    keys += [StageKey(defense, tk, "curve") for tk in curve_threats(settings)]
    keys += [StageKey(defense, t, "examples") for t in settings.threats]
    return keys + [StageKey(defense, t, "convergence") for t in settings.threats]


def convergence_key(defense: str, threat: str, round_: int) -> StageKey:
    """The key of rerun ``round_`` (1, 2, ...) of the convergence ladder of ``defense`` under ``threat``:
    ``convergence`` for the first (the single rerun of every run), ``convergence-K`` for rerun ``K >= 2``."""
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
        raise ValueError(f"expected the ladder's round as an int >= 1, got {round_!r}")
    return StageKey(defense, threat, "convergence" if round_ == 1 else f"convergence-{round_}")


def ladder_keys(stages: Mapping[str, Any], defense: str, threat: str) -> list[StageKey]:
    """The keys of the convergence ladder's reruns that ``stages`` (saved records by :attr:`StageKey.text`) holds,
    in order: ``convergence``, ``convergence-2``, ... up to the first missing one."""
    keys: list[StageKey] = []
    while (key := convergence_key(defense, threat, len(keys) + 1)).text in stages:
        keys.append(key)
    return keys


def curve_threats(settings: RobustnessSettings) -> list[str]:
    """The threat keys of the accuracy-vs-eps curve points, Linf first (the norms among the threats)."""
    from eval.harness.settings import parse_threat

    norms = sorted({parse_threat(t).norm.value for t in settings.threats}, key=lambda v: v != "linf")
    out = []
    for norm in norms:
        eps = settings.curve_eps_linf if norm == "linf" else settings.curve_eps_l2
        out += [f"{norm}-{e:g}" for e in eps]
    return out
