"""The runner of the harness: per defense ``info`` (randomness, gradient check), ``clean``, ``projection``, the
attack cascade of each threat (the registered stages, :mod:`eval.harness.registry`), the accuracy-vs-eps curves,
the example grids and, after every defense, the convergence rerun of each threat. Every stage runs its points
through the chunk runner (:func:`eval.harness.state.run_chunks`: per-chunk seeds, resume, ``torchrun``) and saves
its per-point results in the state, keyed by its :class:`~eval.harness.registry.StageKey`.

Verdicts: a point is robust after a stage when ``defense.model`` labels its candidate correctly in each of
``draws`` fresh forward passes (and in the attack's own final pass when that pass was the real defense's).

Convergence: after the cascade, the strongest white-box stage of each threat (the gradient stage through the
defense that broke the most points; ties: the later one; the naive ``pgd`` of a preprocessing defense transfers
from the bare classifier and is no candidate) runs again on the points still robust, with twice its steps (and twice its EOT
samples on a randomized defense), through the same chunk runner; what it breaks counts in the worst case
(:func:`strongest_stage`; the ``not-converged`` flag: :mod:`eval.harness.flags`). With ``convergence_rounds`` K > 1
this is a ladder: while a rerun newly breaks more than the tolerance, the next runs the same stage with twice the
steps again (``2**k`` times the original's at rerun ``k``, stage ``convergence-k``) on what is left, up to K reruns.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attacks import ThreatModel, per_sample_norm
from eval.harness import state as st
from eval.harness.cascade import PGD_STAGE
from eval.harness.defenses import Defense
from eval.harness.registry import (
    ChunkFn,
    Stage,
    StageEnv,
    StageKey,
    convergence_key,
    stage,
    stage_keys,
)
from eval.harness.sections import SectionStages
from eval.harness.settings import RobustnessSettings, parse_threat, threat_key
from manifold_defense import evaluation
from manifold_defense.inversion import InversionConfig
from manifold_defense.progress import progress as progress_display
from manifold_defense.training.distributed import DistContext

__all__ = ["Runner", "strongest_stage"]


def strongest_stage(
    attacks: Sequence[str], record: Callable[[str], Mapping[str, Any] | None], env: StageEnv
) -> str | None:
    """The white-box gradient stage on ``env.defense`` (:meth:`Stage.white_box`) among ``attacks`` that broke the
    most points of those it attacked (ties: the later one), from each stage's saved ``record(name)``; ``None`` when
    none ran."""
    best: tuple[int, int, str] | None = None
    for order, name in enumerate(attacks):
        rec = record(name)
        if not stage(name).white_box(env) or rec is None or rec.get("status") != "ran":
            continue
        candidate = (int((~rec["robust"]).sum()), order, name)
        best = candidate if best is None or candidate[:2] > best[:2] else best
    return None if best is None else best[2]


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
        self.persist = True  # False: a --report-partial pass (placeholders must never reach state.pt)
        # Latents of the points, kept in the state so that a resumed run reuses the very latents the
        # interrupted one computed (a later stage would otherwise invert them in another batch composition).
        self.latents: dict[int, Tensor] = state.setdefault("latents", {})
        state.setdefault("partial", {})
        self.after: dict[tuple[str, str], StageEnv] = {}  # each cascade's end, for its convergence rerun
        keys = [k for d in defenses for k in stage_keys(settings, d.name, d.preprocess is not None)]
        counted = [k for k in keys if k.attack != "info"]
        self.bar = progress_display(
            total=len(counted), desc="robustness", disable=not (progress and ctx.is_main), unit="stage"
        )
        self.bar.update(sum(1 for k in counted if k.text in state["stages"]))

    # ---------------------------------------------------------------------------------------- plumbing
    def _save(self) -> None:
        if self.ctx.is_main and self.persist:
            st.save_state(self.state, self.out)

    def _finish(self, key: StageKey, record: dict[str, Any]) -> None:
        # the per-point cost entries of run_chunks become stage totals (resumed chunks included)
        for part, total in (("chunk_seconds", "process_seconds"), ("real_rows", "real_passes")):
            if part in record:
                record[total] = float(record.pop(part).sum())
        self.state["stages"][key.text] = record
        self.state["partial"].pop(key.text, None)
        self._save()
        self.bar.update(1)
        if self.on_stage is not None:
            self.on_stage(key.text)

    def _chunks(self, key: StageKey, d: Defense, idx: Tensor, size: int, fn: ChunkFn) -> dict[str, Tensor]:
        if not len(idx):
            return {}
        return st.run_chunks(
            self.state, key.text, d, idx, size, fn, seed=self.s.seed, ctx=self.ctx, device=self.x.device,
            save=self._save, on_chunk=self.bar.set_postfix_str,
        )  # fmt: skip

    def _verdict(
        self, d: Defense, draws: int, x_adv: Tensor, y: Tensor, base_ok: Tensor
    ) -> dict[str, Tensor]:
        """``robust``, ``first_ok`` (on CPU): correct in ``base_ok`` and every one of ``draws`` fresh passes of the
        real model; and after the first pass only. A point already wrong is not passed again (its verdict is
        decided), which saves forward passes of an expensive defense and changes no verdict. With the
        ``majority`` setting and ``draws > 1`` every point passes every draw and ``votes`` counts the correct
        ones (the majority-vote verdict; ``base_ok`` does not enter it)."""
        name = f"model of defense {d.name!r}"
        robust = base_ok.cpu().clone()
        first = robust.clone()
        votes = torch.zeros(len(robust), dtype=torch.int64) if self.s.majority and draws > 1 else None
        for k in range(draws):
            todo = robust.nonzero().squeeze(1) if votes is None else torch.arange(len(robust))
            if not len(todo):
                break
            dev = todo.to(x_adv.device)
            ok = evaluation.correct_in_every_draw(
                d.model, x_adv[dev], y[dev], 1, max(1, len(todo)), name=name
            )
            robust[todo] &= ok
            if votes is not None:
                votes[todo] += ok.long()
            if k == 0:
                first = robust.clone()
        out = {"robust": robust, "first_ok": first}
        return out if votes is None else out | {"votes": votes}

    def _judge(
        self,
        d: Defense,
        draws: int,
        threat: ThreatModel,
        chunk: Tensor,
        x_adv: Tensor,
        base_ok: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The real defense's verdict on ``x_adv`` of the points ``chunk`` (:meth:`StageEnv.judge`)."""
        xb, yb = self.x[chunk], self.y[chunk]
        base = torch.ones(len(chunk), dtype=torch.bool) if base_ok is None else base_ok
        verdict = self._verdict(d, draws, x_adv, yb, base)
        dist_ = per_sample_norm((x_adv - xb).double(), threat.norm).float()
        return verdict | {"x_adv": x_adv, "distance": dist_}

    def _env(
        self, d: Defense, draws: int, threat: ThreatModel, pool: Tensor, survivors: Tensor, after_pgd: Tensor
    ) -> StageEnv:
        info = self.state["stages"][StageKey(d.name, None, "info").text]
        return StageEnv(
            settings=self.s, defense=d, threat=threat, x=self.x, y=self.y, draws=draws,
            randomized=draws > 1 or bool(info["randomized"]), pool=pool.clone(), survivors=survivors.clone(),
            after_pgd=after_pgd.clone(), generator=self.generator,
            surrogate_randomized=dict(info.get("surrogates", {}).get("randomized", {})),
            judge=functools.partial(self._judge, d, draws, threat), latents=self._latents_for,
        )  # fmt: skip

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
            for tk in self._curve_threats():
                self._curve(d, draws, parse_threat(tk), clean)
            for t in self.s.threats:
                self._examples(d, parse_threat(t))
        for d in self.defenses:
            for t in self.s.threats:
                self._convergence(d, t)
        self.bar.close()

    def _clean(self, d: Defense, n_d: int, draws: int) -> Tensor:
        key = StageKey(d.name, None, "clean")
        if key.text not in self.state["stages"]:
            start = time.perf_counter()
            idx = torch.arange(n_d)

            def fn(chunk: Tensor) -> dict[str, Tensor]:
                ones = torch.ones(len(chunk), dtype=torch.bool)
                return self._verdict(d, draws, self.x[chunk], self.y[chunk], ones)

            parts = self._chunks(key, d, idx, self.s.batch_size, fn)
            self._finish(
                key, {"status": "ran", "indices": idx, **parts, "seconds": time.perf_counter() - start}
            )
        return self.state["stages"][key.text]["robust"].clone()

    # ------------------------------------------------------------------------------------------ cascade
    def _cascade(self, d: Defense, draws: int, threat: ThreatModel, clean: Tensor) -> None:
        """Run (or read back) every stage of the cascade under ``threat``; keep its end for the rerun."""
        tk = threat_key(threat)
        robust, after_pgd = clean.clone(), clean.clone()
        for name in self.s.attacks[1:]:
            key = StageKey(d.name, tk, name)
            if key.text not in self.state["stages"]:
                pool = robust if self.s.cascade else clean
                env = self._env(d, draws, threat, pool, robust, after_pgd if self.s.cascade else clean)
                self._run_stage(key, stage(name), env)
            rec = self.state["stages"][key.text]
            if rec["status"] == "ran" and len(rec["indices"]):
                robust[rec["indices"]] &= rec["robust"]
            if name == PGD_STAGE:
                after_pgd = robust.clone()
        self.after[(d.name, tk)] = self._env(d, draws, threat, robust, robust, robust)

    def _run_stage(self, key: StageKey, stg: Stage, env: StageEnv) -> None:
        reason = stg.skip_reason(env)
        if reason is not None:
            self._finish(key, {"status": "skipped", "reason": reason})
            return
        config = stg.config(env)
        self._attack(key, stg, env, config, stg.points(env))

    def _attack(
        self,
        key: StageKey,
        stg: Stage,
        env: StageEnv,
        config: Any,
        idx: Tensor,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Run ``stg`` with ``config`` on the points ``idx`` chunk by chunk and save its record under ``key``."""
        start = time.perf_counter()
        described = stg.describe(env, config)  # before the chunks reseed the defense's modules
        parts = self._chunks(key, env.defense, idx, stg.chunk_size(env), stg.chunk_fn(env, config))
        record = self._stage_record(idx, parts, start)
        if parts:
            record |= stg.record_parts(env, parts)
        record |= {"settings": described, "on_surrogate": stg.on_surrogate(env), **(extra or {})}
        self._finish(key, record)

    def _convergence(self, d: Defense, tk: str) -> None:
        """The convergence ladder of ``tk`` (module docs): rerun ``k`` of the strongest white-box stage with
        ``2**k`` times its steps on the points every earlier stage and rerun left, until a rerun newly breaks at
        most ``thresholds.not_converged`` of the points or ``convergence_rounds`` reruns ran. Reruns the state
        already holds are read back (also beyond ``convergence_rounds``: they ran, and count)."""
        first = convergence_key(d.name, tk, 1)
        if first.text not in self.state["stages"] and not self.s.convergence:
            self._finish(
                first, {"status": "skipped", "reason": "turned off (quick protocol: convergence=False)"}
            )
            return
        env = self.after[(d.name, tk)]
        robust = env.survivors.clone()
        n = int(self.state["stages"][StageKey(d.name, None, "info").text]["n"])
        tol = self.s.thresholds.not_converged * n + 1e-9
        choice: str | None = None
        k = 1
        while True:
            key = convergence_key(d.name, tk, k)
            if key.text not in self.state["stages"]:
                if k > self.s.convergence_rounds:
                    return
                rung = dataclasses.replace(env, survivors=robust.clone()).rerun()
                if k == 1:
                    choice = strongest_stage(
                        self.s.attacks[1:],
                        lambda a: self.state["stages"].get(StageKey(d.name, tk, a).text),
                        rung,
                    )
                if choice is None:
                    self._finish(key, {"status": "skipped", "reason": "no white-box gradient stage ran"})
                    return
                stg = stage(choice)
                original = stg.config(rung)
                config = original
                for _ in range(k):
                    config = stg.stronger(rung, config)
                extra = {"rerun_of": choice, "round": k, "original": stg.describe(rung, original)}
                self._attack(key, stg, rung, config, stg.points(rung), extra)
            rec = self.state["stages"][key.text]
            if rec["status"] != "ran":
                return
            choice = str(rec["rerun_of"])
            before = robust.clone()
            if len(rec["indices"]):
                robust[rec["indices"]] &= rec["robust"].to(robust.device)
            if int((before & ~robust).sum()) <= tol:
                return
            k += 1

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
        rec["robust"] = parts["robust"]
        rec["first_ok"] = parts["first_ok"]
        rec["broken_x_adv"] = x_adv[~parts["robust"]].clone()
        for k in (*st.COST_PARTS, "surrogate_broken", "votes"):
            if k in parts:
                rec[k] = parts[k]
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
