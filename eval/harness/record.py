"""The results record of one defense, computed from the saved stages: accuracy after each attack of the cascade,
worst case per point, surrogate transfer counts, projection figures, overpowered step curve, curves, red-flag
checks (:data:`eval.harness.settings.FLAGS`) and the audit of every adversarial example."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from eval.harness.settings import (
    FLAGS,
    SURROGATE_STAGES,
    RobustnessSettings,
    check_monotone,
    jsonable,
    parse_threat,
)
from manifold_defense.evaluation import accuracy_at_steps, consistency_at_steps, found_at_steps

__all__ = ["defense_record", "transfer_counts"]


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


def _latent_figures(attack: str, rec: Mapping[str, Any], settings: RobustnessSettings) -> dict[str, Any]:
    """Classifier-alone figures of a latent attack stage (the attack's own success, before the threat ball)."""
    if attack == "onmanifold" and "eligible" in rec:
        eligible = rec["eligible"].bool()
        hits = eligible & rec["found"].bool()
        return {
            "eligible": int(eligible.sum()),
            "successes": int(hits.sum()),
            "success_rate": round(float(hits.sum()) / int(eligible.sum()), 4)
            if int(eligible.sum())
            else None,
            "pixel_distance_of_successes_median": round(float(rec["pixel_distance"][hits].median()), 4)
            if bool(hits.any())
            else None,
        } | (
            {
                "success_at_steps": {
                    str(t): v
                    for t, v in found_at_steps(
                        rec["found_step"], settings.latent_steps, among=eligible
                    ).items()
                }
            }
            if "found_step" in rec and len(rec["found_step"])
            else {}
        )
    if attack == "overpowered" and "found_step" in rec and len(rec["found_step"]):
        return {
            "pairs_found": int(rec["found"].sum()),
            "consistency": round(1.0 - float(rec["found"].float().mean()), 4),
            "consistency_at_steps": {
                str(t): v for t, v in consistency_at_steps(rec["found_step"], settings.op_steps).items()
            },
        } | (
            {
                "op_accuracy": round(
                    float((rec["start_correct"].bool() & ~rec["found"].bool()).float().mean()), 4
                ),
                "op_accuracy_at_steps": {
                    str(t): v
                    for t, v in accuracy_at_steps(
                        rec["found_step"], settings.op_steps, rec["start_correct"].bool()
                    ).items()
                },
            }
            if "start_correct" in rec
            else {}
        )
    return {}


def defense_record(settings: RobustnessSettings, stages: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The record of defense ``name`` from the saved ``stages`` (schema in :mod:`eval.robustness_report`)."""
    info = stages[f"{name}|info"]
    n_d = int(info["n"])
    clean_rec = stages[f"{name}|clean"]
    clean_mask = clean_rec["robust"]
    clean_acc = float(clean_mask.float().mean())
    attacks: dict[str, dict[str, Any]] = {"clean": {}}
    worst: dict[str, float] = {}
    audit: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    examples: dict[str, Any] = {}
    flips_total = int((clean_rec["first_ok"] & ~clean_rec["robust"]).sum())
    broken_by: dict[str, dict[str, int]] = {}
    for tk in settings.threats:
        threat = parse_threat(tk)
        robust = clean_mask.clone()
        attacks["clean"][tk] = {
            "status": "ran",
            "accuracy": round(clean_acc, 4),
            "attacked": n_d,
            "broken": int((~clean_mask).sum()),
        }
        max_d, nan, lo, hi = 0.0, 0, math.inf, -math.inf
        white_robust: Tensor | None = None
        after_pgd = clean_mask.clone()
        broken_by[tk] = {}
        for attack in settings.attacks[1:]:
            if attack == "square":
                white_robust = robust.clone()
            rec = stages[f"{name}|{tk}|{attack}"]
            entry: dict[str, Any] = {"status": rec["status"]}
            if rec["status"] == "skipped":
                entry["reason"] = rec["reason"]
            else:
                idx = rec["indices"]
                before = robust.clone()
                if len(idx):
                    robust[idx] &= rec["robust"]
                newly = int((before & ~robust).sum())
                a = rec["audit"]
                max_d = max(max_d, a["max_distance"])
                nan += a["nan"]
                lo = min(lo, a["min"]) if a["min"] is not None else lo
                hi = max(hi, a["max"]) if a["max"] is not None else hi
                flips_total += int((rec["first_ok"] & ~rec["robust"]).sum())
                entry.update(
                    accuracy=round(float(robust.float().mean()), 4),
                    attacked=len(idx),
                    broken=newly,
                    broken_alone=int((~rec["robust"]).sum()),
                    seconds=round(rec["seconds"], 2),
                    settings=jsonable(rec.get("settings", {})),
                )
                if not settings.cascade:
                    alone = clean_mask.clone()
                    if len(idx):
                        alone[idx] &= rec["robust"]
                    entry["accuracy_alone"] = round(float(alone.float().mean()), 4)
                if "found" in rec:
                    entry["candidates_found"] = int(rec["found"].sum())
                entry.update(_latent_figures(attack, rec, settings))
                counts = transfer_counts(rec)
                if counts is not None:
                    entry["transfer"] = counts
                    per = _per_surrogate(rec)
                    if per:
                        entry["transfer"]["by_surrogate"] = per
                        for m, c in per.items():
                            checks.append(_transfer_check(f"{attack} ({m})", tk, c, settings))
                    elif attack in SURROGATE_STAGES and attack in _surrogate_run(rec):
                        checks.append(_transfer_check(attack, tk, counts, settings))
                if attack == "real-bpda-eot":
                    inner = (info.get("surrogates") or {}).get("inner")
                    fired = newly > settings.blackbox_tol * n_d if inner is not None else None
                    checks.append(
                        _check(
                            "real-bpda-eot-broke",
                            fired,
                            tk,
                            f"the final real-forward BPDA + EOT round newly broke {newly} of {n_d} points (tolerance {settings.blackbox_tol:g} n)"
                            + (
                                ""
                                if inner is not None
                                else "; n/a: the inner loops already ran on the real defense"
                            ),
                        )
                    )
                broken_by[tk][attack] = newly
                if attack == "unrolled-pgd" and len(idx):
                    entry["compare"] = _gap(stages, name, tk, idx, rec["robust"], after_pgd)
            if attack == "pgd":
                after_pgd = robust.clone()
            attacks.setdefault(attack, {})[tk] = entry
        worst[tk] = round(float(robust.float().mean()), 4)
        audit[tk] = {
            "norm": threat.norm.value,
            "eps": threat.eps,
            "max_perturbation": round(max_d, 6),
            "nan_count": nan,
            "value_range": [
                None if lo == math.inf else round(lo, 6),
                None if hi == -math.inf else round(hi, 6),
            ],
        }
        ok_audit = (
            max_d <= threat.eps * (1 + 1e-4) + 1e-6
            and nan == 0
            and (lo == math.inf or (lo >= -1e-6 and hi <= 1 + 1e-6))
        )
        checks.append(
            _check(
                "audit-failed",
                not ok_audit,
                tk,
                f"max {threat.norm.value} perturbation {max_d:.6g} (eps {threat.eps:g}), NaN {nan}, range [{lo:.4g}, {hi:.4g}]"
                if lo != math.inf
                else f"no adversarial examples; max perturbation {max_d:.4g}",
            )
        )
        # black box vs white box
        sq = stages[f"{name}|{tk}|square"] if "square" in settings.attacks else None
        if sq is None or sq["status"] != "ran" or white_robust is None:
            checks.append(_check("black-box-stronger", None, tk, "square not run"))
        else:
            extra_broken = broken_by[tk].get("square", 0)
            fired = extra_broken > settings.blackbox_tol * n_d
            checks.append(
                _check(
                    "black-box-stronger",
                    fired,
                    tk,
                    f"square newly broke {extra_broken} of {n_d} points the white-box attacks left robust (tolerance {settings.blackbox_tol:g} n)",
                )
            )
        # BPDA vs unrolled
        cmp_ = attacks.get("unrolled-pgd", {}).get(tk, {}).get("compare")
        if cmp_ is None:
            checks.append(
                _check(
                    "bpda-unrolled-gap", None, tk, "no BPDA / unrolled comparison (not run or not applicable)"
                )
            )
        else:
            gap_points = abs(cmp_["bpda_accuracy"] - cmp_["unrolled_accuracy"]) * cmp_["points"]
            fired = gap_points > max(1.0, settings.gap_tol * cmp_["points"]) + 1e-6
            checks.append(
                _check(
                    "bpda-unrolled-gap",
                    fired,
                    tk,
                    f"on {cmp_['points']} points: BPDA accuracy {cmp_['bpda_accuracy']:.4g}, unrolled {cmp_['unrolled_accuracy']:.4g} (tolerance max(1 point, {settings.gap_tol:g} of the points))",
                )
            )
        rec_ex = stages.get(f"{name}|{tk}|examples")
        if rec_ex is not None:
            examples[tk] = {
                "indices": rec_ex["indices"].tolist(),
                "attacks": rec_ex["attacks"],
                "labels": rec_ex["labels"].tolist(),
            }
    # curves
    curves: dict[str, Any] = {}
    for norm in ("linf", "l2"):
        eps_list = settings.curve_eps_linf if norm == "linf" else settings.curve_eps_l2
        keys = [f"{name}|curve|{norm}-{e:g}" for e in eps_list]
        if not keys or not all(k in stages for k in keys):
            continue
        accs = []
        for k in keys:
            rec = stages[k]
            mask = clean_mask.clone()
            if len(rec["indices"]):
                mask[rec["indices"]] &= rec["robust"]
            accs.append(round(float(mask.float().mean()), 4))
        curves[norm] = {
            "attack": stages[keys[0]]["settings"]["attack"],
            "eps": [0.0, *eps_list],
            "accuracy": [round(clean_acc, 4), *accs],
            "settings": jsonable(stages[keys[0]]["settings"]),
        }
        dim = int(info.get("dim", 0)) or None
        unbounded = [
            (e, a)
            for e, a in zip(eps_list, accs, strict=True)
            if (e >= 1.0 if norm == "linf" else (dim is not None and e >= math.sqrt(dim)))
        ]
        if unbounded:
            e, a = unbounded[-1]
            checks.append(
                _check(
                    "unbounded-eps-not-zero",
                    a > settings.unbounded_tol,
                    norm,
                    f"accuracy {a:.4g} at {norm} eps {e:g} under {curves[norm]['attack']} (tolerance {settings.unbounded_tol:g})",
                )
            )
        else:
            checks.append(
                _check("unbounded-eps-not-zero", None, norm, f"no unbounded budget on the {norm} curve")
            )
        bad = check_monotone(curves[norm]["eps"], curves[norm]["accuracy"], n_d, settings.monotone_tol)
        checks.append(
            _check(
                "non-monotone-in-eps",
                bool(bad),
                norm,
                "; ".join(bad) if bad else f"{norm} curve non-increasing",
            )
        )
    l2 = sorted((parse_threat(t).eps, worst[t]) for t in settings.threats if t.startswith("l2-"))
    bad = (
        check_monotone([e for e, _ in l2], [a for _, a in l2], n_d, settings.monotone_tol)
        if len(l2) > 1
        else []
    )
    if bad:
        checks.append(_check("non-monotone-in-eps", True, "l2 worst case", "; ".join(bad)))
    # gradients
    grads = info.get("gradients", {})
    if not grads:
        checks.append(_check("zero-or-nan-gradients", None, "-", "no gradient source checked"))
    for src, g in grads.items():
        fired = g["nan_or_inf"] > 0 or g["zero_fraction"] > settings.zero_grad_tol
        checks.append(
            _check(
                "zero-or-nan-gradients",
                fired,
                src,
                f"{src} gradient at {g['points']} clean points: zero at {g['zero_fraction']:.0%}, non-finite entries {g['nan_or_inf']}, median norm {g['norm_median']:.4g}",
            )
        )
    rnd = bool(info["randomized"])
    checks.append(
        _check(
            "randomized-defense",
            rnd,
            "-",
            f"outputs differ between calls; verdicts are worst case over {settings.draws} draws; {flips_total} verdicts (clean, attacks and curves) robust in one draw but not in all"
            if rnd
            else "outputs identical between calls (deterministic; 1 draw)",
        )
    )
    return {
        "n": n_d,
        "randomized": rnd,
        "draws": settings.draws if rnd else 1,
        "clean": round(clean_acc, 4),
        "attacks": attacks,
        "worst_case": worst,
        "curves": curves,
        "audit": audit,
        "gradients": grads,
        "checks": checks,
        "flags": [c for c in checks if c["status"] == "flag"],
        "examples": examples,
        "projection": _projection_figures(stages[f"{name}|projection"])
        if f"{name}|projection" in stages
        else None,
        "surrogates": info.get("surrogates"),
        "cost": _cost(stages, name),
    }


def _cost(stages: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Per stage of defense ``name`` (in run order): points, seconds of the last call, process seconds over every
    chunk (resumed ones included) and rows through the real model's forward (real projections of a projection
    defense); ``total`` sums them. Stages saved before these counts existed show ``None``."""
    rows: dict[str, Any] = {}
    total: dict[str, Any] = {"process_seconds": 0.0, "real_passes": 0.0, "complete": True}
    for key, rec in stages.items():
        if not key.startswith(f"{name}|") or not isinstance(rec, Mapping) or rec.get("status") != "ran":
            continue
        if "seconds" not in rec:
            continue
        per_point = next((rec[k] for k in ("indices", "robust", "mse") if k in rec), None)
        points = len(per_point) if per_point is not None else None
        if points == 0:  # nothing to attack: no chunk ran
            rec = {**rec, "process_seconds": 0.0, "real_passes": 0.0}
        row: dict[str, Any] = {
            "points": points,
            "seconds": round(float(rec["seconds"]), 1),
            "process_seconds": round(rec["process_seconds"], 1) if "process_seconds" in rec else None,
            "real_passes": round(rec["real_passes"]) if "real_passes" in rec else None,
        }
        for k in ("process_seconds", "real_passes"):
            if row[k] is None:
                total["complete"] = False
            else:
                total[k] += row[k]
        rows[key.split("|", 1)[1]] = row
    total["process_seconds"] = round(total["process_seconds"], 1)
    total["real_passes"] = round(total["real_passes"])
    return {"stages": rows, "total": total}


def _gap(
    stages: Mapping[str, Any], name: str, tk: str, idx: Tensor, unrolled_robust: Tensor, after_pgd: Tensor
) -> dict[str, Any]:
    """BPDA vs unrolled verdicts on the unrolled attack's points (all of which pgd left robust)."""
    bpda_ok = torch.ones(len(idx), dtype=torch.bool)
    used = []
    for attack in ("bpda-pgd", "bpda-eot-pgd"):
        rec = stages.get(f"{name}|{tk}|{attack}")
        if rec is None or rec["status"] != "ran":
            continue
        used.append(attack)
        pos = {int(i): j for j, i in enumerate(rec["indices"].tolist())}
        for k, i in enumerate(idx.tolist()):
            if i in pos:
                bpda_ok[k] &= bool(rec["robust"][pos[i]])
    if not used:
        return None  # type: ignore[return-value]
    return {
        "points": len(idx),
        "bpda_attacks": used,
        "bpda_accuracy": round(float(bpda_ok.float().mean()), 4),
        "unrolled_accuracy": round(float(unrolled_robust.float().mean()), 4),
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


def _surrogate_run(rec: Mapping[str, Any]) -> tuple[str, ...]:
    """The stage names (a one-tuple) whose inner loop ran on a named surrogate, from the stage's settings."""
    cfg = rec.get("settings", {})
    on = (
        "surrogates" in cfg
        or "surrogate" in str(cfg.get("through", ""))
        or "surrogate" in str(cfg.get("queries_to", ""))
    )
    return tuple(SURROGATE_STAGES) if on else ()


def _transfer_check(
    attack: str, tk: str, counts: Mapping[str, int], settings: RobustnessSettings
) -> dict[str, Any]:
    sb, moved, lost = counts["surrogate_broken"], counts["transferred"], counts["not_transferred"]
    fired = sb > 0 and lost >= 2 and moved < settings.transfer_min * sb
    detail = (
        f"{attack}: {moved} of {sb} surrogate successes transferred to the real defense ({lost} did not; "
        f"threshold {settings.transfer_min:g} of them)"
    )
    return _check("surrogate-transfer-gap", fired, tk, detail)


def _check(name: str, fired: bool | None, where: str, detail: str) -> dict[str, Any]:
    status = "n/a" if fired is None else ("flag" if fired else "ok")
    return {"flag": name, "status": status, "where": where, "detail": detail, "rule": FLAGS[name]}
