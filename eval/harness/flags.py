"""The red-flag checks of the harness (Carlini et al., "On Evaluating Adversarial Robustness", arXiv 1902.06705):
:data:`FLAGS` (name -> rule, printed in the report) and one small function per flag. Each function takes plain
figures (counts, accuracies, a record entry) and returns one check ``{"flag", "status", "where", "detail",
"rule"}`` whose status is ``"flag"`` (fired), ``"ok"`` or ``"n/a"`` (nothing to check)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from attacks import ThreatModel

__all__ = [
    "FLAGS",
    "audit_failed",
    "black_box_stronger",
    "bpda_unrolled_compare",
    "bpda_unrolled_gap",
    "check",
    "check_monotone",
    "non_monotone_in_eps",
    "not_converged",
    "randomized_defense",
    "real_bpda_eot_broke",
    "surrogate_transfer_gap",
    "unbounded_eps_not_zero",
    "zero_or_nan_gradients",
]

#: Red-flag checks: name -> rule (also printed in the report); thresholds: :class:`eval.harness.FlagThresholds`.
FLAGS: dict[str, str] = {
    "incomplete": "the results were written from a stopped run (--report-partial): the stages named did not run, "
    "so every figure they would have touched is an upper bound; resume with the same command to finish",
    "unbounded-eps-not-zero": "at an unbounded budget (Linf >= 1, or l2 >= sqrt(d)) the curve attack must reach "
    "~0% accuracy; flagged when the accuracy there exceeds `thresholds.unbounded`",
    "non-monotone-in-eps": "accuracy must not rise with eps: flagged when an accuracy-vs-eps curve point exceeds "
    "the previous one (clean at eps 0) by more than max(1 point, `thresholds.monotone` n), or an l2 worst case "
    "at a larger eps exceeds one at a smaller eps",
    "black-box-stronger": "Square (black box) newly breaks more than `thresholds.blackbox` n of the points every "
    "white-box attack before it left robust",
    "bpda-unrolled-gap": "on the points both attacked, BPDA (bpda-pgd, bpda-eot-pgd) and unrolled gradients break "
    "numbers of points that differ by more than max(1 point, `thresholds.gap` of those points)",
    "zero-or-nan-gradients": "the input gradient of the cross-entropy (each gradient source the cascade uses) is "
    "non-finite anywhere, or exactly zero at more than `thresholds.zero_grad` of the checked points",
    "randomized-defense": "the defense's output changes between two calls on the same input; every verdict is "
    "then the worst case over `draws` fresh passes (the flag reports how many points one draw would have "
    "counted robust)",
    "surrogate-transfer-gap": "a stage whose inner loop ran on a surrogate: fewer than `thresholds.transfer_min` "
    "of the points the surrogate misclassified are misclassified by the real defense (and at least 2 did not "
    "transfer): the surrogate does not stand in for the defense",
    "real-bpda-eot-broke": "for a defense whose inner loops ran on a surrogate: the final real-forward BPDA + EOT "
    "round broke more than `thresholds.blackbox` n points the surrogate attacks left robust (the surrogate path "
    "was weaker than the real one)",
    "audit-failed": "an adversarial example outside its threat model, outside [0, 1], or with NaN values",
    "not-converged": "the strongest white-box stage of the threat, rerun on the survivors with twice its steps "
    "(and EOT samples on a randomized defense), newly broke more than `thresholds.not_converged` n of the points "
    "(default 0.01: one percentage point of the figure): the attacks had not converged (with a convergence ladder, "
    "`convergence_rounds` > 1: its last rerun did)",
}


def check(name: str, fired: bool | None, where: str, detail: str) -> dict[str, Any]:
    """One check of flag ``name``: status ``"flag"`` when ``fired``, ``"ok"`` when not, ``"n/a"`` for ``None``."""
    status = "n/a" if fired is None else ("flag" if fired else "ok")
    return {"flag": name, "status": status, "where": where, "detail": detail, "rule": FLAGS[name]}


def check_monotone(eps: Sequence[float], accuracy: Sequence[float], n: int, tol: float) -> list[str]:
    """Violations of "accuracy is non-increasing in eps": one message per rise above ``max(1/n, tol)``.

    Args:
        eps: increasing budgets; accuracy: the accuracy at each; n: points the accuracies are over (>= 1);
        tol: tolerated rise as a fraction of n.
    """
    if len(eps) != len(accuracy):
        raise ValueError(f"expected as many accuracies as eps values, got {len(accuracy)} and {len(eps)}")
    allowed = max(1.0 / max(n, 1), tol) + 1e-9
    return [
        f"accuracy rises from {accuracy[i]:.4g} at eps {eps[i]:g} to {accuracy[i + 1]:.4g} at eps {eps[i + 1]:g}"
        for i in range(len(eps) - 1)
        if accuracy[i + 1] - accuracy[i] > allowed
    ]


def audit_failed(
    where: str, threat: ThreatModel, max_d: float, nan: int, lo: float, hi: float
) -> dict[str, Any]:
    """``audit-failed``: a perturbation above eps, NaN values, or values outside [0, 1] (``lo``/``hi`` the extreme
    values of every adversarial example, ``inf``/``-inf`` when there were none)."""
    ok = (
        max_d <= threat.eps * (1 + 1e-4) + 1e-6
        and nan == 0
        and (lo == math.inf or (lo >= -1e-6 and hi <= 1 + 1e-6))
    )
    detail = (
        f"max {threat.norm.value} perturbation {max_d:.6g} (eps {threat.eps:g}), NaN {nan}, range [{lo:.4g}, {hi:.4g}]"
        if lo != math.inf
        else f"no adversarial examples; max perturbation {max_d:.4g}"
    )
    return check("audit-failed", not ok, where, detail)


def black_box_stronger(where: str, square: Mapping[str, Any] | None, n: int, tol: float) -> dict[str, Any]:
    """``black-box-stronger`` from the record entry of ``square`` (``None`` when it is not in the cascade)."""
    if square is None or square.get("status") != "ran":
        return check("black-box-stronger", None, where, "square not run")
    newly = int(square["broken"])
    detail = (
        f"square newly broke {newly} of {n} points the white-box attacks left robust (tolerance {tol:g} n)"
    )
    return check("black-box-stronger", newly > tol * n, where, detail)


def bpda_unrolled_compare(
    idx: Tensor, unrolled_robust: Tensor, bpda_records: Sequence[tuple[str, Mapping[str, Any] | None]]
) -> dict[str, Any] | None:
    """BPDA vs unrolled verdicts on the unrolled attack's points ``idx``: a point counts as BPDA-robust when every
    BPDA stage that ran (``(name, saved record or None)`` pairs) left it robust; ``None`` when none ran."""
    bpda_ok = torch.ones(len(idx), dtype=torch.bool)
    used = []
    for name, rec in bpda_records:
        if rec is None or rec["status"] != "ran":
            continue
        used.append(name)
        pos = {int(i): j for j, i in enumerate(rec["indices"].tolist())}
        for k, i in enumerate(idx.tolist()):
            if i in pos:
                bpda_ok[k] &= bool(rec["robust"][pos[i]])
    if not used:
        return None
    return {
        "points": len(idx),
        "bpda_attacks": used,
        "bpda_accuracy": round(float(bpda_ok.float().mean()), 4),
        "unrolled_accuracy": round(float(unrolled_robust.float().mean()), 4),
    }


def bpda_unrolled_gap(where: str, compare: Mapping[str, Any] | None, tol: float) -> dict[str, Any]:
    """``bpda-unrolled-gap`` from the unrolled stage's ``compare`` entry (:func:`bpda_unrolled_compare`)."""
    if compare is None:
        return check(
            "bpda-unrolled-gap", None, where, "no BPDA / unrolled comparison (not run or not applicable)"
        )
    points, b, u = compare["points"], compare["bpda_accuracy"], compare["unrolled_accuracy"]
    fired = abs(b - u) * points > max(1.0, tol * points) + 1e-6
    detail = f"on {points} points: BPDA accuracy {b:.4g}, unrolled {u:.4g} (tolerance max(1 point, {tol:g} of the points))"
    return check("bpda-unrolled-gap", fired, where, detail)


def unbounded_eps_not_zero(
    norm: str, eps: Sequence[float], accuracy: Sequence[float], dim: int | None, attack: str, tol: float
) -> dict[str, Any]:
    """``unbounded-eps-not-zero`` on a curve (``eps`` and ``accuracy`` without eps 0; ``dim`` the pixels of an
    image, needed for the l2 unbounded budget ``sqrt(dim)``)."""
    unbounded = [
        (e, a)
        for e, a in zip(eps, accuracy, strict=True)
        if (e >= 1.0 if norm == "linf" else (dim is not None and e >= math.sqrt(dim)))
    ]
    if not unbounded:
        return check("unbounded-eps-not-zero", None, norm, f"no unbounded budget on the {norm} curve")
    e, a = unbounded[-1]
    detail = f"accuracy {a:.4g} at {norm} eps {e:g} under {attack} (tolerance {tol:g})"
    return check("unbounded-eps-not-zero", a > tol, norm, detail)


def non_monotone_in_eps(
    where: str, eps: Sequence[float], accuracy: Sequence[float], n: int, tol: float, ok: str
) -> dict[str, Any]:
    """``non-monotone-in-eps`` (:func:`check_monotone`); ``ok`` is the detail when nothing rises."""
    bad = check_monotone(eps, accuracy, n, tol)
    return check("non-monotone-in-eps", bool(bad), where, "; ".join(bad) if bad else ok)


def zero_or_nan_gradients(source: str, g: Mapping[str, Any], tol: float) -> dict[str, Any]:
    """``zero-or-nan-gradients`` from a gradient source's check (``points``, ``zero_fraction``, ``nan_or_inf``,
    ``norm_median``)."""
    fired = g["nan_or_inf"] > 0 or g["zero_fraction"] > tol
    detail = (
        f"{source} gradient at {g['points']} clean points: zero at {g['zero_fraction']:.0%}, non-finite entries "
        f"{g['nan_or_inf']}, median norm {g['norm_median']:.4g}"
    )
    return check("zero-or-nan-gradients", fired, source, detail)


def randomized_defense(randomized: bool, draws: int, flips: int) -> dict[str, Any]:
    """``randomized-defense``: fires for a randomized defense; ``flips`` verdicts were robust in one draw only."""
    detail = (
        f"outputs differ between calls; verdicts are worst case over {draws} draws; {flips} verdicts (clean, "
        "attacks and curves) robust in one draw but not in all"
        if randomized
        else "outputs identical between calls (deterministic; 1 draw)"
    )
    return check("randomized-defense", randomized, "-", detail)


def surrogate_transfer_gap(
    stage: str, where: str, counts: Mapping[str, int], transfer_min: float
) -> dict[str, Any]:
    """``surrogate-transfer-gap`` from a stage's transfer counts (``surrogate_broken``, ``transferred``,
    ``not_transferred``)."""
    sb, moved, lost = counts["surrogate_broken"], counts["transferred"], counts["not_transferred"]
    fired = sb > 0 and lost >= 2 and moved < transfer_min * sb
    detail = (
        f"{stage}: {moved} of {sb} surrogate successes transferred to the real defense ({lost} did not; "
        f"threshold {transfer_min:g} of them)"
    )
    return check("surrogate-transfer-gap", fired, where, detail)


def real_bpda_eot_broke(where: str, newly: int, n: int, tol: float, inner: str | None) -> dict[str, Any]:
    """``real-bpda-eot-broke``: the final real round newly broke ``newly`` points; n/a when the inner loops ran on
    the real defense (``inner`` is the surrogate name, ``None`` for none)."""
    detail = (
        f"the final real-forward BPDA + EOT round newly broke {newly} of {n} points (tolerance {tol:g} n)"
        + ("" if inner is not None else "; n/a: the inner loops already ran on the real defense")
    )
    return check("real-bpda-eot-broke", newly > tol * n if inner is not None else None, where, detail)


def not_converged(where: str, entry: Mapping[str, Any] | None, n: int, tol: float) -> dict[str, Any]:
    """``not-converged`` from the convergence entry of a threat (``None`` or skipped: n/a): what its rerun (the last
    rerun of a ladder of several, :func:`eval.harness.record.defense_record`) newly broke."""
    if entry is None or entry.get("status") != "ran":
        reason = "not run" if entry is None else entry.get("reason", "skipped")
        return check("not-converged", None, where, f"no convergence rerun: {reason}")
    ladder = entry.get("ladder") or []
    if len(ladder) > 1:
        last = ladder[-1]
        newly = int(last["broken"])
        detail = (
            f"the convergence ladder reran {entry['rerun_of']} {len(ladder)} times (x{2 ** len(ladder)} its steps "
            f"last, on {last['attacked']} survivors); the last rerun newly broke {newly} of {n} points: "
            f"{entry['figure_before']:.4g} -> {entry['accuracy']:.4g} over the ladder (tolerance {tol:g} n)"
        )
        return check("not-converged", newly > tol * n + 1e-9, where, detail)
    newly, before, after = int(entry["broken"]), entry["figure_before"], entry["accuracy"]
    detail = (
        f"{entry['rerun_of']} rerun with twice its steps on the {entry['attacked']} survivors newly broke {newly} "
        f"of {n} points: {before:.4g} -> {after:.4g} (tolerance {tol:g} n)"
    )
    return check("not-converged", newly > tol * n + 1e-9, where, detail)
