"""The stages of the harness: per defense ``info`` (randomness, gradient check), ``clean``, ``projection`` (the
defended-clean projection figures), the attack cascade per threat model, the accuracy-vs-eps curves and the
example grids. Every stage saves its per-point results in the state (:mod:`eval.harness.state`).

The one attack loop is :class:`attacks.PGD` (with the torchattacks / latent / overpowered attacks of
:mod:`attacks`); this module only chooses which model each attack runs through and which model judges:

- the *inner model* of an attack is the model whose gradients (or queries) the attack uses: the bare classifier
  for the naive ``pgd``, the BPDA model, the unrolled model, or a surrogate of the defense;
- the *verdict* is always the real defense's: a point is robust after an attack when ``defense.model`` labels
  the candidate correctly in each of ``draws`` fresh forward passes (and in the attack's own final pass when the
  inner model is the real BPDA model or the model itself);
- when the inner model is not the real defense, the stage also records per point whether the inner model
  itself was fooled (``surrogate_broken``), so the report can say how many surrogate successes transferred.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attacks import (
    LatentAttackConfig,
    Norm,
    OverpoweredConfig,
    PGDConfig,
    ThreatModel,
    TorchattacksAttack,
    per_sample_norm,
    project_onto_threat,
)
from attacks.base import check_logits
from eval.harness import state as st
from eval.harness.defenses import Defense
from eval.harness.sections import ChunkFn, SectionStages
from eval.harness.settings import RobustnessSettings, parse_threat, threat_key
from manifold_defense import evaluation
from manifold_defense.inversion import InversionConfig
from manifold_defense.progress import progress as progress_display
from manifold_defense.training.distributed import DistContext

__all__ = ["Runner", "input_gradient"]


def input_gradient(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The gradient of the summed cross-entropy of ``module(x)`` with respect to ``x`` (zeros where unused), for the
    red-flag gradient check; ``x`` is not modified. The only gradient the harness computes itself: every attack's
    gradients are computed by :mod:`attacks`."""
    x_req = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(module(x_req), y, reduction="sum")
        grads = torch.autograd.grad(loss, x_req, allow_unused=True)[0]
    return torch.zeros_like(x) if grads is None else grads.detach()


def _schedule(model: nn.Module) -> str:
    """The projection settings inside a module (its ``LatentProjector``'s ``extra_repr``), for the records."""
    for m in model.modules():
        if type(m).__name__ == "LatentProjector":
            return m.extra_repr()
    return type(model).__name__


class Runner(SectionStages):
    """Runs every stage of every defense, skipping those the state already holds (see module docs)."""

    def __init__(
        self,
        settings: RobustnessSettings,
        defenses: list[Defense],
        x: Tensor,
        y: Tensor,
        out: Path,
        ctx: DistContext,
        generator: nn.Module | None,
        encoder: nn.Module | None,
        latent_config: InversionConfig | None,
        state: dict[str, Any],
        progress: bool,
        on_stage: Callable[[str], None] | None,
    ) -> None:
        self.s = settings
        self.defenses = defenses
        self.x, self.y = x, y
        self.out = out
        self.ctx = ctx
        self.generator, self.encoder, self.latent_config = generator, encoder, latent_config
        self.state = state
        self.on_stage = on_stage
        # Latents of the points, kept in the state so that a resumed run reuses the very latents the
        # interrupted one computed (a later stage would otherwise invert them in another batch composition).
        self.latents: dict[int, Tensor] = state.setdefault("latents", {})
        state.setdefault("partial", {})
        self.bar = progress_display(
            total=self._count_stages(),
            desc="robustness",
            disable=not (progress and ctx.is_main),
            unit="stage",
        )
        self.bar.update(sum(1 for k in state["stages"] if not k.endswith("|info")))

    def _count_stages(self) -> int:
        per_threat = len(self.s.attacks) - 1
        curves = sum(len(self._curve_eps(n)) for n in self._curve_norms())
        extra = sum(1 for d in self.defenses if d.preprocess is not None)
        return (
            len(self.defenses) * (1 + len(self.s.threats) * per_threat + curves + len(self.s.threats)) + extra
        )

    def _curve_norms(self) -> list[str]:
        return sorted({parse_threat(t).norm.value for t in self.s.threats}, key=lambda v: v != "linf")

    def _curve_eps(self, norm: str) -> tuple[float, ...]:
        return self.s.curve_eps_linf if norm == "linf" else self.s.curve_eps_l2

    # ---------------------------------------------------------------------------------------- plumbing
    def _save(self) -> None:
        if self.ctx.is_main:
            st.save_state(self.state, self.out)

    def _finish(self, key: str, record: dict[str, Any]) -> None:
        # the per-point cost entries of run_chunks become stage totals (resumed chunks included)
        for part, total in (("chunk_seconds", "process_seconds"), ("real_rows", "real_passes")):
            if part in record:
                record[total] = float(record.pop(part).sum())
        self.state["stages"][key] = record
        self.state["partial"].pop(key, None)
        self._save()
        self.bar.update(1)
        if self.on_stage is not None:
            self.on_stage(key)

    def _chunks(self, key: str, d: Defense, idx: Tensor, size: int, fn: ChunkFn) -> dict[str, Tensor]:
        if not len(idx):
            return {}
        return st.run_chunks(
            self.state, key, d, idx, size, fn, seed=self.s.seed, ctx=self.ctx, device=self.x.device,
            save=self._save, on_chunk=self.bar.set_postfix_str,
        )  # fmt: skip

    def _verdict(
        self, d: Defense, draws: int, x_adv: Tensor, y: Tensor, base_ok: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(robust, first_ok)`` on CPU: correct in ``base_ok`` and every one of ``draws`` fresh passes of the
        real model; and after the first pass only. A point already wrong is not passed again (its verdict is
        decided), which saves forward passes of an expensive defense and changes no verdict."""
        name = f"model of defense {d.name!r}"
        robust = base_ok.cpu().clone()
        first = robust.clone()
        for k in range(draws):
            todo = robust.nonzero().squeeze(1)
            if not len(todo):
                break
            dev = todo.to(x_adv.device)
            ok = evaluation.correct_in_every_draw(d.model, x_adv[dev], y[dev], 1, max(1, len(todo)), name=name)
            robust[todo] = ok
            if k == 0:
                first = robust.clone()
        return robust, first

    def _package(
        self,
        d: Defense,
        draws: int,
        xb: Tensor,
        yb: Tensor,
        x_adv: Tensor,
        base_ok: Tensor,
        threat: ThreatModel,
    ) -> dict[str, Tensor]:
        robust, first = self._verdict(d, draws, x_adv, yb, base_ok)
        dist_ = per_sample_norm((x_adv - xb).double(), threat.norm).float()
        return {"robust": robust, "first_ok": first, "x_adv": x_adv, "distance": dist_}

    # ------------------------------------------------------------------------------------------ defense
    def run(self) -> None:
        for d in self.defenses:
            n_d = min(self.s.n, self.s.n_per_defense.get(d.name, self.s.n))
            info = self._info(d, n_d)
            draws = self.s.draws if info["randomized"] else 1
            clean = self._clean(d, n_d, draws)
            if d.preprocess is not None:
                self._projection(d, n_d)
            for t in self.s.threats:
                self._cascade(d, draws, parse_threat(t), clean)
            for norm in self._curve_norms():
                for eps in self._curve_eps(norm):
                    self._curve(d, draws, ThreatModel(Norm(norm), eps), clean)
            for t in self.s.threats:
                self._examples(d, parse_threat(t))
        self.bar.close()

    def _info(self, d: Defense, n_d: int) -> dict[str, Any]:
        key = f"{d.name}|info"
        if key in self.state["stages"]:
            return dict(self.state["stages"][key])
        x, y = self.x[: min(2, n_d)], self.y[: min(2, n_d)]
        with torch.no_grad(), st.seeded(self.s.seed, d, x.device):
            out1 = d.model(x)
            check_logits(out1, x.shape[0], y, f"model of defense {d.name!r}")
            out2 = d.model(x)
        others = {"classifier": d.classifier} | {f"surrogate {k!r}": m for k, m in d.surrogates.items()}
        surrogate_random: dict[str, bool] = {}
        for label, module in others.items():
            if module is None:
                continue
            with torch.no_grad(), st.seeded(self.s.seed, d, x.device):
                c = module(x)
                c2 = module(x) if label != "classifier" else c
            check_logits(c, x.shape[0], y, f"{label} of defense {d.name!r}")
            if c.shape != out1.shape:
                raise ValueError(
                    f"expected the {label} of defense {d.name!r} to return logits like its model "
                    f"{tuple(out1.shape)}, got {tuple(c.shape)}"
                )
            if label != "classifier":
                surrogate_random[label.split("'")[1]] = not torch.equal(c, c2)
        labels = self.y[:n_d]
        if int(labels.max()) >= out1.shape[1]:
            raise ValueError(
                f"expected the model of defense {d.name!r} to return logits for every label: labels in "
                f"[0, {out1.shape[1]}) (its output size), got labels up to {int(labels.max())}"
            )
        randomized = d.randomized if d.randomized is not None else not torch.equal(out1, out2)
        info: dict[str, Any] = {
            "n": n_d,
            "randomized": bool(randomized),
            "detected_random": not torch.equal(out1, out2),
            "gradients": self._gradient_check(d, min(self.s.grad_check_n, n_d)),
        }
        if d.surrogates:
            info["surrogates"] = {
                "names": list(d.surrogates),
                "inner": d.surrogate,
                "randomized": surrogate_random,
            }
        self.state["stages"][key] = info
        self._save()
        return info

    def _gradient_sources(self, d: Defense) -> dict[str, nn.Module]:
        sources: dict[str, nn.Module] = {}
        attacks = self.s.attacks
        if "pgd" in attacks:
            sources["pgd"] = d.classifier if d.classifier is not None else d.model
        if d.bpda_model is not None and (
            {"bpda-pgd", "bpda-eot-pgd", "apgd", "real-bpda-eot"} & set(attacks)
        ):
            sources["bpda"] = d.bpda_model
        if d.unrolled_model is not None and "unrolled-pgd" in attacks:
            sources["unrolled"] = d.unrolled_model
        for name, module in d.surrogates.items():
            sources[f"surrogate-{name}"] = module
        return sources

    def _gradient_check(self, d: Defense, k: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if k == 0:
            return out
        x, y = self.x[:k], self.y[:k]
        for name, module in self._gradient_sources(d).items():
            with st.seeded(self.s.seed, d, x.device):
                flat = input_gradient(module, x, y).reshape(k, -1)
            out[name] = {
                "points": k,
                "nan_or_inf": int((~torch.isfinite(flat)).sum()),
                "zero_fraction": round(float((flat == 0).all(dim=1).float().mean()), 4),
                "norm_median": round(float(torch.nan_to_num(flat).norm(dim=1).median()), 6),
            }
        return out

    def _clean(self, d: Defense, n_d: int, draws: int) -> Tensor:
        key = f"{d.name}|clean"
        if key not in self.state["stages"]:
            start = time.perf_counter()
            idx = torch.arange(n_d)

            def fn(chunk: Tensor) -> dict[str, Tensor]:
                robust, first = self._verdict(
                    d, draws, self.x[chunk], self.y[chunk], torch.ones(len(chunk), dtype=torch.bool)
                )
                return {"robust": robust, "first_ok": first}

            parts = self._chunks(key, d, idx, self.s.batch_size, fn)
            self._finish(
                key, {"status": "ran", "indices": idx, **parts, "seconds": time.perf_counter() - start}
            )
        return self.state["stages"][key]["robust"].clone()

    # ------------------------------------------------------------------------------------------ cascade
    def _skip_reason(self, d: Defense, attack: str, randomized: bool) -> str | None:
        if attack in ("bpda-pgd", "bpda-eot-pgd") and d.bpda_model is None and d.surrogate is None:
            return "no preprocessing: BPDA equals the plain gradient (pgd)"
        if attack == "bpda-eot-pgd" and not randomized:
            return "deterministic defense: EOT equals bpda-pgd"
        if attack == "surrogate-pgd" and not d.surrogates:
            return "the defense names no surrogate"
        if attack == "unrolled-pgd" and d.unrolled_model is None:
            return "no preprocessing to unroll"
        if attack in ("onmanifold", "overpowered") and self.generator is None:
            return "no generator given"
        if attack == "real-bpda-eot" and not d.surrogates:
            return "no surrogate: every attack already ran on the real defense"
        return None

    def _cascade(self, d: Defense, draws: int, threat: ThreatModel, clean: Tensor) -> None:
        tk = threat_key(threat)
        robust = clean.clone()
        randomized = draws > 1 or bool(self.state["stages"][f"{d.name}|info"]["randomized"])
        after_pgd = robust.clone()
        for attack in self.s.attacks[1:]:
            key = f"{d.name}|{tk}|{attack}"
            if key not in self.state["stages"]:
                reason = self._skip_reason(d, attack, randomized)
                if reason is not None:
                    self._finish(key, {"status": "skipped", "reason": reason})
                else:
                    pool = robust if self.s.cascade else clean
                    if attack == "unrolled-pgd":
                        idx = (after_pgd if self.s.cascade else clean).nonzero().squeeze(1)
                        idx = idx[: self.s.unrolled_n] if self.s.unrolled_n is not None else idx
                    elif attack == "real-bpda-eot":
                        idx = robust.nonzero().squeeze(1)  # the survivors, in either mode
                    else:
                        idx = pool.nonzero().squeeze(1)
                    self._attack(key, d, draws, threat, attack, idx, randomized)
            rec = self.state["stages"][key]
            if rec["status"] == "ran" and len(rec["indices"]):
                robust[rec["indices"]] &= rec["robust"]
            if attack == "pgd":
                after_pgd = robust.clone()

    def _pgd_fn(
        self, d: Defense, draws: int, threat: ThreatModel, model: nn.Module, config: PGDConfig
    ) -> ChunkFn:
        """PGD through ``model``; the verdict is the real defense's (see module docs)."""
        real = model is d.model or model is d.bpda_model

        def fn(chunk: Tensor) -> dict[str, Tensor]:
            xb, yb = self.x[chunk], self.y[chunk]
            cfg = dataclasses.replace(config, seed=int(torch.initial_seed() % (2**62)))
            res = evaluation.evaluate_pgd(model, xb, yb, threat, cfg, draws=1, batch_size=len(chunk))
            x_adv = res.x_adv.to(xb.device)
            if real:
                return self._package(d, draws, xb, yb, x_adv, res.robust, threat)
            out = self._package(d, draws, xb, yb, x_adv, torch.ones(len(chunk), dtype=torch.bool), threat)
            out["surrogate_broken"] = ~res.robust
            return out

        return fn

    def _surrogates_fn(self, d: Defense, draws: int, threat: ThreatModel, randomized: bool) -> ChunkFn:
        """PGD through each surrogate in turn, on the points of the chunk no earlier surrogate broke."""
        rnd = self.state["stages"][f"{d.name}|info"].get("surrogates", {}).get("randomized", {})

        def fn(chunk: Tensor) -> dict[str, Tensor]:
            xb = self.x[chunk]
            n = len(chunk)
            no = torch.zeros(n, dtype=torch.bool)
            out = {
                "robust": torch.ones(n, dtype=torch.bool),
                "first_ok": torch.ones(n, dtype=torch.bool),
                "x_adv": xb.clone(),
                "distance": torch.zeros(n),
                "surrogate_broken": no.clone(),  # any surrogate misclassified its own example
            }
            for name in d.surrogates:  # per surrogate: attacked, fooled itself, fooled the real defense
                out |= {f"tried|{name}": no.clone(), f"fooled|{name}": no.clone(), f"real|{name}": no.clone()}
            for name, module in d.surrogates.items():
                todo = out["robust"].nonzero().squeeze(1)
                if not len(todo):
                    break
                eot = self.s.eot_samples if rnd.get(name, randomized) else 1
                cfg = PGDConfig(steps=self.s.bpda_steps, random_start=True, eot_samples=eot)
                part = self._pgd_fn(d, draws, threat, module, cfg)(chunk[todo])
                fooled = part.pop("surrogate_broken").cpu()
                for k, v in part.items():
                    out[k][todo.to(out[k].device)] = v.to(out[k].device, out[k].dtype)
                out["surrogate_broken"][todo] |= fooled
                out[f"tried|{name}"][todo] = True
                out[f"fooled|{name}"][todo] = fooled
                out[f"real|{name}"][todo] = ~part["robust"].cpu()
            return out

        return fn

    def _adapter_fn(
        self, d: Defense, draws: int, threat: ThreatModel, name: str, model: nn.Module, kwargs: dict[str, Any]
    ) -> ChunkFn:
        real = model is d.model or model is d.bpda_model

        def fn(chunk: Tensor) -> dict[str, Tensor]:
            xb, yb = self.x[chunk], self.y[chunk]
            seed = int(torch.initial_seed() % (2**31))
            # (torchattacks' APGD / Square also reseed torch with their own `seed` argument, default 0)
            res = TorchattacksAttack(name, threat, seed=seed, **kwargs)(model, xb, yb)
            base = ~res.success if real else torch.ones(len(chunk), dtype=torch.bool)
            out = self._package(d, draws, xb, yb, res.x_adv, base, threat)
            if not real:
                out["surrogate_broken"] = res.success.cpu()
            return out

        return fn

    def _latent_budget(self, attack: str, threat: ThreatModel) -> float:
        fixed = self.s.latent_budget if attack == "onmanifold" else self.s.op_budget
        if fixed is not None:
            return fixed
        return threat.eps if threat.norm is Norm.L2 else self.s.latent_linf_budget

    def _latent_fn(self, d: Defense, draws: int, threat: ThreatModel, kind: str) -> ChunkFn:
        s = self.s
        clf = d.classifier if d.classifier is not None else d.model
        gen = self.generator
        assert gen is not None
        budget = self._latent_budget(kind, threat)

        def fn(chunk: Tensor) -> dict[str, Tensor]:
            xb, yb = self.x[chunk], self.y[chunk]
            z = self._latents_for(chunk)
            extra: dict[str, Tensor] = {}
            if kind == "onmanifold":
                cfg = LatentAttackConfig(
                    eps=budget, constraint="pixel", steps=s.latent_steps, step_size=s.latent_step_size
                )
                res = evaluation.evaluate_onmanifold(clf, gen, z, yb, cfg, batch_size=len(chunk))
                cand, found = res.x_adv.to(xb.device), res.success
                extra = {"eligible": res.eligible, "x0": res.x0, "candidate": res.x_adv, "pred_adv": res.pred_adv,
                         "pixel_distance": res.pixel_distance, "found_step": res.found_step}  # fmt: skip
            else:
                ocfg = OverpoweredConfig(
                    eps=budget, steps=s.op_steps, step_size=s.op_step_size, multiplier_init=s.op_multiplier_init,
                    temperature=s.op_temperature, seed=int(torch.initial_seed() % (2**62)),
                )  # fmt: skip
                op = evaluation.evaluate_overpowered(clf, gen, z, yb, ocfg, batch_size=len(chunk))
                wrong1 = (op.pred1 != yb.cpu())[:, None, None, None]
                cand = torch.where(wrong1, op.x1, op.x2).to(xb.device)
                found = op.success
                with torch.no_grad():
                    start_pred = clf(gen(z)).argmax(1)
                extra = {"found_step": op.found_step, "start_correct": start_pred.cpu() == yb.cpu()}
            x_adv = project_onto_threat(cand.to(xb.dtype), xb, threat)
            out = self._package(d, draws, xb, yb, x_adv, torch.ones(len(chunk), dtype=torch.bool), threat)
            out["found"] = found.cpu()
            return out | {k: v.cpu() for k, v in extra.items()}

        return fn

    def _attack(
        self,
        key: str,
        d: Defense,
        draws: int,
        threat: ThreatModel,
        attack: str,
        idx: Tensor,
        randomized: bool,
    ) -> None:
        s = self.s
        start = time.perf_counter()
        size = s.unrolled_batch if attack == "unrolled-pgd" else s.batch_size
        norm = "l2" if threat.norm is Norm.L2 else "linf"
        inner = d.inner_model()
        through = f"surrogate {d.surrogate!r}" if d.surrogate is not None else "BPDA model"
        settings: dict[str, Any]
        fn: ChunkFn
        if attack == "pgd":
            cfg = PGDConfig(steps=s.pgd_steps, restarts=s.pgd_restarts, random_start=True)
            fn = self._pgd_fn(d, draws, threat, d.classifier if d.classifier is not None else d.model, cfg)
            settings = {
                "steps": s.pgd_steps, "restarts": s.pgd_restarts, "step_size": f"2.5 eps / {s.pgd_steps}",
                "gradient": "bare classifier (transfer)" if d.classifier is not None else "model autograd",
            }  # fmt: skip
        elif attack in ("bpda-pgd", "bpda-eot-pgd"):
            eot = s.eot_samples if attack == "bpda-eot-pgd" else 1
            fn = self._pgd_fn(
                d, draws, threat, inner, PGDConfig(steps=s.bpda_steps, random_start=True, eot_samples=eot)
            )
            settings = {"steps": s.bpda_steps, "eot_samples": eot, "step_size": f"2.5 eps / {s.bpda_steps}",
                        "through": through}  # fmt: skip
        elif attack == "surrogate-pgd":
            fn = self._surrogates_fn(d, draws, threat, randomized)
            settings = {"steps": s.bpda_steps, "surrogates": list(d.surrogates), "eot_samples": s.eot_samples,
                        "eot_on": "randomized surrogates"}  # fmt: skip
        elif attack == "unrolled-pgd":
            assert d.unrolled_model is not None
            fn = self._pgd_fn(
                d, draws, threat, d.unrolled_model, PGDConfig(steps=s.unrolled_steps, random_start=True)
            )
            settings = {"steps": s.unrolled_steps, "points": "all" if s.unrolled_n is None else s.unrolled_n,
                        "chunk": s.unrolled_batch,
                "through": f"unrolled model ({_schedule(d.unrolled_model)})", "step_size": f"2.5 eps / {s.unrolled_steps}"}  # fmt: skip
        elif attack == "real-bpda-eot":
            eot = s.eot_samples if randomized else 1
            model = d.bpda_model if d.bpda_model is not None else d.model
            fn = self._pgd_fn(
                d, draws, threat, model, PGDConfig(steps=s.final_steps, random_start=True, eot_samples=eot)
            )
            settings = {"steps": s.final_steps, "eot_samples": eot, "through": "real BPDA model"}
        elif attack == "apgd":
            kwargs = {
                "steps": s.apgd_steps,
                "n_restarts": 1,
                "loss": "ce",
                "eot_iter": s.eot_samples if randomized else 1,
            }
            fn = self._adapter_fn(d, draws, threat, "APGD", inner, kwargs)
            settings = {**kwargs, "through": through if inner is not d.model else "model", "norm": norm}
        elif attack == "square":
            kwargs = {"n_queries": s.square_queries, "n_restarts": 1, "p_init": 0.8}
            queried = d.surrogates[d.surrogate] if d.surrogate is not None else d.model
            fn = self._adapter_fn(d, draws, threat, "Square", queried, kwargs)
            settings = {**kwargs, "norm": norm, "queries_to": through if d.surrogate is not None else "model"}
        else:
            fn = self._latent_fn(d, draws, threat, attack)
            settings = {
                "budget_l2": self._latent_budget(attack, threat),
                "steps": s.latent_steps if attack == "onmanifold" else s.op_steps,
                "step_size": s.latent_step_size if attack == "onmanifold" else s.op_step_size,
                "candidate": "projected onto the threat ball around x",
            }
            if attack == "overpowered":
                settings |= {"multiplier_init": s.op_multiplier_init, "temperature": s.op_temperature}
        parts = self._chunks(key, d, idx, size, fn)
        record = self._stage_record(idx, parts, start)
        record["settings"] = settings
        self._finish(key, record)

    def _stage_record(self, idx: Tensor, parts: dict[str, Tensor], start: float) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "status": "ran",
            "indices": idx.clone(),
            "seconds": time.perf_counter() - start,
        }
        if not parts:
            rec.update(robust=torch.zeros(0, dtype=torch.bool), first_ok=torch.zeros(0, dtype=torch.bool))
            rec["audit"] = {"max_distance": 0.0, "nan": 0, "min": None, "max": None}
            return rec
        x_adv = parts["x_adv"]
        broken = ~parts["robust"]
        rec["robust"] = parts["robust"]
        rec["first_ok"] = parts["first_ok"]
        rec["broken_x_adv"] = x_adv[broken].clone()
        for k in (
            *st.COST_PARTS,
            "surrogate_broken",
            "found",
            "eligible",
            "found_step",
            "pixel_distance",
            "pred_adv",
            "start_correct",
        ):
            if k in parts:
                rec[k] = parts[k]
        names = [k.split("|", 1)[1] for k in parts if k.startswith("tried|")]
        if names:
            rec["per_surrogate"] = {
                m: {part: parts[f"{part}|{m}"] for part in ("tried", "fooled", "real")} for m in names
            }
        if "candidate" in parts:  # on-manifold pairs G(z) | G(z') the classifier gets wrong (for the grid)
            hits = parts["found"].nonzero().squeeze(1)
            hits = hits[parts["pixel_distance"][hits].argsort()][: self.s.grid_examples]
            rec["pairs"] = {"positions": hits, "x0": parts["x0"][hits], "x_adv": parts["candidate"][hits]}
        finite = x_adv[torch.isfinite(x_adv)]
        rec["audit"] = {
            "max_distance": float(torch.nan_to_num(parts["distance"], nan=float("inf")).max()),
            "nan": int(torch.isnan(x_adv).sum()),
            "min": float(finite.min()) if finite.numel() else None,
            "max": float(finite.max()) if finite.numel() else None,
        }
        return rec

    def _latents_for(self, chunk: Tensor) -> Tensor:
        missing = [int(i) for i in chunk if int(i) not in self.latents]
        if missing:
            assert self.generator is not None
            cfg = (
                self.latent_config
                if self.latent_config is not None
                else InversionConfig.defense_gan(seed=self.s.seed)
            )
            enc = self.encoder if cfg.init == "encoder" else None
            z, _ = evaluation.invert_latents(
                self.generator, self.x[missing], cfg, encoder=enc, batch_size=len(missing)
            )
            for i, zi in zip(missing, z, strict=True):
                self.latents[i] = zi.detach()
        return torch.stack([self.latents[int(i)] for i in chunk])
