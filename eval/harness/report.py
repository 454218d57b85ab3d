"""The typed report of a robustness run (:func:`eval.harness.evaluate_robustness`), read from its results record
(``results.json``, schema in :mod:`eval.robustness_report`): per defense the cascade stage by stage, the verdicts
of the real defense, the transfer counts of stand-in attacks and the red-flag checks.

Every figure is the record's (nothing is recomputed); :attr:`RobustnessReport.record` keeps the whole record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Check", "DefenseReport", "RobustnessReport", "StageReport", "Transfer"]


@dataclass(frozen=True)
class Transfer:
    """How many successes of an attack's stand-in (a surrogate, or the bare classifier for ``pgd``) transferred
    to the real defense.

    Attributes:
        attacked: points attacked; surrogate_broken: points the stand-in misclassified (its own success);
        transferred: those the real defense misclassifies too; not_transferred: the others;
        broken, broken_without_surrogate: points the real defense misclassifies, and those among them the
            stand-in got right (``None`` in the per-surrogate counts).
    """

    attacked: int
    surrogate_broken: int
    transferred: int
    not_transferred: int
    broken: int | None = None
    broken_without_surrogate: int | None = None

    @classmethod
    def from_record(cls, entry: Mapping[str, Any]) -> Transfer:
        """The counts of a record's ``transfer`` (or ``by_surrogate``) entry."""
        whole = "broken" in entry
        return cls(
            attacked=int(entry["attacked"]),
            surrogate_broken=int(entry["surrogate_broken"]),
            transferred=int(entry["transferred"]),
            not_transferred=int(entry["not_transferred"]),
            broken=int(entry["broken"]) if whole else None,
            broken_without_surrogate=int(entry["broken_without_surrogate"]) if whole else None,
        )


@dataclass(frozen=True)
class StageReport:
    """One attack of the cascade under one threat model.

    Attributes:
        attack, threat: e.g. ``"bpda-pgd"``, ``"linf-0.3"``.
        status: ``"ran"`` or ``"skipped"`` (``reason`` says why).
        accuracy: robust accuracy after this stage (the real defense's verdicts, worst case over the cascade so
            far); ``None`` when skipped.
        attacked: points attacked; broken: points this stage newly broke.
        through: the model the attack's inner loop ran on, when the record names it.
        transfer: stand-in successes that transferred (``None`` when the inner loop ran on the real defense);
        by_surrogate: the same per surrogate (``surrogate-pgd``).
    """

    attack: str
    threat: str
    status: str
    accuracy: float | None
    attacked: int
    broken: int
    reason: str | None
    through: str | None
    transfer: Transfer | None
    by_surrogate: Mapping[str, Transfer]

    @property
    def ran(self) -> bool:
        """Whether the stage ran (else it was skipped, see ``reason``)."""
        return self.status == "ran"


@dataclass(frozen=True)
class Check:
    """One red-flag check: ``flag`` (a name of :data:`eval.harness.FLAGS`), ``status`` (``"ok"``, ``"flag"`` or
    ``"n/a"``), ``where`` (threat, norm or gradient source) and ``detail``."""

    flag: str
    status: str
    where: str
    detail: str


@dataclass(frozen=True)
class DefenseReport:
    """The results of one defense.

    Attributes:
        name, n: the defense and its number of points.
        randomized: its forward pass is random (verdicts are then worst case over ``draws`` fresh passes).
        clean: clean accuracy; worst_case: ``threat -> robust accuracy`` (worst case per point over the cascade).
        majority_vote: ``threat -> robust accuracy`` under the majority-vote verdict (the ``majority`` setting on
            a randomized defense; an upper bound beside the worst case), else ``None``.
        stages: every (attack, threat) stage in cascade order, threat by threat, the ``convergence`` rerun last;
            checks: every red-flag check.
    """

    name: str
    n: int
    randomized: bool
    draws: int
    clean: float
    worst_case: Mapping[str, float]
    stages: tuple[StageReport, ...]
    checks: tuple[Check, ...]
    majority_vote: Mapping[str, float] | None = None

    @property
    def flags(self) -> tuple[Check, ...]:
        """The checks that fired."""
        return tuple(c for c in self.checks if c.status == "flag")

    def flagged(self, flag: str) -> bool:
        """Whether the check ``flag`` fired anywhere."""
        return any(c.flag == flag for c in self.flags)

    def stage(self, attack: str, threat: str) -> StageReport:
        """The stage of ``attack`` under ``threat`` (``KeyError`` naming the stages there are otherwise)."""
        for s in self.stages:
            if s.attack == attack and s.threat == threat:
                return s
        raise KeyError(
            f"defense {self.name!r} has no stage {attack!r} under {threat!r}; stages: "
            f"{sorted({(s.attack, s.threat) for s in self.stages})}"
        )

    @classmethod
    def from_record(cls, name: str, entry: Mapping[str, Any], threats: tuple[str, ...]) -> DefenseReport:
        """The report of defense ``name`` from its entry of a results record (``record["defenses"][name]``)."""
        stages = []
        for tk in threats:
            for attack, per_threat in entry["attacks"].items():
                e = per_threat[tk]
                t = e.get("transfer")
                by = {m: Transfer.from_record(c) for m, c in (t or {}).get("by_surrogate", {}).items()}
                stages.append(
                    StageReport(
                        attack=attack,
                        threat=tk,
                        status=e["status"],
                        accuracy=e.get("accuracy"),
                        attacked=int(e.get("attacked", 0)),
                        broken=int(e.get("broken", 0)),
                        reason=e.get("reason"),
                        through=(e.get("settings") or {}).get("through"),
                        transfer=None if t is None else Transfer.from_record(t),
                        by_surrogate=by,
                    )
                )
        checks = tuple(Check(c["flag"], c["status"], str(c["where"]), c["detail"]) for c in entry["checks"])
        return cls(
            name=name,
            n=int(entry["n"]),
            randomized=bool(entry["randomized"]),
            draws=int(entry["draws"]),
            clean=float(entry["clean"]),
            worst_case={k: float(v) for k, v in entry["worst_case"].items()},
            stages=tuple(stages),
            checks=checks,
            majority_vote=None if not entry.get("majority_vote") else dict(entry["majority_vote"]["accuracy"]),
        )


@dataclass(frozen=True)
class RobustnessReport:
    """The typed view of a run's results record.

    Attributes:
        threats: the threat models, e.g. ``("linf-0.3",)``; n: evaluation points.
        defenses: ``name -> DefenseReport`` in evaluation order (also ``report[name]``).
        record: the whole results record (``results.json``); out: the folder holding ``report.md``,
            ``results.json`` and the plots, ``None`` when the run wrote to a temporary folder.
    """

    threats: tuple[str, ...]
    n: int
    defenses: Mapping[str, DefenseReport]
    record: Mapping[str, Any]
    out: Path | None

    def __getitem__(self, name: str) -> DefenseReport:
        if name not in self.defenses:
            raise KeyError(f"no defense {name!r} in the report; defenses: {list(self.defenses)}")
        return self.defenses[name]

    @classmethod
    def from_record(cls, record: Mapping[str, Any], out: Path | None = None) -> RobustnessReport:
        """The report of a results record (a run's return value or its ``results.json``).

        Raises:
            ValueError: a record written by another version of the harness (its schema and version named).
        """
        from eval.harness.settings import SCHEMA

        if record.get("schema") != SCHEMA:
            raise ValueError(
                f"expected a results record of {SCHEMA!r}, got one of {record.get('schema')!r} written by "
                f"manifold-defense {record.get('version', '(a version that records none)')}: run it again with this "
                "version"
            )
        threats = tuple(record["threat_models"])
        return cls(
            threats=threats,
            n=int(record["n"]),
            defenses={k: DefenseReport.from_record(k, v, threats) for k, v in record["defenses"].items()},
            record=record,
            out=out,
        )

    def summary(self) -> str:
        """A plain-text table: per defense and threat, clean and worst-case accuracy, and the flags."""
        lines = []
        for d in self.defenses.values():
            cells = ", ".join(f"{tk} {d.worst_case[tk]:.3f}" for tk in self.threats)
            flags = ", ".join(sorted({f.flag for f in d.flags})) or "none"
            lines.append(f"{d.name}: clean {d.clean:.3f}; worst case {cells}; flags: {flags}")
        return "\n".join(lines)
