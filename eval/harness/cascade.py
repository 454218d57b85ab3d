"""The built-in stages of the attack cascade, one class each, registered in cascade order (:data:`ATTACKS`).

The one attack loop is :class:`attacks.PGD` (with the torchattacks / latent / overpowered attacks of
:mod:`attacks`); a stage only chooses which model the attack runs through (its *inner model*: the bare classifier
for the naive ``pgd``, the BPDA model, the unrolled model, or a surrogate of the defense) and its settings. The
verdict is always the real defense's (:meth:`eval.harness.registry.StageEnv.judge`); when the inner model is not
the real defense, the stage also records per point whether the inner model itself was fooled
(``surrogate_broken``), so the report can say how many of those successes transferred. The latent stages are in
:mod:`eval.harness.latent_stages`, the AutoAttack stages ``apgd-t`` and ``fab`` (and the torchattacks chunk runner)
in :mod:`eval.harness.autoattack_stages`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attacks import PGDConfig
from eval.harness import flags
from eval.harness.autoattack_stages import APGDT, FAB, adapter_chunks, norm_name, plain, real_model, through
from eval.harness.latent_stages import OnManifold, Overpowered, attack_seed
from eval.harness.registry import ChunkFn, Stage, StageEnv, StageView, register_stage, registered_stages
from manifold_defense import evaluation
from manifold_defense.defense import LatentProjector

__all__ = ["ATTACKS", "BPDA_STAGES", "CLEAN_DOC", "PGD_STAGE", "pgd_chunks"]


def _step(config: PGDConfig) -> str:
    return f"2.5 eps / {config.steps}" if config.step_size is None else f"{config.step_size:g}"


def pgd_chunks(env: StageEnv, model: nn.Module, config: PGDConfig) -> ChunkFn:
    """PGD with ``config`` through ``model`` on a chunk; the verdict is the real defense's (module docs).

    The early exit (``config.stop_when_fooled``, the lean cascade's) applies only when ``model`` is the real
    defense: through a stand-in, the first iterate that fools it may be too weak to transfer, so every step runs.
    """
    real = real_model(env, model)
    config = dataclasses.replace(config, stop_when_fooled=_exit_after(env, model, config))

    def fn(chunk: Tensor) -> dict[str, Tensor]:
        xb, yb = env.x[chunk], env.y[chunk]
        cfg = dataclasses.replace(config, seed=attack_seed())
        res = evaluation.evaluate_pgd(model, xb, yb, env.threat, cfg, draws=1, batch_size=len(chunk))
        x_adv = res.x_adv.to(xb.device)
        if real:
            return env.judge(chunk, x_adv, res.robust)
        out = env.judge(chunk, x_adv)
        out["surrogate_broken"] = ~res.robust
        return out

    return fn


def _exit_after(env: StageEnv, model: nn.Module, config: PGDConfig) -> int:
    """The early exit as a stage through ``model`` runs it: ``config.stop_when_fooled`` through the real defense,
    0 through a stand-in (:func:`pgd_chunks`)."""
    return config.stop_when_fooled if real_model(env, model) else 0


def _early(env: StageEnv, model: nn.Module, config: PGDConfig) -> dict[str, Any]:
    """The early-exit setting as the stage runs it (recorded only when on)."""
    k = _exit_after(env, model, config)
    return {"early_exit": f"after {k} fooled steps"} if k else {}


def _no_bpda(env: StageEnv) -> str | None:
    if env.defense.bpda_model is None and env.defense.surrogate is None:
        return "no preprocessing: BPDA equals the plain gradient (pgd)"
    return None


class NaivePGD(Stage):
    name = "pgd"
    doc = (
        "naive white-box PGD: the model's own gradient; for a preprocessing defense the bare classifier's "
        "gradient (projection ignored), examples transferred to the defended model"
    )
    gradient = True

    def config(self, env: StageEnv) -> PGDConfig:
        return env.settings.pgd

    def white_box(self, env: StageEnv) -> bool:
        return env.defense.classifier is None  # else a transfer from the bare classifier, not white box

    def chunk_fn(self, env: StageEnv, config: PGDConfig) -> ChunkFn:
        d = env.defense
        return pgd_chunks(env, d.classifier if d.classifier is not None else d.model, config)

    def describe(self, env: StageEnv, config: PGDConfig) -> dict[str, Any]:
        d = env.defense
        gradient = "bare classifier (transfer)" if d.classifier is not None else "model autograd"
        return {
            "steps": config.steps,
            "restarts": config.restarts,
            "step_size": _step(config),
            "gradient": gradient,
            **_early(env, d.classifier if d.classifier is not None else d.model, config),
        }


class BPDAPGD(Stage):
    name = "bpda-pgd"
    doc = (
        "PGD through the defense, BPDA (identity backward through the projection); inner loop on the "
        "defense's surrogate when it names one"
    )
    gradient = True

    def config(self, env: StageEnv) -> PGDConfig:
        return dataclasses.replace(env.settings.bpda, eot_samples=1)

    def skip_reason(self, env: StageEnv) -> str | None:
        return _no_bpda(env)

    def chunk_fn(self, env: StageEnv, config: PGDConfig) -> ChunkFn:
        return pgd_chunks(env, env.defense.inner_model(), config)

    def describe(self, env: StageEnv, config: PGDConfig) -> dict[str, Any]:
        return {"steps": config.steps, "eot_samples": config.eot_samples, "step_size": _step(config),
                "through": through(env), **_early(env, env.defense.inner_model(), config)}  # fmt: skip

    def on_surrogate(self, env: StageEnv) -> bool:
        return env.defense.surrogate is not None


class BPDAEOTPGD(BPDAPGD):
    name = "bpda-eot-pgd"
    doc = (
        "BPDA + EOT (gradients averaged over eot_samples fresh projections); randomized defenses only; "
        "inner loop on the surrogate when named"
    )

    def config(self, env: StageEnv) -> PGDConfig:
        return env.settings.bpda

    def skip_reason(self, env: StageEnv) -> str | None:
        reason = _no_bpda(env)
        if reason is None and not env.randomized:
            return "deterministic defense: EOT equals bpda-pgd"
        return reason


class SurrogatePGD(Stage):
    name = "surrogate-pgd"
    doc = (
        "PGD (EOT on randomized surrogates) through each surrogate the defense names in turn (e.g. "
        "the differentiable G(E(x))); verdicts on the real defense"
    )
    gradient = True

    def config(self, env: StageEnv) -> PGDConfig:
        return env.settings.bpda

    def skip_reason(self, env: StageEnv) -> str | None:
        return None if env.defense.surrogates else "the defense names no surrogate"

    def describe(self, env: StageEnv, config: PGDConfig) -> dict[str, Any]:
        return {"steps": config.steps, "surrogates": list(env.defense.surrogates),
                "eot_samples": config.eot_samples, "eot_on": "randomized surrogates"}  # fmt: skip

    def chunk_fn(self, env: StageEnv, config: PGDConfig) -> ChunkFn:
        """PGD through each surrogate in turn, on the points of the chunk no earlier surrogate broke."""
        d = env.defense

        def fn(chunk: Tensor) -> dict[str, Tensor]:
            n = len(chunk)
            no = torch.zeros(n, dtype=torch.bool)
            out = {"robust": ~no, "first_ok": ~no, "x_adv": env.x[chunk].clone(), "distance": torch.zeros(n),
                   "surrogate_broken": no.clone()}  # fmt: skip
            for name in d.surrogates:  # per surrogate: attacked, fooled itself, fooled the real defense
                out |= {f"tried|{name}": no.clone(), f"fooled|{name}": no.clone(), f"real|{name}": no.clone()}
            for name, module in d.surrogates.items():
                todo = out["robust"].nonzero().squeeze(1)
                if not len(todo):
                    break
                eot = config.eot_samples if env.surrogate_randomized.get(name, env.randomized) else 1
                part = pgd_chunks(env, module, dataclasses.replace(config, eot_samples=eot))(chunk[todo])
                fooled = part.pop("surrogate_broken").cpu()
                for k, v in part.items():
                    if k not in out:  # votes (the majority setting): every point of the chunk gets one
                        out[k] = torch.full((n, *v.shape[1:]), env.draws, dtype=v.dtype, device=v.device)
                    out[k][todo.to(out[k].device)] = v.to(out[k].device, out[k].dtype)
                out["surrogate_broken"][todo] |= fooled
                out[f"tried|{name}"][todo] = True
                out[f"fooled|{name}"][todo] = fooled
                out[f"real|{name}"][todo] = ~part["robust"].cpu()
            return out

        return fn

    def record_parts(self, env: StageEnv, parts: Mapping[str, Tensor]) -> dict[str, Any]:
        per = {m: {p: parts[f"{p}|{m}"] for p in ("tried", "fooled", "real")} for m in env.defense.surrogates}
        return {"per_surrogate": per}


class UnrolledPGD(Stage):
    name = "unrolled-pgd"
    doc = (
        "PGD back-propagating through every projection step, on the points that survived pgd "
        "(the first unrolled_n, or all; BPDA-broken ones included, for the BPDA-vs-unrolled comparison)"
    )
    gradient = True

    def config(self, env: StageEnv) -> PGDConfig:
        return env.settings.unrolled

    def skip_reason(self, env: StageEnv) -> str | None:
        return None if env.defense.unrolled_model is not None else "no preprocessing to unroll"

    def points(self, env: StageEnv) -> Tensor:
        idx = env.after_pgd.nonzero().squeeze(1)
        cap = env.settings.unrolled_n
        return idx[:cap] if cap is not None else idx

    def chunk_size(self, env: StageEnv) -> int:
        return int(env.settings.unrolled_batch)

    def chunk_fn(self, env: StageEnv, config: PGDConfig) -> ChunkFn:
        assert env.defense.unrolled_model is not None
        return pgd_chunks(env, env.defense.unrolled_model, config)

    def describe(self, env: StageEnv, config: PGDConfig) -> dict[str, Any]:
        s, model = env.settings, env.defense.unrolled_model
        assert model is not None
        schedule = next((m.extra_repr() for m in model.modules() if isinstance(m, LatentProjector)), None)
        if schedule is not None:  # the chunk runner reseeds the projector per chunk: its current seed is a leftover
            schedule = re.sub(r"seed=\d+", "seed=per chunk", schedule)
        return {"steps": config.steps, "points": "all" if s.unrolled_n is None else s.unrolled_n,
                "chunk": s.unrolled_batch, "step_size": _step(config),
                "through": f"unrolled model ({schedule or type(model).__name__})"}  # fmt: skip

    def report(self, view: StageView) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        idx = view.rec["indices"]
        if not len(idx):
            return {}, []
        bpda = [(a, view.other(a)) for a in BPDA_STAGES]
        return {"compare": flags.bpda_unrolled_compare(idx, view.rec["robust"], bpda)}, []


class APGD(Stage):
    name = "apgd"
    doc = (
        "torchattacks APGD (CE, EOT iterations on randomized defenses) through the BPDA model (or surrogate)"
    )
    gradient = True

    def config(self, env: StageEnv) -> Any:
        apgd = env.settings.apgd
        return dataclasses.replace(apgd, eot_samples=apgd.eot_samples if env.randomized else 1)

    def chunk_fn(self, env: StageEnv, config: Any) -> ChunkFn:
        return adapter_chunks(env, "APGD", env.defense.inner_model(), config.kwargs())

    def describe(self, env: StageEnv, config: Any) -> dict[str, Any]:
        return {**config.kwargs(), "through": through(env), "norm": norm_name(env)}

    def on_surrogate(self, env: StageEnv) -> bool:
        return env.defense.surrogate is not None


class Square(Stage):
    name = "square"
    doc = (
        "torchattacks Square, black box (queries to the defended model, or to its surrogate; AutoAttack's 5000 "
        "queries on a plain model)"
    )

    def config(self, env: StageEnv) -> Any:
        s = env.settings.square
        queries = s.plain_queries if plain(env) else s.queries
        return dataclasses.replace(s, queries=queries, plain_queries=queries)

    @staticmethod
    def _stand_in(env: StageEnv, config: Any) -> tuple[str, nn.Module] | None:
        return env.defense.query_stand_in if config.queries_to == "stand-in" else None

    def chunk_fn(self, env: StageEnv, config: Any) -> ChunkFn:
        d, stand_in = env.defense, self._stand_in(env, config)
        queried = d.surrogates[d.surrogate] if d.surrogate is not None else d.model
        return adapter_chunks(env, "Square", stand_in[1] if stand_in else queried, config.kwargs())

    def describe(self, env: StageEnv, config: Any) -> dict[str, Any]:
        stand_in = self._stand_in(env, config)
        to = through(env) if env.defense.surrogate is not None else "model"
        return {**config.kwargs(), "norm": norm_name(env),
                "queries_to": f"stand-in {stand_in[0]!r}" if stand_in else to}  # fmt: skip

    def on_surrogate(self, env: StageEnv) -> bool:
        return env.defense.surrogate is not None or self._stand_in(env, self.config(env)) is not None


class RealBPDAEOT(Stage):
    name = "real-bpda-eot"
    doc = (
        "a final round of BPDA + EOT with real forward passes on every point still robust; only for "
        "defenses with surrogates (the points the surrogate attacks left)"
    )
    gradient = True

    def config(self, env: StageEnv) -> PGDConfig:
        final = env.settings.final
        return dataclasses.replace(final, eot_samples=final.eot_samples if env.randomized else 1)

    def skip_reason(self, env: StageEnv) -> str | None:
        return (
            None if env.defense.surrogates else "no surrogate: every attack already ran on the real defense"
        )

    def points(self, env: StageEnv) -> Tensor:
        return env.survivors.nonzero().squeeze(1)  # the survivors, in either mode

    def chunk_fn(self, env: StageEnv, config: PGDConfig) -> ChunkFn:
        d = env.defense
        return pgd_chunks(env, d.bpda_model if d.bpda_model is not None else d.model, config)

    def describe(self, env: StageEnv, config: PGDConfig) -> dict[str, Any]:
        d = env.defense
        model = d.bpda_model if d.bpda_model is not None else d.model
        return {"steps": config.steps, "eot_samples": config.eot_samples, "through": "real BPDA model",
                **_early(env, model, config)}  # fmt: skip

    def report(self, view: StageView) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        tol = view.settings.thresholds.blackbox
        return {}, [flags.real_bpda_eot_broke(view.threat, view.newly, view.n, tol, view.surrogate_inner)]


for _cls in (NaivePGD, BPDAPGD, BPDAEOTPGD, SurrogatePGD, UnrolledPGD, APGD, APGDT, FAB, Square, OnManifold,
             Overpowered, RealBPDAEOT):  # fmt: skip
    register_stage(_cls)

#: What the ``clean`` column is (it runs first, before every stage of the cascade).
CLEAN_DOC = "no attack; worst case over `draws` forward passes of a randomized defense"
#: The built-in cascade, in the order it runs (``"clean"`` first: accuracy without attack).
ATTACKS: tuple[str, ...] = ("clean", *registered_stages())
#: The naive stage whose survivors the unrolled attack attacks (the BPDA-vs-unrolled comparison).
PGD_STAGE = NaivePGD.name
#: The BPDA stages the unrolled attack is compared with (``bpda-unrolled-gap``).
BPDA_STAGES = (BPDAPGD.name, BPDAEOTPGD.name)
