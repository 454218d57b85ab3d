"""The latent stages of the cascade: the on-manifold attack (:class:`attacks.LatentAttack`) and the overpowered
pair attack (:class:`attacks.OverpoweredAttack`) on the bare classifier, from the starting latents ``z = invert(x)``
of each point; their candidates are projected onto the threat ball and judged by the real defense. Registered with
the rest of the cascade by :mod:`eval.harness.cascade`.

Paper: Jalal et al., "The Robust Manifold Defense" (arXiv 1712.09196).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attacks import Norm, project_onto_threat
from eval.harness.registry import ChunkFn, Stage, StageEnv, StageView
from manifold_defense import evaluation
from manifold_defense.evaluation import accuracy_at_steps, consistency_at_steps, found_at_steps

__all__ = ["OnManifold", "Overpowered", "attack_seed", "latent_budget"]


def attack_seed() -> int:
    """An attack's own seed, drawn from the chunk's seeded global RNG (:func:`eval.harness.state.seeded`)."""
    return int(torch.initial_seed() % (2**62))


def latent_budget(config: Any, threat: Any, from_threat: bool) -> float:
    """The pixel l2 budget of a latent attack: the threat's eps under an l2 threat when ``from_threat``, else the
    attack config's ``eps``."""
    return float(threat.eps) if from_threat and threat.norm is Norm.L2 else float(config.eps)


class _Latent(Stage):
    """A latent attack on the bare classifier from ``z = invert(x)``, its candidate projected onto the threat ball."""

    def skip_reason(self, env: StageEnv) -> str | None:
        return None if env.generator is not None else "no generator given"

    def attack_config(self, env: StageEnv) -> Any:
        """The attack's config in the settings (its ``eps`` set per threat by :meth:`config`)."""
        raise NotImplementedError

    def config(self, env: StageEnv) -> Any:
        cfg = self.attack_config(env)
        return dataclasses.replace(
            cfg, eps=latent_budget(cfg, env.threat, env.settings.latent_budget_from_threat)
        )

    def describe(self, env: StageEnv, config: Any) -> dict[str, Any]:
        return {"budget_l2": config.eps, "steps": config.steps, "step_size": config.step_size,
                "candidate": "projected onto the threat ball around x"}  # fmt: skip

    def attack(
        self, env: StageEnv, config: Any, chunk: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(candidates, found, extra per-point results)`` of the latent attack on the chunk."""
        raise NotImplementedError

    def chunk_fn(self, env: StageEnv, config: Any) -> ChunkFn:
        def fn(chunk: Tensor) -> dict[str, Tensor]:
            xb = env.x[chunk]
            cand, found, extra = self.attack(env, config, chunk, env.latents(chunk))
            out = env.judge(chunk, project_onto_threat(cand.to(xb.dtype), xb, env.threat))
            out["found"] = found.cpu()
            return out | {k: v.cpu() for k, v in extra.items()}

        return fn

    def record_parts(self, env: StageEnv, parts: Mapping[str, Tensor]) -> dict[str, Any]:
        keys = ("found", "eligible", "found_step", "pixel_distance", "pred_adv", "start_correct")
        return {k: parts[k] for k in keys if k in parts}


def _clf(env: StageEnv) -> nn.Module:
    d = env.defense
    return d.classifier if d.classifier is not None else d.model


class OnManifold(_Latent):
    name = "onmanifold"
    doc = "LatentAttack on the bare classifier from z = invert(x); G(z') projected onto the threat ball"

    def attack_config(self, env: StageEnv) -> Any:
        return env.settings.onmanifold

    def attack(
        self, env: StageEnv, config: Any, chunk: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        assert env.generator is not None
        res = evaluation.evaluate_onmanifold(
            _clf(env), env.generator, z, env.y[chunk], config, batch_size=len(chunk)
        )
        extra = {"eligible": res.eligible, "x0": res.x0, "candidate": res.x_adv, "pred_adv": res.pred_adv,
                 "pixel_distance": res.pixel_distance, "found_step": res.found_step}  # fmt: skip
        return res.x_adv.to(env.x.device), res.success, extra

    def record_parts(self, env: StageEnv, parts: Mapping[str, Tensor]) -> dict[str, Any]:
        out = super().record_parts(env, parts)
        if "candidate" in parts:  # on-manifold pairs G(z) | G(z') the classifier gets wrong (for the grid)
            hits = parts["found"].nonzero().squeeze(1)
            hits = hits[parts["pixel_distance"][hits].argsort()][: env.settings.grid_examples]
            out["pairs"] = {"positions": hits, "x0": parts["x0"][hits], "x_adv": parts["candidate"][hits]}
        return out

    def report(self, view: StageView) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        rec = view.rec
        if "eligible" not in rec:
            return {}, []
        eligible = rec["eligible"].bool()
        hits = eligible & rec["found"].bool()
        count = int(eligible.sum())
        out: dict[str, Any] = {
            "eligible": count,
            "successes": int(hits.sum()),
            "success_rate": round(float(hits.sum()) / count, 4) if count else None,
            "pixel_distance_of_successes_median": round(float(rec["pixel_distance"][hits].median()), 4)
            if bool(hits.any())
            else None,
        }
        if "found_step" in rec and len(rec["found_step"]):
            steps = view.settings.onmanifold.steps
            out["success_at_steps"] = {
                str(t): v for t, v in found_at_steps(rec["found_step"], steps, among=eligible).items()
            }
        return out, []


class Overpowered(_Latent):
    name = "overpowered"
    doc = "OverpoweredAttack pairs from z; the wrongly labelled member projected onto the threat ball"

    def attack_config(self, env: StageEnv) -> Any:
        return env.settings.overpowered

    def describe(self, env: StageEnv, config: Any) -> dict[str, Any]:
        return super().describe(env, config) | {"multiplier_init": config.multiplier_init,
                                                "temperature": config.temperature}  # fmt: skip

    def attack(
        self, env: StageEnv, config: Any, chunk: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        clf, gen, yb = _clf(env), env.generator, env.y[chunk]
        assert gen is not None
        cfg = dataclasses.replace(config, seed=attack_seed())
        op = evaluation.evaluate_overpowered(clf, gen, z, yb, cfg, batch_size=len(chunk))
        wrong1 = (op.pred1 != yb.cpu())[:, None, None, None]
        with torch.no_grad():
            start_pred = clf(gen(z)).argmax(1)
        extra = {"found_step": op.found_step, "start_correct": start_pred.cpu() == yb.cpu()}
        return torch.where(wrong1, op.x1, op.x2).to(env.x.device), op.success, extra

    def report(self, view: StageView) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        rec, steps = view.rec, view.settings.overpowered.steps
        if "found_step" not in rec or not len(rec["found_step"]):
            return {}, []
        out: dict[str, Any] = {
            "pairs_found": int(rec["found"].sum()),
            "consistency": round(1.0 - float(rec["found"].float().mean()), 4),
            "consistency_at_steps": {
                str(t): v for t, v in consistency_at_steps(rec["found_step"], steps).items()
            },
        }
        if "start_correct" in rec:
            start = rec["start_correct"].bool()
            out["op_accuracy"] = round(float((start & ~rec["found"].bool()).float().mean()), 4)
            out["op_accuracy_at_steps"] = {
                str(t): v for t, v in accuracy_at_steps(rec["found_step"], steps, start).items()
            }
        return out, []
