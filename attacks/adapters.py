"""Adapters running torchattacks and foolbox attacks behind the :class:`attacks.base.Attack` contract.

torchattacks (Kim, "Torchattacks: A PyTorch Repository for Adversarial Attacks", arXiv 2010.01950) and
foolbox 3 (Rauber, Zimmermann, Bethge, Brendel, JOSS 2020) attack any ``nn.Module`` from [0, 1] images to
logits, the defended model included. Wrapped here they go through the same validation, projection onto the
threat model and success evaluation as :class:`attacks.pgd.PGD`, and return the same
:class:`attacks.base.AttackResult`; cross-checking our PGD against them is one line.

Both libraries draw their random starts from torch's global generator; the adapters run them inside
``torch.random.fork_rng`` seeded with ``seed``, so results are reproducible and the caller's global RNG
state is left as it was.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from attacks.base import Attack, Model, Norm, ThreatModel

__all__ = [
    "AUTOATTACK_REFERENCE",
    "FOOLBOX_ATTACKS",
    "TORCHATTACKS_ATTACKS",
    "AutoAttackReference",
    "FoolboxAttack",
    "TorchattacksAttack",
]

logger = logging.getLogger(__name__)

TORCHATTACKS_ATTACKS: dict[str, frozenset[Norm]] = {
    "PGD": frozenset({Norm.LINF}),
    "PGDL2": frozenset({Norm.L2}),
    "EOTPGD": frozenset({Norm.LINF}),
    "APGD": frozenset({Norm.LINF, Norm.L2}),
    "APGDT": frozenset({Norm.LINF, Norm.L2}),
    "FAB": frozenset({Norm.LINF, Norm.L2}),
    "Square": frozenset({Norm.LINF, Norm.L2}),
    "AutoAttack": frozenset({Norm.LINF, Norm.L2}),
}
"""torchattacks attack names -> the norms they support; attacks whose constructor takes ``norm=`` get it
from the threat model."""
_TORCHATTACKS_TAKE_NORM = frozenset({"APGD", "APGDT", "FAB", "Square", "AutoAttack"})
#: Attacks whose constructor takes ``n_classes`` (default: the model's output size, as AutoAttack's wrapper does)
#: and ``seed`` (default: the adapter's ``seed``), with the fewest classes each accepts: APGD-T's targeted DLR
#: loss reads the 1st, 3rd and 4th largest logits; FAB needs a class to target; AutoAttack's versions check theirs.
_TORCHATTACKS_CLASSES = {"APGDT": 4, "FAB": 2, "AutoAttack": 1}
#: torchattacks attacks with a ``seed`` argument of their own (they reseed torch with it, default 0).
_TORCHATTACKS_SEEDED = frozenset({"APGD", "APGDT", "FAB", "Square", "AutoAttack"})

FOOLBOX_ATTACKS: dict[str, frozenset[Norm]] = {
    "LinfPGD": frozenset({Norm.LINF}),
    "L2PGD": frozenset({Norm.L2}),
    "L2CarliniWagnerAttack": frozenset({Norm.L2}),
    "BoundaryAttack": frozenset({Norm.L2}),
}
"""foolbox attack names -> the norms they support. Minimization attacks (CW, Boundary) are run with
``epsilons=eps`` and their result is then projected onto the eps-ball like every other attack's."""


def _check_name(name: Any, table: dict[str, frozenset[Norm]], library: str, threat: ThreatModel) -> str:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"expected a {library} attack name, one of {sorted(table)}, got {name!r}")
    if threat.norm not in table[name]:
        norms = sorted(n.value for n in table[name])
        raise ValueError(
            f"expected a threat model with norm in {norms} for {library}.{name}, got {threat.norm.value!r}"
        )
    return name


class _AsModule(nn.Module):
    """Wrap a plain callable so libraries that need an ``nn.Module`` can call it."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.eval()  # a plain function has no training mode; keeps foolbox from warning

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _as_module(model: Model) -> nn.Module:
    return model if isinstance(model, nn.Module) else _AsModule(model)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


class TorchattacksAttack(Attack):
    """Run a torchattacks attack (untargeted) as an :class:`attacks.base.Attack`.

    Threat model: the given one; ``eps`` (and ``norm`` for APGD, APGDT, FAB, Square, AutoAttack) come from it.

    Args:
        name: one of ``"PGD"``, ``"PGDL2"``, ``"EOTPGD"``, ``"APGD"``, ``"APGDT"``, ``"FAB"``, ``"Square"``,
            ``"AutoAttack"`` (:data:`TORCHATTACKS_ATTACKS`); other names raise ``ValueError`` listing the valid ones.
        threat: :class:`ThreatModel`; its norm must be supported by the attack.
        seed: seed of torch's RNG while the attack runs (default 0); ``None`` leaves it unseeded. APGD, APGDT, FAB,
            Square and AutoAttack also get it as their own ``seed`` argument (they reseed torch with it) unless
            given.
        **kwargs: the torchattacks constructor's other arguments, e.g. ``alpha=0.01, steps=40,
            random_start=True`` for PGD; ``multi_targeted=True`` for FAB-T. The ``n_classes`` of APGDT (which
            targets the ``n_classes - 1`` most likely other classes in turn), FAB and AutoAttack defaults to the
            model's output size; APGDT needs at least 4 classes, FAB 2 (``ValueError`` otherwise).

    Shapes: as :class:`attacks.base.Attack`.

    Example:
        >>> attack = TorchattacksAttack("PGD", ThreatModel(Norm.LINF, 0.3), alpha=0.01, steps=40)
        >>> result = attack(model.eval(), x, y)    # doctest: +SKIP
    """

    def __init__(self, name: str, threat: ThreatModel, seed: int | None = 0, **kwargs: Any) -> None:
        super().__init__(threat)
        self.name = _check_name(name, TORCHATTACKS_ATTACKS, "torchattacks", threat)
        for reserved in ("model", "eps", "norm"):
            if reserved in kwargs:
                raise ValueError(
                    f"expected {reserved!r} to come from the threat model / call, got it in kwargs"
                )
        self.seed = seed
        self.kwargs = kwargs

    def run(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        """Build the torchattacks attack on ``model`` and run it on ``(x, y)``."""
        import torchattacks

        module = _as_module(model)
        kwargs = dict(self.kwargs)
        if self.name in _TORCHATTACKS_TAKE_NORM:
            kwargs["norm"] = "Linf" if self.threat.norm is Norm.LINF else "L2"
        if self.name in _TORCHATTACKS_CLASSES:
            if "n_classes" not in kwargs:
                with torch.no_grad():
                    kwargs["n_classes"] = int(model(x[:1]).shape[1])
            least = _TORCHATTACKS_CLASSES[self.name]
            classes = kwargs["n_classes"]
            if isinstance(classes, bool) or not isinstance(classes, int) or classes < least:
                raise ValueError(
                    f"expected torchattacks.{self.name} on a model of at least {least} classes, got n_classes "
                    f"{classes!r}"
                )
        if "seed" not in kwargs and self.seed is not None and self.name in _TORCHATTACKS_SEEDED:
            kwargs["seed"] = self.seed  # they reseed torch with their own seed (default 0) when they run
        with _seeded(self.seed, x.device):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):  # torchattacks prints instead of logging
                attack = getattr(torchattacks, self.name)(module, eps=self.threat.eps, **kwargs)
                attack.set_device(x.device)
                x_adv = attack(x, y)
            if out.getvalue():
                logger.debug("torchattacks.%s printed: %s", self.name, out.getvalue().strip())
        return x_adv.detach()

    def __repr__(self) -> str:
        return f"TorchattacksAttack({self.name!r}, {self.threat}, seed={self.seed}, **{self.kwargs})"


AUTOATTACK_REFERENCE: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "standard": (
        ("APGD", {"loss": "ce", "steps": 100, "n_restarts": 1}),
        ("APGDT", {"steps": 100, "n_restarts": 1}),
        ("FAB", {"multi_targeted": True, "steps": 100, "n_restarts": 1}),
        ("Square", {"n_queries": 5000, "n_restarts": 1}),
    ),
    "plus": (
        ("APGD", {"loss": "ce", "steps": 100, "n_restarts": 5}),
        ("APGD", {"loss": "dlr", "steps": 100, "n_restarts": 5}),
        ("FAB", {"multi_targeted": False, "steps": 100, "n_restarts": 5}),
        ("Square", {"n_queries": 5000, "n_restarts": 1}),
        ("APGDT", {"steps": 100, "n_restarts": 1}),
        ("FAB", {"multi_targeted": True, "steps": 100, "n_restarts": 1}),
    ),
    "rand": (
        ("APGD", {"loss": "ce", "steps": 100, "n_restarts": 1, "eot_iter": 20}),
        ("APGD", {"loss": "dlr", "steps": 100, "n_restarts": 1, "eot_iter": 20}),
    ),
}
"""AutoAttack's versions at the reference implementation's budget (Croce and Hein's ``auto-attack``,
``set_version``): the torchattacks parts in order and their constructor arguments. 100 iterations for APGD,
APGD-T (every other class targeted in turn) and FAB, 5000 queries for Square; ``plus`` with 5 restarts of the
untargeted attacks, ``rand`` with 20 EOT samples per step."""


class AutoAttackReference(Attack):
    """AutoAttack (Croce and Hein, ICML 2020) at the reference implementation's budget, from torchattacks' parts.

    torchattacks' ``AutoAttack`` wrapper builds APGD, APGD-T and FAB with their constructors' default of 10
    iterations where the reference implementation runs 100; on a classifier whose cross-entropy is flat at the
    budget (an Linf-trained model attacked at l2) that tenth of the budget misses points the reference breaks.
    This attack runs the parts of :data:`AUTOATTACK_REFERENCE` in order, each on the points the parts before it
    left correctly classified; a point keeps the first adversarial image that fooled the model (the reference's
    and torchattacks' ``MultiAttack`` rule).

    Threat model: the given one, Linf or l2, white box (``rand``: a randomized model, gradients averaged over
    20 draws per step).

    Args:
        threat: :class:`ThreatModel`, Linf or l2.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"plus"`` or ``"rand"``.
        seed: every part's seed (the reference seeds all its attacks alike); ``None`` leaves them unseeded.

    Shapes: as :class:`attacks.base.Attack`; ``x`` ``(B, C, H, W)`` in [0, 1], ``y`` ``(B,)`` int64.
    """

    def __init__(self, threat: ThreatModel, version: str = "standard", seed: int | None = 0) -> None:
        super().__init__(threat)
        if not isinstance(version, str) or version not in AUTOATTACK_REFERENCE:
            raise ValueError(f"expected version in {sorted(AUTOATTACK_REFERENCE)}, got {version!r}")
        self.version = version
        self.parts = tuple(
            TorchattacksAttack(name, threat, seed=seed, **kwargs) for name, kwargs in AUTOATTACK_REFERENCE[version]
        )

    def run(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        """Run the parts in order on the points still classified correctly; return the first success per point."""
        with torch.no_grad():
            left = model(x).argmax(dim=1) == y
        for part in self.parts:
            idx = left.nonzero().flatten()
            if idx.numel() == 0:
                break
            result = part(model, x[idx], y[idx])
            broken = idx[result.success]
            x[broken] = result.x_adv[result.success]
            left[broken] = False
        return x

    def __repr__(self) -> str:
        return f"AutoAttackReference({self.threat}, version={self.version!r})"


class FoolboxAttack(Attack):
    """Run a foolbox 3 attack (untargeted, ``bounds=(0, 1)``) as an :class:`attacks.base.Attack`.

    Threat model: the given one; ``eps`` is passed as foolbox's ``epsilons``.

    Args:
        name: one of ``"LinfPGD"``, ``"L2PGD"``, ``"L2CarliniWagnerAttack"``, ``"BoundaryAttack"``
            (:data:`FOOLBOX_ATTACKS`); other names raise ``ValueError`` listing the valid ones.
        threat: :class:`ThreatModel`; its norm must be supported by the attack.
        seed: seed of torch's RNG while the attack runs (default 0); ``None`` leaves it unseeded.
        **kwargs: the foolbox constructor's arguments, e.g. ``abs_stepsize=0.01, steps=40`` for LinfPGD.

    Shapes: as :class:`attacks.base.Attack`.

    Example:
        >>> attack = FoolboxAttack("LinfPGD", ThreatModel(Norm.LINF, 0.3), abs_stepsize=0.01, steps=40)
        >>> result = attack(model.eval(), x, y)    # doctest: +SKIP
    """

    def __init__(self, name: str, threat: ThreatModel, seed: int | None = 0, **kwargs: Any) -> None:
        super().__init__(threat)
        self.name = _check_name(name, FOOLBOX_ATTACKS, "foolbox", threat)
        self.seed = seed
        self.kwargs = kwargs

    def run(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        """Wrap ``model`` in ``foolbox.PyTorchModel`` on ``x``'s device and run the attack at ``eps``."""
        import foolbox

        module = _as_module(model)
        fmodel = foolbox.PyTorchModel(module, bounds=(0.0, 1.0), device=x.device)
        attack = getattr(foolbox.attacks, self.name)(**self.kwargs)
        with _seeded(self.seed, x.device):
            _, clipped, _ = attack(fmodel, x, y, epsilons=self.threat.eps)
        return clipped.detach()

    def __repr__(self) -> str:
        return f"FoolboxAttack({self.name!r}, {self.threat}, seed={self.seed}, **{self.kwargs})"
