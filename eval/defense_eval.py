"""``python -m eval defense``: the projection defense (Defense-GAN) and the attacks that break it, on MNIST.

Figures (each written with ``n``, threat model, eps, attack settings, projection schedule and seconds):

1. ``undefended_pgd_linf_0.3``: the zoo classifier alone under Madry's PGD (Linf 0.3, 40 steps of 0.01, random
   start). Target: accuracy <= 1%.
2. ``defended_clean``: clean accuracy of ``classifier(G(z*(x)))`` with the chosen projection schedule
   (deterministic projection). Target for the Defense-GAN schedule: >= 98.5%.
3. ``naive_transfer_l2_{2,4}``: PGD (l2) on the *bare* classifier, ignoring the projection, transferred to the
   defended model: the defense looks robust.
4. ``bpda_eot_l2_{2,4}``: PGD (l2) through the randomized defended model with BPDA (identity backward through the
   projection) and EOT (gradients averaged over ``eot`` fresh projections per step); the final images are
   evaluated in ``draws`` fresh projections and a point counts as robust only if all draws are correct.
   Target at l2 = 4: accuracy <= 55% (the obfuscated-gradients figure).
5. ``onmanifold_l2_3``: :class:`attacks.LatentAttack` (pixel constraint ``||G(z') - G(z)||_2 <= 3``) from latents
   of test images (encoder warm start + the fast schedule), counted on images whose ``G(z)`` the classifier labels
   correctly; ``onmanifold_grid.png`` shows pairs ``G(z) | G(z')``.
6. ``overpowered_l2_4``: :class:`attacks.OverpoweredAttack` (eps 4) from the same latents; accuracy = fraction of
   starts near which the classifier stays consistent. Target: <= 10%. A few found pairs are projected with the
   defense to verify that the projection does not separate them.

Schedules: ``defense-gan`` = Defense-GAN's own (SGD momentum 0.7, lr 10, L = 200, R = 10: 2000 generator passes
per image per evaluation); ``fast`` = Adam lr 0.05, 50 steps, 2 restarts from the encoder's E(x) (102 passes).
``--quick`` = n 20, fast schedule, fewer steps: a smoke run, not the figures.

Writes ``DIR/results.json``, ``DIR/results.md`` (a table) and ``DIR/onmanifold_grid.png``. ``--write`` also merges
the figures that belong to the classifier alone (5 and 6: on-manifold and overpowered, which do not involve the
projection) into the classifier's zoo record (``figures.onmanifold_l2_<eps>``, ``figures.overpowered_l2_<eps>``),
after checking the weights' SHA-256; ``python -m eval zoo --markdown`` shows them.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from attacks import LatentAttackConfig, Norm, OverpoweredConfig, PGDConfig, ThreatModel, per_sample_norm
from attacks.base import predict
from eval.cli import command_line
from eval.defense_figures import (
    SCHEDULES,
    consistency_at_steps,
    correct_in_every_draw,
    defended_model,
    evaluate_onmanifold,
    evaluate_overpowered,
    evaluate_pgd,
    invert_latents,
    plot_pairs,
    schedule_config,
)
from eval.inputs import check_labeled_images
from eval.run_folder import claim_run_folder
from manifold_defense import zoo
from manifold_defense.progress import progress as progress_display

log = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIERS",
    "FIGURES",
    "DefenseEvalSettings",
    "DefenseModels",
    "add_parsers",
    "load_zoo_models",
    "run_command",
    "run_defense_eval",
    "write_markdown",
]

#: Zoo classifiers the evaluation commands can defend or attack (``--classifier``).
CLASSIFIERS: tuple[str, ...] = zoo.CLASSIFIERS

#: Figure groups, in the order they are computed (``--figures`` selects a subset).
FIGURES: tuple[str, ...] = ("undefended", "defended-clean", "naive", "bpda", "onmanifold", "overpowered")


@dataclass(frozen=True)
class DefenseEvalSettings:
    """Every setting of :func:`run_defense_eval` (defaults: the full run on 100 images with the fast schedule).

    Args:
        n: test images (the first ``n`` of the split), >= 1.
        schedule: projection schedule of the defended model, ``"fast"`` or ``"defense-gan"``.
        seed: seed of attacks' random starts and of the projection's restart noise.
        batch_size: images per attack / projection call.
        figures: subset of :data:`FIGURES` to compute (``"naive"`` and ``"bpda"`` also compute
            ``"defended-clean"``: its per-point mask marks clean errors as not robust).
        quick: a smoke run (recorded in the outputs).
        pgd_eps, pgd_steps, pgd_step_size: the undefended Linf attack (Madry: 0.3, 40, 0.01).
        l2_eps: l2 budgets (total over the image) of the naive and BPDA attacks.
        naive_steps: steps of the naive (bare-classifier) l2 PGD; step ``2.5 eps / steps``.
        bpda_steps: steps of the BPDA + EOT l2 PGD through the defense; step ``2.5 eps / steps``.
        eot_samples: projections averaged per BPDA step (EOT).
        draws: fresh projections the final adversarial images are evaluated in (worst case counts).
        latent_eps, latent_steps, latent_step_size: the on-manifold attack (pixel l2 budget, Adam steps, lr).
        latent_schedule: schedule used to invert test images into starting latents (encoder warm start).
        op_eps, op_steps, op_step_size: the overpowered attack (pair l2 budget, Adam steps, lr).
        op_multiplier_init: initial Lagrange multiplier of the pair-distance constraint. The library default
            (1.0) pulls the pair together before the divergence term separates it (the pairs collapse to
            distance ~0.04, where the symmetric divergence is stationary); 1e-3 lets the pair separate first.
        op_temperature: the OP divergence is taken of ``logits / op_temperature`` (default 1, the paper's loss;
            see :class:`attacks.OverpoweredConfig`: > 1 keeps the loss from saturating on a confident classifier).
        op_check_pairs: found pairs projected with the defense to check they stay apart.
        grid_pairs: pairs shown in ``onmanifold_grid.png``.
    """

    n: int = 100
    schedule: str = "fast"
    seed: int = 0
    batch_size: int = 100
    figures: tuple[str, ...] = FIGURES
    quick: bool = False
    pgd_eps: float = 0.3
    pgd_steps: int = 40
    pgd_step_size: float = 0.01
    l2_eps: tuple[float, ...] = (2.0, 4.0)
    naive_steps: int = 100
    bpda_steps: int = 20
    eot_samples: int = 2
    draws: int = 3
    latent_eps: float = 3.0
    latent_steps: int = 200
    latent_step_size: float = 0.05
    latent_schedule: str = "fast"
    op_eps: float = 4.0
    op_steps: int = 300
    op_step_size: float = 0.05
    op_multiplier_init: float = 0.001
    op_temperature: float = 1.0
    op_check_pairs: int = 10
    grid_pairs: int = 8

    def __post_init__(self) -> None:
        def positive_int(name: str, low: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"expected {name} to be an int >= {low}, got {value!r}")

        for name in ("n", "batch_size", "pgd_steps", "naive_steps", "bpda_steps", "eot_samples", "draws"):
            positive_int(name)
        for name in ("seed", "latent_steps", "op_steps", "op_check_pairs", "grid_pairs"):
            positive_int(name, 0)
        for name in ("schedule", "latent_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise ValueError(
                    f"expected {name} to be one of {list(SCHEDULES)}, got {getattr(self, name)!r}"
                )
        figures = tuple(self.figures)
        unknown = [f for f in figures if f not in FIGURES]
        if unknown or not figures:
            raise ValueError(
                f"expected figures to be a non-empty subset of {list(FIGURES)}, got {list(figures)}"
            )
        object.__setattr__(self, "figures", tuple(f for f in FIGURES if f in figures))
        eps_values = tuple(self.l2_eps)
        if not eps_values or not all(isinstance(e, (int, float)) and 0 < e < math.inf for e in eps_values):
            raise ValueError(f"expected l2_eps to be a non-empty tuple of floats > 0, got {self.l2_eps!r}")
        object.__setattr__(self, "l2_eps", tuple(float(e) for e in eps_values))
        for name in (
            "pgd_eps",
            "pgd_step_size",
            "latent_eps",
            "latent_step_size",
            "op_eps",
            "op_step_size",
            "op_multiplier_init",
            "op_temperature",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"expected {name} to be a finite float > 0, got {value!r}")

    @classmethod
    def quick_preset(cls, **overrides: Any) -> DefenseEvalSettings:
        """A smoke run of a few minutes on a 2-core CPU: n 20, fast schedule, fewer steps (fields overridable)."""
        base: dict[str, Any] = {
            "n": 20,
            "schedule": "fast",
            "quick": True,
            "naive_steps": 40,
            "bpda_steps": 10,
            "eot_samples": 2,
            "draws": 2,
            "latent_steps": 100,
            "op_steps": 150,
            "op_check_pairs": 5,
        }
        base.update(overrides)
        return cls(**base)


class DefenseModels(NamedTuple):
    """The models the evaluation needs: classifier ([0, 1] images -> logits), generator (``latent_dim``) and the
    generator's encoder (images -> latents, for warm starts)."""

    classifier: nn.Module
    generator: nn.Module
    encoder: nn.Module


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
        weights_dir: zoo folder of the generator and encoder (and of the classifier unless ``classifier_dir``);
            default: the package's.
        classifier: :data:`CLASSIFIERS` name of the classifier to defend / attack (default the standard one;
            ``mnist-pgd-at`` and ``mnist-rmd`` are the robustly trained ones).
        classifier_dir: folder of the classifier's weights if not ``weights_dir`` (e.g. a training run's ``--out``).
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}: expected one of {list(CLASSIFIERS)}")
    return DefenseModels(
        zoo.load(classifier, device, weights_dir=classifier_dir or weights_dir).eval(),
        zoo.load("mnist-gan", device, weights_dir=weights_dir).eval(),
        zoo.load("mnist-encoder", device, weights_dir=weights_dir).eval(),
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def _median(values: Tensor) -> float | None:
    return round(float(values.median()), 4) if values.numel() else None


def _eps_key(eps: float) -> str:
    return f"{eps:g}"


def _schedule_record(name: str, seed: int) -> dict[str, Any]:
    cfg = schedule_config(name, seed)
    passes = cfg.restarts * (cfg.steps + 1)
    return {"name": name, "generator_passes_per_image": passes, "config": _jsonable(cfg)}


class _Runner:
    """State shared by the figure computations of one :func:`run_defense_eval` call."""

    def __init__(
        self, settings: DefenseEvalSettings, models: DefenseModels, x: Tensor, y: Tensor, bar: Any
    ) -> None:
        self.s = settings
        self.m = models
        self.x, self.y = x, y
        self.bar = bar
        self.figures: dict[str, dict[str, Any]] = {}
        self.cfg = schedule_config(settings.schedule, settings.seed)
        self.schedule = _schedule_record(settings.schedule, settings.seed)
        self.clean_correct: Tensor | None = None
        self.clean_projection: Tensor | None = None
        self.batches = -(-x.shape[0] // settings.batch_size)
        self.latents: Tensor | None = None

    def tick(self) -> None:
        self.bar.update(1)

    def stage(self, name: str) -> None:
        self.bar.set_description(name)

    def defended(self, randomize: bool) -> nn.Module:
        m, s = self.m, self.s
        enc = m.encoder if self.cfg.init == "encoder" else None
        return defended_model(
            m.classifier, m.generator, self.cfg, encoder=enc, randomize=randomize, seed=s.seed
        )

    def projector(self) -> nn.Module:
        """The deterministic projection (seed ``s.seed``) of the defended model."""
        projector = self.defended(randomize=False).projector
        if not isinstance(projector, nn.Module):
            raise TypeError(
                f"internal: expected the projector as an nn.Module, got {type(projector).__name__}"
            )
        return projector

    def common(self, n: int, threat: dict[str, Any] | None, attack: dict[str, Any] | None) -> dict[str, Any]:
        return {"n": n, "threat": threat, "attack": attack}

    # ------------------------------------------------------------------------------------------- figures
    def undefended(self) -> None:
        s = self.s
        self.stage("undefended PGD")
        threat = ThreatModel(Norm.LINF, s.pgd_eps)
        config = PGDConfig(steps=s.pgd_steps, step_size=s.pgd_step_size, random_start=True, seed=s.seed)
        clean = correct_in_every_draw(self.m.classifier, self.x, self.y, 1, s.batch_size)
        res = evaluate_pgd(
            self.m.classifier, self.x, self.y, threat, config, batch_size=s.batch_size, on_batch=self.tick
        )
        self.figures[f"undefended_pgd_linf_{_eps_key(s.pgd_eps)}"] = {
            "description": "zoo classifier without defense under PGD",
            **self.common(
                len(self.y), {"norm": "linf", "eps": s.pgd_eps}, {"name": "PGD", **_jsonable(config)}
            ),
            "schedule": None,
            "clean_accuracy": round(float(clean.float().mean()), 4),
            "accuracy": round(res.accuracy, 4),
            "target": "accuracy <= 0.01",
            "target_met": res.accuracy <= 0.01,
            "seconds": round(res.seconds, 2),
        }

    def defended_clean(self) -> None:
        s = self.s
        self.stage(f"defended clean ({s.schedule})")
        projector = self.projector()
        start = time.perf_counter()
        x_hat, preds, passes = [], [], []
        with torch.no_grad():
            for i in range(0, self.x.shape[0], s.batch_size):
                xh = projector(self.x[i : i + s.batch_size])
                x_hat.append(xh.cpu())
                preds.append(
                    predict(self.m.classifier, xh, "classifier", f"on projections of batch {i}").cpu()
                )
                evals = getattr(projector, "last_generator_evals", None)
                if isinstance(evals, Tensor):
                    passes.append(evals.float().cpu())
                self.tick()
        seconds = time.perf_counter() - start
        self.clean_projection = torch.cat(x_hat)
        self.clean_correct = torch.cat(preds) == self.y.cpu()
        mse = (self.clean_projection - self.x.cpu()).pow(2).flatten(1).mean(1)
        acc = float(self.clean_correct.float().mean())
        is_dgan = s.schedule == "defense-gan"
        self.figures["defended_clean"] = {
            "description": "clean accuracy of classifier(G(z*(x))), deterministic projection",
            **self.common(len(self.y), None, None),
            "schedule": self.schedule,
            "accuracy": round(acc, 4),
            "projection_mse_per_pixel": {
                "median": round(float(mse.median()), 6),
                "mean": round(float(mse.mean()), 6),
            },
            "generator_passes_per_image": round(float(torch.cat(passes).mean()), 1) if passes else None,
            "target": "accuracy >= 0.985 (Defense-GAN schedule)" if is_dgan else "reported (fast schedule)",
            "target_met": acc >= 0.985 if is_dgan else None,
            "seconds": round(seconds, 2),
            "seconds_per_image": round(seconds / len(self.y), 4),
        }

    def naive(self) -> None:
        s = self.s
        defended = self.defended(randomize=True)
        for eps in s.l2_eps:
            self.stage(f"naive transfer l2 {eps:g}")
            threat = ThreatModel(Norm.L2, eps)
            config = PGDConfig(steps=s.naive_steps, random_start=True, seed=s.seed)
            res = evaluate_pgd(
                self.m.classifier,
                self.x,
                self.y,
                threat,
                config,
                eval_model=defended,
                draws=s.draws,
                clean_correct=self.clean_correct,
                batch_size=s.batch_size,
                on_batch=self.tick,
            )
            self.figures[f"naive_transfer_l2_{_eps_key(eps)}"] = {
                "description": "PGD on the bare classifier (gradient ignores the projection), transferred to the "
                "defended model; robust = correct in every one of `draws` randomized projections",
                **self.common(
                    len(self.y),
                    {"norm": "l2", "eps": eps},
                    {
                        "name": "PGD",
                        **_jsonable(config),
                        "step_size_used": 2.5 * eps / s.naive_steps,
                        "draws": s.draws,
                    },
                ),
                "schedule": self.schedule,
                "bare_classifier_accuracy": round(res.attacked_model_accuracy, 4),
                "accuracy": round(res.accuracy, 4),
                "target": "looks robust (high accuracy)",
                "target_met": None,
                "seconds": round(res.seconds, 2),
            }

    def bpda(self) -> None:
        s = self.s
        defended = self.defended(randomize=True)
        projector = self.projector()
        if self.clean_projection is None:
            raise RuntimeError("internal: the defended-clean figure must run before the BPDA figure")
        for eps in s.l2_eps:
            self.stage(f"BPDA+EOT l2 {eps:g}")
            threat = ThreatModel(Norm.L2, eps)
            config = PGDConfig(steps=s.bpda_steps, random_start=True, eot_samples=s.eot_samples, seed=s.seed)
            res = evaluate_pgd(
                defended,
                self.x,
                self.y,
                threat,
                config,
                draws=s.draws,
                clean_correct=self.clean_correct,
                batch_size=s.batch_size,
                on_batch=self.tick,
            )
            # Where did the projection move the adversarial images? (deterministic projection, seed s.seed)
            with torch.no_grad():
                p_adv = torch.cat(
                    [
                        projector(res.x_adv[i : i + s.batch_size].to(self.x.device)).cpu()
                        for i in range(0, self.x.shape[0], s.batch_size)
                    ]
                )
            self.tick()
            shift = per_sample_norm(p_adv - self.clean_projection, Norm.L2)
            pert = per_sample_norm(res.x_adv - self.x.cpu(), Norm.L2)
            self.figures[f"bpda_eot_l2_{_eps_key(eps)}"] = {
                "description": "PGD through the randomized defended model, BPDA (identity backward through the "
                "projection) + EOT; robust = correct in the attack's final pass and in every one of `draws` "
                "fresh randomized projections",
                **self.common(
                    len(self.y),
                    {"norm": "l2", "eps": eps},
                    {
                        "name": "PGD + BPDA + EOT",
                        **_jsonable(config),
                        "step_size_used": 2.5 * eps / s.bpda_steps,
                        "draws": s.draws,
                        "gradient": "bpda (identity)",
                        "randomized_projection": True,
                    },
                ),
                "schedule": self.schedule,
                "accuracy": round(res.accuracy, 4),
                "perturbation_l2_median": _median(pert),
                "projection_shift_l2_median": {
                    "robust_points": _median(shift[res.robust]),
                    "broken_points": _median(shift[~res.robust]),
                    "meaning": "||P(x_adv) - P(x)||_2: how far the perturbation moved the projection",
                },
                "target": "accuracy <= 0.55 (obfuscated-gradients figure)" if eps >= 4 else "reported",
                "target_met": (res.accuracy <= 0.55) if eps >= 4 else None,
                "seconds": round(res.seconds, 2),
            }

    def _latents(self) -> Tensor:
        if self.latents is None:
            s = self.s
            self.stage("inverting test images")
            cfg = schedule_config(s.latent_schedule, s.seed)
            enc = self.m.encoder if cfg.init == "encoder" else None
            start = time.perf_counter()
            self.latents, mse = invert_latents(
                self.m.generator, self.x, cfg, encoder=enc, batch_size=s.batch_size, on_batch=self.tick
            )
            self.latent_info = {
                "schedule": _schedule_record(s.latent_schedule, s.seed),
                "mse_per_pixel_median": round(float(mse.median()), 6),
                "seconds": round(time.perf_counter() - start, 2),
            }
        return self.latents

    def onmanifold(self, out: Path) -> None:
        s = self.s
        z = self._latents()
        self.stage("on-manifold attack")
        config = LatentAttackConfig(
            eps=s.latent_eps, constraint="pixel", steps=s.latent_steps, step_size=s.latent_step_size
        )
        res = evaluate_onmanifold(
            self.m.classifier,
            self.m.generator,
            z,
            self.y,
            config,
            batch_size=s.batch_size,
            on_batch=self.tick,
        )
        eligible = int(res.eligible.sum())
        wins = res.success.nonzero().squeeze(1)
        order = wins[res.pixel_distance[wins].argsort()][: s.grid_pairs]
        labels = self.y.cpu()
        captions = [
            (
                f"G(z): y={int(labels[i])}",
                f"G(z'): pred {int(res.pred_adv[i])}, l2 {float(res.pixel_distance[i]):.2f}",
            )
            for i in order.tolist()
        ]
        grid = out / "onmanifold_grid.png"
        plot_pairs(
            grid,
            res.x0[order],
            res.x_adv[order],
            captions,
            f"On-manifold adversarial pairs G(z) | G(z'), ||G(z') - G(z)||_2 <= {s.latent_eps:g} "
            f"(closest {len(order)} of {int(res.success.sum())} successes, n={len(labels)})",
        )
        self.figures[f"onmanifold_l2_{_eps_key(s.latent_eps)}"] = {
            "description": "LatentAttack (pixel constraint) from inverted test latents; success counted on "
            "images whose G(z) the classifier labels correctly",
            **self.common(
                len(self.y),
                {"norm": "l2 (pixel, on G's range)", "eps": s.latent_eps},
                {"name": "LatentAttack", **_jsonable(config)},
            ),
            "schedule": None,
            "starting_latents": self.latent_info,
            "eligible": eligible,
            "successes": int(res.success.sum()),
            "success_rate": round(res.success_rate, 4) if eligible else None,
            "pixel_distance_of_successes": {
                "median": _median(res.pixel_distance[res.success]),
                "min": round(float(res.pixel_distance[res.success].min()), 4)
                if bool(res.success.any())
                else None,
            },
            "grid": grid.name,
            "target": "reported (anchor: one 7 -> 2 flip at l2 3.10)",
            "target_met": None,
            "seconds": round(res.seconds, 2),
        }

    def overpowered(self) -> None:
        s = self.s
        z = self._latents()
        self.stage("overpowered attack")
        config = OverpoweredConfig(
            eps=s.op_eps,
            steps=s.op_steps,
            step_size=s.op_step_size,
            multiplier_init=s.op_multiplier_init,
            seed=s.seed,
            temperature=s.op_temperature,
        )
        res = evaluate_overpowered(
            self.m.classifier,
            self.m.generator,
            z,
            self.y,
            config,
            batch_size=s.batch_size,
            on_batch=self.tick,
        )
        # Verification: project both points of a few found pairs with the defense (deterministic projection).
        found = res.success.nonzero().squeeze(1)[: s.op_check_pairs]
        check: dict[str, Any] = {"pairs_checked": len(found)}
        if len(found):
            start = time.perf_counter()
            projector = self.projector()
            dev = self.x.device
            with torch.no_grad():
                both = torch.cat([res.x1[found], res.x2[found]]).to(dev)
                p = torch.cat(
                    [projector(both[i : i + s.batch_size]) for i in range(0, len(both), s.batch_size)]
                )
                pred = predict(self.m.classifier, p, "classifier", "on projected overpowered pairs").cpu()
            p = p.cpu()
            k = len(found)
            move = per_sample_norm(p - both.cpu(), Norm.L2)
            check.update(
                {
                    "defended_still_disagree": round(float((pred[:k] != pred[k:]).float().mean()), 4),
                    "defended_agrees_with_bare_classifier": round(
                        float((pred == torch.cat([res.pred1[found], res.pred2[found]])).float().mean()), 4
                    ),
                    "projection_moves_points_l2_median": _median(move),
                    "projected_pair_distance_l2_median": _median(per_sample_norm(p[:k] - p[k:], Norm.L2)),
                    "schedule": self.s.schedule,
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
        self.tick()
        self.figures[f"overpowered_l2_{_eps_key(s.op_eps)}"] = {
            "description": "OverpoweredAttack from inverted test latents: pairs G(z1), G(z2) within eps the "
            "classifier labels differently; accuracy = fraction of starts where it stays consistent",
            **self.common(
                len(self.y),
                {"norm": "l2 (pair distance on G's range)", "eps": s.op_eps},
                {"name": "OverpoweredAttack", **_jsonable(config)},
            ),
            "schedule": None,
            "starting_latents": self.latent_info,
            "accuracy": round(res.consistency, 4),
            # the same accuracy after fewer steps (exact, from the step each pair was found): still falling at the
            # last step means the attack has not converged and "accuracy" is an upper bound
            "accuracy_at_steps": {
                str(t): v for t, v in consistency_at_steps(res.found_step, s.op_steps).items()
            },
            "accuracy_consistent_and_correct": round(res.accuracy, 4),
            "pair_distance_of_successes_median": _median(res.distance[res.success]),
            "projection_check": check,
            "target": "accuracy <= 0.10 (anchor about 0.03)",
            "target_met": res.consistency <= 0.10,
            "seconds": round(res.seconds, 2),
        }


def _work_units(settings: DefenseEvalSettings, batches: int) -> int:
    f = settings.figures
    units = 0
    units += batches if "undefended" in f else 0
    units += batches if "defended-clean" in f else 0
    units += len(settings.l2_eps) * batches if "naive" in f else 0
    units += len(settings.l2_eps) * (batches + 1) if "bpda" in f else 0
    units += batches if ("onmanifold" in f or "overpowered" in f) else 0
    units += batches if "onmanifold" in f else 0
    units += batches + 1 if "overpowered" in f else 0
    return units


def run_defense_eval(
    settings: DefenseEvalSettings,
    x: Tensor,
    y: Tensor,
    models: DefenseModels,
    out: Path,
    *,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute the selected figures on the first ``settings.n`` images of ``(x, y)``; write the outputs.

    Args:
        settings: :class:`DefenseEvalSettings`.
        x: ``(N, C, H, W)`` test images in [0, 1] with ``N >= settings.n``, on the models' device.
        y: ``(N,)`` int64 labels, same device.
        models: :class:`DefenseModels` (eval mode).
        out: output folder (created): ``results.json``, ``results.md`` and (``"onmanifold"``)
            ``onmanifold_grid.png``.
        progress: show a tqdm bar.
        meta: extra top-level fields for the JSON (command, device, ...).

    Returns:
        The JSON record (also written to ``out / "results.json"``).
    """
    if not isinstance(settings, DefenseEvalSettings):
        raise TypeError(f"expected settings as DefenseEvalSettings, got {type(settings).__name__}")
    check_labeled_images(x, y, settings.n)
    x, y = x[: settings.n], y[: settings.n]
    out = claim_run_folder(out, "defense", dataclasses.asdict(settings))
    figs = set(settings.figures)
    if figs & {"naive", "bpda"}:
        figs.add("defended-clean")
    settings = dataclasses.replace(settings, figures=tuple(figs))
    batches = -(-settings.n // settings.batch_size)
    start = time.perf_counter()
    with progress_display(
        total=_work_units(settings, batches), desc="defense", disable=not progress, unit="batch"
    ) as bar:
        runner = _Runner(settings, models, x, y, bar)
        steps: dict[str, Callable[[], None]] = {
            "undefended": runner.undefended,
            "defended-clean": runner.defended_clean,
            "naive": runner.naive,
            "bpda": runner.bpda,
            "onmanifold": lambda: runner.onmanifold(out),
            "overpowered": runner.overpowered,
        }
        for name in settings.figures:
            steps[name]()
            # Write after every figure, so an interrupted run keeps what it finished.
            record = _record(settings, runner, meta, time.perf_counter() - start, complete=False)
            (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    record = _record(settings, runner, meta, time.perf_counter() - start, complete=True)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "results.md").write_text(write_markdown(record))
    return record


def _record(
    settings: DefenseEvalSettings,
    runner: _Runner,
    meta: dict[str, Any] | None,
    seconds: float,
    complete: bool,
) -> dict[str, Any]:
    return {
        **(meta or {}),
        "quick": settings.quick,
        "note": "QUICK smoke run (n 20, fast schedule, fewer steps): not the reported figures"
        if settings.quick
        else "full settings",
        "complete": complete,
        "n": settings.n,
        "data": f"MNIST test split, first {settings.n} images",
        "schedule": runner.schedule,
        "settings": _jsonable(settings),
        "seconds_total": round(seconds, 1),
        "figures": runner.figures,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def write_markdown(record: dict[str, Any]) -> str:
    """A Markdown table of a :func:`run_defense_eval` record (one row per figure)."""
    lines = [
        f"# Projection defense evaluation{' (QUICK smoke run)' if record.get('quick') else ''}",
        "",
        f"Command: `{record.get('command', '?')}`; device {record.get('device', '?')}; "
        f"n = {record['n']} ({record['data']}); defended-model schedule: {record['schedule']['name']} "
        f"({record['schedule']['generator_passes_per_image']} generator passes per image per projection); "
        f"total {record['seconds_total']} s.",
        "",
        "| figure | result | target | met | n | threat | attack | schedule | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, fig in record["figures"].items():
        if "success_rate" in fig:
            result = (
                f"success rate {_fmt(fig['success_rate'])} ({fig['successes']}/{fig['eligible']} eligible)"
            )
        else:
            result = f"accuracy {_fmt(fig['accuracy'])}"
            if "bare_classifier_accuracy" in fig:
                result += f" (bare classifier {_fmt(fig['bare_classifier_accuracy'])})"
            if "clean_accuracy" in fig:
                result += f" (clean {_fmt(fig['clean_accuracy'])})"
            if "accuracy_at_steps" in fig:
                curve = ", ".join(f"{t}: {_fmt(v)}" for t, v in fig["accuracy_at_steps"].items())
                result += f" (after steps {curve})"
        threat = fig.get("threat")
        threat_s = "-" if threat is None else f"{threat['norm']} eps {_fmt(threat['eps'])}"
        attack = fig.get("attack")
        if attack is None:
            attack_s = "-"
        else:
            keep = (
                "steps",
                "step_size",
                "step_size_used",
                "eot_samples",
                "draws",
                "constraint",
                "multiplier_init",
                "seed",
            )
            attack_s = (
                attack["name"]
                + " "
                + ", ".join(f"{k} {_fmt(attack[k])}" for k in keep if attack.get(k) is not None)
            )
        sched = fig.get("schedule")
        sched_s = "-" if sched is None else sched["name"]
        met = fig.get("target_met")
        lines.append(
            f"| {key} | {result} | {fig.get('target', '-')} | {'-' if met is None else ('yes' if met else 'NO')} "
            f"| {fig['n']} | {threat_s} | {attack_s} | {sched_s} | {_fmt(fig.get('seconds'))} |"
        )
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- command


def _parse_figures(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in FIGURES]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {list(FIGURES)}, got {text!r}"
        )
    return parts


def add_parsers(sub: Any) -> None:
    """Register ``defense`` on the ``python -m eval`` sub-parsers."""
    p = sub.add_parser(
        "defense",
        help="evaluate the projection defense (Defense-GAN) and the attacks that break it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/defense[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke run: n 20, fast schedule, fewer steps")
    p.add_argument("--n", type=int, default=None, help="first N MNIST test images (default 100; quick 20)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="projection schedule (default fast)")
    p.add_argument("--figures", type=_parse_figures, default=FIGURES, help=f"subset of {','.join(FIGURES)}")
    p.add_argument("--batch", type=int, default=100, help="images per attack / projection call")
    p.add_argument(
        "--l2-eps", type=float, nargs="+", default=None, help="l2 budgets of naive and BPDA (default 2 4)"
    )
    p.add_argument("--bpda-steps", type=int, default=None, help="BPDA+EOT PGD steps (default 20; quick 10)")
    p.add_argument("--eot", type=int, default=None, help="EOT samples per BPDA step (default 2)")
    p.add_argument("--draws", type=int, default=None, help="final evaluation draws (default 3; quick 2)")
    p.add_argument("--op-steps", type=int, default=None, help="overpowered attack steps (default 300)")
    p.add_argument("--latent-steps", type=int, default=None, help="on-manifold attack steps (default 200)")
    p.add_argument("--latent-eps", type=float, default=None, help="on-manifold pixel l2 budget (default 3)")
    p.add_argument("--op-eps", type=float, default=None, help="overpowered pair l2 budget (default 4)")
    p.add_argument(
        "--op-temperature",
        type=float,
        default=None,
        help="divide the logits by this in the OP loss (default 1; > 1 against saturated softmax)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--weights-dir", type=Path, default=None, help="zoo folder (default: the package's)")
    p.add_argument(
        "--write",
        action="store_true",
        help="merge the on-manifold and overpowered figures into the --classifier's zoo record",
    )
    add_classifier_args(p)
    p.set_defaults(func=run_command)


#: Figures of :func:`run_defense_eval` that measure the classifier alone (no projection): ``--write`` records them.
CLASSIFIER_FIGURES = ("onmanifold", "overpowered")


def record_classifier_figures(
    classifier: str, record: dict[str, Any], weights_dir: Path | None
) -> dict[str, Any]:
    """Merge the on-manifold and overpowered figures of a ``run_defense_eval`` ``record`` into the zoo record of
    ``classifier`` (in ``weights_dir``, default the package's zoo), keeping its other figures; the weights' SHA-256
    must match the record (:func:`manifold_defense.zoo.verify`). Returns the new record.

    Each figure keeps its headline number (on-manifold: ``success_rate`` with ``eligible`` and ``successes``;
    overpowered: ``accuracy``), ``n``, the threat, the attack's steps, step size and (OP) temperature, and the run's
    command, device, threads and seconds; an OP figure at a temperature other than 1 is recorded beside the
    temperature-1 one, as ``overpowered_l2_<eps>_t<T>``. Raises ``ValueError`` for a quick (smoke) record or one
    without either figure.
    """
    if record.get("quick"):
        raise ValueError("--write records measured figures: expected a full run, got a --quick smoke run")
    found = {k: v for k, v in record["figures"].items() if k.startswith(CLASSIFIER_FIGURES)}
    if not found:
        raise ValueError(
            f"--write records the {' and '.join(CLASSIFIER_FIGURES)} figures: expected --figures to include "
            f"one of them, got {sorted(record['figures'])}"
        )
    zoo.verify(classifier, weights_dir)
    figures = dict(zoo.record(classifier, weights_dir).get("figures", {}))
    for name_in_run, fig in found.items():
        temperature = fig["attack"].get("temperature", 1.0)  # OP only; records before it existed lack it
        key = name_in_run if temperature == 1.0 else f"{name_in_run}_t{temperature:g}"
        headline = (
            ("success_rate", "eligible", "successes") if key.startswith("onmanifold") else ("accuracy",)
        )
        figures[key] = {name: fig[name] for name in headline} | {
            "n": fig["n"],
            "threat": fig["threat"],
            "attack": {
                name: fig["attack"][name]
                for name in ("name", "steps", "step_size", "temperature")
                if name in fig["attack"]
            },
            "data": record["data"],
            "command": record["command"],
            "device": record["device"],
            "threads": record["threads"],
            "seconds": fig["seconds"],
        }
    return zoo.update_record(classifier, {"figures": figures}, weights_dir)


def add_classifier_args(p: argparse.ArgumentParser) -> None:
    """``--classifier NAME`` and ``--classifier-dir DIR`` (shared by ``defense`` and ``robustness``)."""
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default="mnist-classifier",
        help="zoo classifier to defend and attack (default mnist-classifier)",
    )
    p.add_argument(
        "--classifier-dir",
        type=Path,
        default=None,
        help="folder of the --classifier weights and record if not --weights-dir (e.g. a training run's --out)",
    )


def settings_from_args(args: argparse.Namespace) -> DefenseEvalSettings:
    """:class:`DefenseEvalSettings` from the parsed command line (validated)."""
    overrides: dict[str, Any] = {"seed": args.seed, "batch_size": args.batch, "figures": tuple(args.figures)}
    if args.l2_eps is not None:
        overrides["l2_eps"] = tuple(args.l2_eps)
    for arg, name in (
        ("n", "n"),
        ("schedule", "schedule"),
        ("bpda_steps", "bpda_steps"),
        ("eot", "eot_samples"),
        ("draws", "draws"),
        ("op_steps", "op_steps"),
        ("latent_steps", "latent_steps"),
        ("latent_eps", "latent_eps"),
        ("op_eps", "op_eps"),
        ("op_temperature", "op_temperature"),
    ):
        value = getattr(args, arg)
        if value is not None:
            overrides[name] = value
    if args.quick:
        if overrides.get("schedule", "fast") != "fast":
            raise ValueError(
                f"expected --quick with the fast schedule, got --schedule {overrides['schedule']}"
            )
        return DefenseEvalSettings.quick_preset(**overrides)
    return DefenseEvalSettings(**overrides)


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval defense``."""
    from manifold_defense.data import load_mnist
    from manifold_defense.devices import resolve_device

    settings = settings_from_args(args)
    if args.write:  # refuse before the long run, not after it
        if settings.quick:
            raise ValueError("--write records measured figures: it cannot be used with --quick")
        if not set(CLASSIFIER_FIGURES) & set(settings.figures):
            raise ValueError(
                f"--write records the {' and '.join(CLASSIFIER_FIGURES)} figures: expected --figures to include "
                f"one of them, got {','.join(settings.figures)}"
            )
        zoo.verify(args.classifier, args.classifier_dir or args.weights_dir)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = (
        args.out if args.out is not None else Path("runs/defense-quick" if settings.quick else "runs/defense")
    )
    claim_run_folder(out, "defense", dataclasses.asdict(settings))  # refuse before the long run
    test = load_mnist("test", limit=settings.n)
    if len(test) < settings.n:
        raise ValueError(f"expected --n <= {len(test)} test images, got {settings.n}")
    if settings.quick:
        log.info("QUICK smoke run: n=%d, fast schedule, fewer steps; not the reported figures", settings.n)
    meta = {
        "command": command_line(args),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "models": f"zoo {args.classifier}, mnist-gan, mnist-encoder",
    }
    record = run_defense_eval(
        settings,
        test.images.to(device),
        test.labels.to(device),
        load_zoo_models(
            device, args.weights_dir, classifier=args.classifier, classifier_dir=args.classifier_dir
        ),
        out,
        meta=meta,
    )
    print(write_markdown(record))
    log.info("wrote %s", out / "results.json")
    if args.write:
        folder = args.classifier_dir or args.weights_dir
        record_classifier_figures(args.classifier, record, folder)
        log.info("wrote the %s figures into the %s record", "/".join(CLASSIFIER_FIGURES), args.classifier)
    return 0
