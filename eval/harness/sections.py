"""The stages of the harness that are not attacks of the cascade: ``info`` (randomness, the red-flag gradient
check), the ``projection`` figures of a preprocessing defense (defended clean), the accuracy-vs-eps ``curve``
stages and the ``examples`` grids. A mixin of :class:`eval.harness.runner.Runner`, which provides the plumbing
declared here."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import Tensor, nn

from attacks import ThreatModel
from attacks.base import check_logits, predict
from eval.harness import state as st
from eval.harness.cascade import pgd_chunks
from eval.harness.defenses import Defense
from eval.harness.registry import ChunkFn, StageEnv, StageKey, curve_threats
from eval.harness.settings import RobustnessSettings, threat_key

__all__ = ["SectionStages", "input_gradient"]


def input_gradient(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The gradient of the summed cross-entropy of ``module(x)`` with respect to ``x`` (zeros where unused), for the
    red-flag gradient check; ``x`` is not modified. The only gradient the harness computes itself: every attack's
    gradients are computed by :mod:`attacks`."""
    x_req = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(module(x_req), y, reduction="sum")
        grads = torch.autograd.grad(loss, x_req, allow_unused=True)[0]
    return torch.zeros_like(x) if grads is None else grads.detach()


class SectionStages:
    """Projection, curve and example stages (see module docs)."""

    s: RobustnessSettings
    x: Tensor
    y: Tensor
    state: dict[str, Any]

    def _save(self) -> None:
        raise NotImplementedError

    def _chunks(self, key: StageKey, d: Defense, idx: Tensor, size: int, fn: ChunkFn) -> dict[str, Tensor]:
        raise NotImplementedError

    def _finish(self, key: StageKey, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def _env(
        self, d: Defense, draws: int, threat: ThreatModel, pool: Tensor, survivors: Tensor, after_pgd: Tensor
    ) -> StageEnv:
        raise NotImplementedError

    def _stage_record(self, idx: Tensor, parts: dict[str, Tensor], start: float) -> dict[str, Any]:
        raise NotImplementedError

    def _curve_threats(self) -> list[str]:
        return curve_threats(self.s)

    def _info(self, d: Defense, n_d: int) -> dict[str, Any]:
        key = StageKey(d.name, None, "info")
        if key.text in self.state["stages"]:
            return dict(self.state["stages"][key.text])
        x, y = self.x[: min(2, n_d)], self.y[: min(2, n_d)]
        with torch.no_grad(), st.seeded(self.s.seed, d, x.device):
            out1 = d.model(x)
            check_logits(out1, x.shape[0], y, f"model of defense {d.name!r}")
            out2 = d.model(x)
        others = [("classifier", None, d.classifier)] + [
            (f"surrogate {k!r}", k, m) for k, m in d.surrogates.items()
        ]
        surrogate_random: dict[str, bool] = {}
        for label, name, module in others:
            if module is None:
                continue
            with torch.no_grad(), st.seeded(self.s.seed, d, x.device):
                c = module(x)
                c2 = module(x) if name is not None else c
            check_logits(c, x.shape[0], y, f"{label} of defense {d.name!r}")
            if c.shape != out1.shape:
                raise ValueError(
                    f"expected the {label} of defense {d.name!r} to return logits like its model "
                    f"{tuple(out1.shape)}, got {tuple(c.shape)}"
                )
            if name is not None:
                surrogate_random[name] = not torch.equal(c, c2)
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
        self.state["stages"][key.text] = info
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

    def _projection(self, d: Defense, n_d: int) -> None:
        """Defended-clean figures of a preprocessing defense: the deterministic ``preprocess`` of every clean
        point, its per-pixel MSE, generator passes per image (when the module reports them) and the classifier's
        accuracy on the projections."""
        key = StageKey(d.name, None, "projection")
        if key.text in self.state["stages"]:
            return
        pre, clf = d.preprocess, d.classifier if d.classifier is not None else d.model
        assert pre is not None
        start = time.perf_counter()

        def fn(chunk: Tensor) -> dict[str, Tensor]:
            xb, yb = self.x[chunk], self.y[chunk]
            with torch.no_grad():
                xh = pre(xb)
                pred = predict(clf, xh, f"classifier of defense {d.name!r}", "on clean projections")
            mse = (xh - xb).pow(2).flatten(1).mean(1)
            evals = getattr(pre, "last_generator_evals", None)
            passes = evals.float() if isinstance(evals, Tensor) else torch.full((len(chunk),), float("nan"))
            return {"mse": mse, "correct": pred == yb, "passes": passes.reshape(-1)[: len(chunk)]}

        parts = self._chunks(key, d, torch.arange(n_d), self.s.batch_size, fn)
        self._finish(key, {"status": "ran", **parts, "seconds": time.perf_counter() - start})

    def _curve(self, d: Defense, draws: int, threat: ThreatModel, clean: Tensor) -> None:
        key = StageKey(d.name, threat_key(threat), "curve")
        if key.text in self.state["stages"]:
            return
        start = time.perf_counter()
        config = self.s.curve
        config = dataclasses.replace(config, eot_samples=config.eot_samples if draws > 1 else 1)
        fn = pgd_chunks(self._env(d, draws, threat, clean, clean, clean), d.inner_model(), config)
        idx = clean.nonzero().squeeze(1)
        rec = self._stage_record(idx, self._chunks(key, d, idx, self.s.batch_size, fn), start)
        rec.pop("broken_x_adv", None)
        rec["settings"] = {
            "attack": "bpda-pgd" if (d.bpda_model is not None or d.surrogate is not None) else "pgd",
            "steps": config.steps,
            "eot_samples": config.eot_samples,
            "through": f"surrogate {d.surrogate!r}" if d.surrogate is not None else "model",
        }
        self._finish(key, rec)

    def _examples(self, d: Defense, threat: ThreatModel) -> None:
        tk = threat_key(threat)
        key = StageKey(d.name, tk, "examples")
        if key.text in self.state["stages"]:
            return
        shown_idx: list[int] = []
        shown_adv: list[Tensor] = []
        shown_by: list[str] = []
        for attack in self.s.attacks[1:]:
            rec = self.state["stages"][StageKey(d.name, tk, attack).text]
            if rec["status"] != "ran" or "broken_x_adv" not in rec:
                continue
            broken = rec["indices"][~rec["robust"]]
            for i, xa in zip(broken.tolist(), rec["broken_x_adv"], strict=True):
                if i not in shown_idx and len(shown_idx) < self.s.grid_examples:
                    shown_idx.append(i)
                    shown_adv.append(xa)
                    shown_by.append(attack)
        record: dict[str, Any] = {
            "status": "ran",
            "indices": torch.tensor(shown_idx, dtype=torch.long),
            "attacks": shown_by,
            "labels": self.y[shown_idx].cpu() if shown_idx else torch.zeros(0, dtype=torch.long),
        }
        if shown_idx:
            x_adv = torch.stack(shown_adv)
            record["clean"] = self.x[shown_idx].cpu()
            record["x_adv"] = x_adv
            with torch.no_grad():
                adv_dev = x_adv.to(self.x.device)
                where = "on the example images"
                record["pred"] = predict(d.model, adv_dev, f"model of defense {d.name!r}", where).cpu()
                if d.preprocess is not None:
                    with st.seeded(self.s.seed, d, self.x.device):
                        record["projected"] = d.preprocess(adv_dev).cpu()
        self._finish(key, record)
