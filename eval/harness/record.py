"""The results record of one defense, computed from the saved stages: accuracy after each stage of the cascade,
the convergence rerun, worst case per point, surrogate transfer counts, projection figures, curves, red-flag checks
(:mod:`eval.harness.flags`), the audit of every adversarial example and the cost of each stage."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from eval.harness import flags
from eval.harness.registry import StageKey, StageView, ladder_keys, stage, stage_keys
from eval.harness.settings import RobustnessSettings, jsonable, parse_threat

__all__ = ["CONVERGENCE", "defense_record", "ladder_rungs", "transfer_counts"]

#: The stage name of the convergence rerun (a column of the report after the cascade).
CONVERGENCE = "convergence"
#: What the convergence rerun is, for the report and ``attack_definitions``.
CONVERGENCE_DOC = (
    "the strongest white-box stage of the threat (the gradient stage that broke the most points) rerun on the "
    "points still robust with twice its steps (and twice its EOT samples on a randomized defense); what it breaks "
    "counts in the worst case, and more than one point of the figure raises not-converged. With convergence_rounds "
    "K > 1 a ladder: while a rerun newly breaks more than one point of the figure, the next doubles the steps "
    "again (up to K reruns; the flag reads the last)"
)


def ladder_rungs(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The reruns of a threat's ``convergence`` entry in order (its ``ladder``: ``round``, ``settings``,
    ``attacked``, ``broken``, ``accuracy``, ``seconds``); an entry written before the ladder existed is a ladder of
    one (its own fields); an entry that did not run has none."""
    if entry.get("status", "ran") != "ran":
        return []
    if entry.get("ladder"):
        return [dict(r) for r in entry["ladder"]]
    fields = ("settings", "attacked", "broken", "accuracy", "seconds")
    return [{"round": 1, **{k: entry[k] for k in fields if k in entry}}]


def transfer_counts(rec: Mapping[str, Any]) -> dict[str, int] | None:
    """How many of a stage's surrogate successes transferred to the real defense; ``None`` when the stage's inner
    model was the real defense.

    ``surrogate_broken`` (the inner model misclassified the final example) = ``transferred`` (the real defense
    misclassifies it too) + ``not_transferred``; ``broken`` (the real defense misclassifies it) = ``transferred`` +
    ``broken_without_surrogate``.
    """
    if "surrogate_broken" not in rec or rec.get("status") != "ran":
        return None
    sb = rec["surrogate_broken"].bool()
    broken = ~rec["robust"].bool()
    return {
        "attacked": len(sb),
        "surrogate_broken": int(sb.sum()),
        "transferred": int((sb & broken).sum()),
        "not_transferred": int((sb & ~broken).sum()),
        "broken": int(broken.sum()),
        "broken_without_surrogate": int((~sb & broken).sum()),
    }


def _per_surrogate(rec: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``surrogate-pgd``: per surrogate, the points it attacked, fooled itself, and whose example fooled the real
    defense (``transferred``); ``not_transferred`` = fooled - transferred."""
    out = {}
    for name, parts in rec.get("per_surrogate", {}).items():
        tried, fooled, real = parts["tried"].bool(), parts["fooled"].bool(), parts["real"].bool()
        out[name] = {
            "attacked": int(tried.sum()),
            "surrogate_broken": int(fooled.sum()),
            "transferred": int((fooled & real).sum()),
            "not_transferred": int((fooled & ~real).sum()),
        }
    return out


@dataclass
class _Threat:
    """The running tally of one (defense, threat) cascade while its stages are read in order."""

    settings: RobustnessSettings
    stages: Mapping[str, Any]
    name: str
    tk: str
    n: int
    clean: Tensor
    inner: str | None
    robust: Tensor = field(init=False)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    flips: int = 0
    max_d: float = 0.0
    nan: int = 0
    lo: float = math.inf
    hi: float = -math.inf

    def __post_init__(self) -> None:
        self.robust = self.clean.clone()

    def add(self, attack: str, rec: Mapping[str, Any], checked: bool = True) -> dict[str, Any]:
        """Fold the saved record of stage ``attack`` into the tally; its entry (checks only when ``checked``)."""
        entry: dict[str, Any] = {"status": rec["status"]}
        if rec["status"] == "skipped":
            entry["reason"] = rec["reason"]
            return entry
        idx, before = rec["indices"], self.robust.clone()
        if len(idx):
            self.robust[idx] &= rec["robust"]
        newly = int((before & ~self.robust).sum())
        a = rec["audit"]
        self.max_d, self.nan = max(self.max_d, a["max_distance"]), self.nan + a["nan"]
        self.lo = min(self.lo, a["min"]) if a["min"] is not None else self.lo
        self.hi = max(self.hi, a["max"]) if a["max"] is not None else self.hi
        self.flips += int((rec["first_ok"] & ~rec["robust"]).sum())
        entry.update(accuracy=round(float(self.robust.float().mean()), 4), attacked=len(idx), broken=newly,
                     broken_alone=int((~rec["robust"]).sum()), seconds=round(rec["seconds"], 2),
                     settings=jsonable(rec.get("settings", {})))  # fmt: skip
        if not self.settings.cascade and checked:
            alone = self.clean.clone()
            if len(idx):
                alone[idx] &= rec["robust"]
            entry["accuracy_alone"] = round(float(alone.float().mean()), 4)
        if "found" in rec:
            entry["candidates_found"] = int(rec["found"].sum())
        counts = transfer_counts(rec)
        if counts is not None:
            entry["transfer"] = counts
            per = _per_surrogate(rec)
            if per:
                entry["transfer"]["by_surrogate"] = per
            if checked:
                self._transfer_checks(attack, rec, counts, per)
        if checked:
            view = StageView(
                rec, self.settings, self.tk, self.n, newly, before, self.stages, self.name, self.inner
            )
            fields_, checks = stage(attack).report(view)
            entry.update(fields_)
            self.checks += checks
        return entry

    def _transfer_checks(
        self, attack: str, rec: Mapping[str, Any], counts: dict[str, int], per: dict[str, dict[str, int]]
    ) -> None:
        tol = self.settings.thresholds.transfer_min
        if per:
            self.checks += [
                flags.surrogate_transfer_gap(f"{attack} ({m})", self.tk, c, tol) for m, c in per.items()
            ]
        elif rec.get("on_surrogate"):
            self.checks.append(flags.surrogate_transfer_gap(attack, self.tk, counts, tol))

    def audit(self) -> dict[str, Any]:
        threat = parse_threat(self.tk)
        return {
            "norm": threat.norm.value,
            "eps": threat.eps,
            "max_perturbation": round(self.max_d, 6),
            "nan_count": self.nan,
            "value_range": [None if self.lo == math.inf else round(self.lo, 6),
                            None if self.hi == -math.inf else round(self.hi, 6)],
        }  # fmt: skip


def _threat(
    settings: RobustnessSettings, stages: Mapping[str, Any], name: str, tk: str, clean: Tensor
) -> _Threat:
    """The cascade of defense ``name`` under ``tk``, then its convergence rerun, read from the saved stages."""
    info = stages[StageKey(name, None, "info").text]
    inner = (info.get("surrogates") or {}).get("inner")
    t = _Threat(settings, stages, name, tk, int(info["n"]), clean, inner)
    t.entries["clean"] = {"status": "ran", "accuracy": round(float(clean.float().mean()), 4), "attacked": t.n,
                          "broken": int((~clean).sum())}  # fmt: skip
    for attack in settings.attacks[1:]:
        t.entries[attack] = t.add(attack, stages[StageKey(name, tk, attack).text])
    ladder = ladder_keys(stages, name, tk)
    if ladder:
        t.entries[CONVERGENCE] = _ladder(t, [stages[k.text] for k in ladder])
    thr = settings.thresholds
    t.checks.append(flags.audit_failed(tk, parse_threat(tk), t.max_d, t.nan, t.lo, t.hi))
    t.checks.append(flags.black_box_stronger(tk, t.entries.get("square"), t.n, thr.blackbox))
    t.checks.append(flags.bpda_unrolled_gap(tk, t.entries.get("unrolled-pgd", {}).get("compare"), thr.gap))
    t.checks.append(flags.not_converged(tk, t.entries.get(CONVERGENCE), t.n, thr.not_converged))
    return t


def _ladder(t: _Threat, recs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``convergence`` entry of a threat from the saved reruns of its ladder (folded into ``t`` in order).

    The first rerun's fields as before the ladder existed (``accuracy``, ``broken``, ``attacked``, ``settings``,
    ``rerun_of``, ``original_settings``, ``figure_before``), except that ``accuracy`` is the figure after the last
    rerun, ``broken`` counts what every rerun newly broke and ``seconds`` sums them; ``ladder`` lists each rerun
    (``round``, ``settings``, ``attacked``, ``broken``: newly, ``accuracy`` after it, ``seconds``) and
    ``last_broken`` is what the last one newly broke (the ``not-converged`` flag reads it)."""
    before = round(float(t.robust.float().mean()), 4)
    first = recs[0]
    entry = t.add(first.get("rerun_of", ""), first, checked=False)
    if first["status"] != "ran":
        return entry
    entry |= {"rerun_of": first["rerun_of"], "original_settings": jsonable(first["original"]),
              "figure_before": before}  # fmt: skip
    rungs = [entry]
    for rec in recs[1:]:
        if rec["status"] != "ran":
            break
        rungs.append(t.add(rec["rerun_of"], rec, checked=False))
    entry["ladder"] = [
        {"round": k, "settings": r["settings"], "attacked": r["attacked"], "broken": r["broken"],
         "accuracy": r["accuracy"], "seconds": r["seconds"]}
        for k, r in enumerate(rungs, start=1)
    ]  # fmt: skip
    entry["last_broken"] = rungs[-1]["broken"]
    entry["accuracy"] = rungs[-1]["accuracy"]
    entry["broken"] = sum(r["broken"] for r in rungs)
    entry["seconds"] = round(sum(r["seconds"] for r in rungs), 2)
    return entry


def _curves(
    settings: RobustnessSettings, stages: Mapping[str, Any], name: str, clean: Tensor, dim: int | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The accuracy-vs-eps curves of defense ``name`` and their checks (unbounded budget, monotone)."""
    curves: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    n, thr = len(clean), settings.thresholds
    clean_acc = round(float(clean.float().mean()), 4)
    for norm in ("linf", "l2"):
        eps_list = settings.curve_eps_linf if norm == "linf" else settings.curve_eps_l2
        keys = [StageKey(name, f"{norm}-{e:g}", "curve").text for e in eps_list]
        if not keys or not all(k in stages and stages[k].get("status") == "ran" for k in keys):
            continue
        accs = []
        for k in keys:
            rec, mask = stages[k], clean.clone()
            if len(rec["indices"]):
                mask[rec["indices"]] &= rec["robust"]
            accs.append(round(float(mask.float().mean()), 4))
        attack = stages[keys[0]]["settings"]["attack"]
        curves[norm] = {"attack": attack, "eps": [0.0, *eps_list], "accuracy": [clean_acc, *accs],
                        "settings": jsonable(stages[keys[0]]["settings"])}  # fmt: skip
        checks.append(flags.unbounded_eps_not_zero(norm, eps_list, accs, dim, attack, thr.unbounded))
        curve = curves[norm]
        checks.append(flags.non_monotone_in_eps(norm, curve["eps"], curve["accuracy"], n, thr.monotone,
                                                f"{norm} curve non-increasing"))  # fmt: skip
    return curves, checks


def defense_record(settings: RobustnessSettings, stages: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The record of defense ``name`` from the saved ``stages`` (schema in :mod:`eval.robustness_report`)."""
    info = stages[StageKey(name, None, "info").text]
    n_d = int(info["n"])
    clean_rec = stages[StageKey(name, None, "clean").text]
    clean = clean_rec["robust"]
    threats = {tk: _threat(settings, stages, name, tk, clean) for tk in settings.threats}
    attacks: dict[str, dict[str, Any]] = {}
    for tk, t in threats.items():
        for attack, entry in t.entries.items():
            attacks.setdefault(attack, {})[tk] = entry
    worst = {tk: round(float(t.robust.float().mean()), 4) for tk, t in threats.items()}
    checks = [c for t in threats.values() for c in t.checks]
    curves, curve_checks = _curves(settings, stages, name, clean, int(info.get("dim", 0)) or None)
    checks += curve_checks
    l2 = sorted(
        (parse_threat(t).eps, worst[t]) for t in settings.threats if parse_threat(t).norm.value == "l2"
    )
    if len(l2) > 1 and flags.check_monotone(
        [e for e, _ in l2], [a for _, a in l2], n_d, settings.thresholds.monotone
    ):
        checks.append(flags.non_monotone_in_eps("l2 worst case", [e for e, _ in l2], [a for _, a in l2], n_d,
                                                settings.thresholds.monotone, ""))  # fmt: skip
    grads = info.get("gradients", {})
    if not grads:
        checks.append(flags.check("zero-or-nan-gradients", None, "-", "no gradient source checked"))
    checks += [flags.zero_or_nan_gradients(src, g, settings.thresholds.zero_grad) for src, g in grads.items()]
    missing = sorted(k for k, v in stages.items() if k.startswith(f"{name}|") and isinstance(v, dict) and v.get("not_run"))
    if missing:
        checks.append(flags.check("incomplete", True, "-", f"{len(missing)} stages not run: {', '.join(missing)}"))
    rnd = bool(info["randomized"])
    flips = int((clean_rec["first_ok"] & ~clean).sum()) + sum(t.flips for t in threats.values())
    checks.append(flags.randomized_defense(rnd, settings.draws, flips))
    projection = stages.get(StageKey(name, None, "projection").text)
    majority = _majority(settings, stages, name, clean_rec) if rnd else None
    return {
        "n": n_d,
        "randomized": rnd,
        "draws": settings.draws if rnd else 1,
        "clean": round(float(clean.float().mean()), 4),
        "attacks": attacks,
        "worst_case": worst,
        "robust_points": {tk: [int(i) for i in t.robust.nonzero().flatten()] for tk, t in threats.items()},
        "majority_vote": majority,
        "curves": curves,
        "audit": {tk: t.audit() for tk, t in threats.items()},
        "gradients": grads,
        "checks": checks,
        "flags": [c for c in checks if c["status"] == "flag"],
        "examples": _examples(stages, name, settings.threats),
        "projection": _projection_figures(projection) if projection is not None else None,
        "surrogates": info.get("surrogates"),
        "cost": _cost(settings, stages, name),
    }


def _majority(
    settings: RobustnessSettings, stages: Mapping[str, Any], name: str, clean_rec: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The majority-vote figure per threat (the ``majority`` setting): a point counts when most of the ``draws``
    fresh passes classify it correctly, on its clean image and on the example of every stage that attacked it.
    ``None`` when the votes were not recorded. An upper bound beside the worst case: the cascade attacks only
    the points the worst-case verdict left, so a point broken early (by one draw) meets fewer attacks here."""
    if "votes" not in clean_rec:
        return None
    half = settings.draws / 2

    def fold(mask: Tensor, rec: Mapping[str, Any] | None) -> None:
        if rec is not None and rec.get("status") == "ran" and "votes" in rec and len(rec["indices"]):
            mask[rec["indices"]] &= rec["votes"] > half

    out: dict[str, Any] = {"draws": settings.draws, "clean": 0.0, "accuracy": {}}
    clean = clean_rec["votes"] > half
    out["clean"] = round(float(clean.float().mean()), 4)
    for tk in settings.threats:
        mask = clean.clone()
        keys = [StageKey(name, tk, a) for a in settings.attacks[1:]] + ladder_keys(stages, name, tk)
        for key in keys:
            fold(mask, stages.get(key.text))
        out["accuracy"][tk] = round(float(mask.float().mean()), 4)
    return out


def _examples(stages: Mapping[str, Any], name: str, threats: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for tk in threats:
        rec = stages.get(StageKey(name, tk, "examples").text)
        if rec is not None:
            out[tk] = {
                "indices": rec["indices"].tolist(),
                "attacks": rec["attacks"],
                "labels": rec["labels"].tolist(),
            }
    return out


def _projection_figures(rec: Mapping[str, Any]) -> dict[str, Any]:
    mse, passes = rec["mse"], rec["passes"]
    finite = passes[torch.isfinite(passes)]
    return {
        "accuracy_on_projections": round(float(rec["correct"].float().mean()), 4),
        "mse_per_pixel": {"median": round(float(mse.median()), 6), "mean": round(float(mse.mean()), 6)},
        "generator_passes_per_image": round(float(finite.mean()), 1) if finite.numel() else None,
        "seconds": round(float(rec["seconds"]), 2),
        "meaning": "deterministic projection of each clean point (the defense's preprocess, fixed seed)",
    }


def _cost(settings: RobustnessSettings, stages: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Per stage of defense ``name`` that ran (in run order): points, seconds of the last call, process seconds
    over every chunk (resumed ones included) and rows through the real model's forward (real projections of a
    projection defense); ``total`` sums them."""
    rows: dict[str, Any] = {}
    total: dict[str, Any] = {"process_seconds": 0.0, "real_passes": 0.0}
    projection = StageKey(name, None, "projection").text in stages
    keys = stage_keys(settings, name, projection)
    keys += [k for t in settings.threats for k in ladder_keys(stages, name, t)[1:]]  # reruns 2, 3, ... of ladders
    for key in keys:
        rec = stages.get(key.text)
        if not isinstance(rec, Mapping) or rec.get("status") != "ran" or "seconds" not in rec:
            continue
        per_point = next((rec[k] for k in ("indices", "robust", "mse") if k in rec), None)
        points = len(per_point) if per_point is not None else None
        process = rec.get("process_seconds", 0.0) if points else 0.0  # nothing to attack: no chunk ran
        passes = rec.get("real_passes", 0.0) if points else 0.0
        rows[key.label] = {"points": points, "seconds": round(float(rec["seconds"]), 1),
                           "process_seconds": round(process, 1), "real_passes": round(passes)}  # fmt: skip
        total["process_seconds"] += rows[key.label]["process_seconds"]
        total["real_passes"] += rows[key.label]["real_passes"]
    total["process_seconds"] = round(total["process_seconds"], 1)
    total["real_passes"] = round(total["real_passes"])
    return {"stages": rows, "total": total}
