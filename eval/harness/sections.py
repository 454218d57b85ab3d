"""The stages of the harness that are not attacks of the cascade: the ``projection`` figures of a preprocessing
defense (defended clean), the accuracy-vs-eps ``curve`` stages and the ``examples`` grids. A mixin of
:class:`eval.harness.stages.Runner`, which provides the plumbing declared here."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attacks import PGDConfig, ThreatModel
from attacks.base import predict
from eval.harness import state as st
from eval.harness.defenses import Defense
from eval.harness.settings import RobustnessSettings, threat_key

__all__ = ["ChunkFn", "SectionStages"]

ChunkFn = Callable[[Tensor], dict[str, Tensor]]


class SectionStages:
    """Projection, curve and example stages (see module docs)."""

    s: RobustnessSettings
    x: Tensor
    y: Tensor
    state: dict[str, Any]

    def _chunks(self, key: str, d: Defense, idx: Tensor, size: int, fn: ChunkFn) -> dict[str, Tensor]:
        raise NotImplementedError

    def _finish(self, key: str, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def _pgd_fn(
        self, d: Defense, draws: int, threat: ThreatModel, model: nn.Module, config: PGDConfig
    ) -> ChunkFn:
        raise NotImplementedError

    def _stage_record(self, idx: Tensor, parts: dict[str, Tensor], start: float) -> dict[str, Any]:
        raise NotImplementedError

    def _projection(self, d: Defense, n_d: int) -> None:
        """Defended-clean figures of a preprocessing defense: the deterministic ``preprocess`` of every clean
        point, its per-pixel MSE, generator passes per image (when the module reports them) and the classifier's
        accuracy on the projections."""
        key = f"{d.name}|projection"
        if key in self.state["stages"]:
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
        key = f"{d.name}|curve|{threat_key(threat)}"
        if key in self.state["stages"]:
            return
        start = time.perf_counter()
        eot = self.s.curve_eot if draws > 1 else 1
        model = d.inner_model()
        fn = self._pgd_fn(
            d, draws, threat, model, PGDConfig(steps=self.s.curve_steps, random_start=True, eot_samples=eot)
        )
        idx = clean.nonzero().squeeze(1)
        rec = self._stage_record(idx, self._chunks(key, d, idx, self.s.batch_size, fn), start)
        rec.pop("broken_x_adv", None)
        rec["settings"] = {
            "attack": "bpda-pgd" if (d.bpda_model is not None or d.surrogate is not None) else "pgd",
            "steps": self.s.curve_steps,
            "eot_samples": eot,
            "through": f"surrogate {d.surrogate!r}" if d.surrogate is not None else "model",
        }
        self._finish(key, rec)

    def _examples(self, d: Defense, threat: ThreatModel) -> None:
        key = f"{d.name}|{threat_key(threat)}|examples"
        if key in self.state["stages"]:
            return
        shown_idx: list[int] = []
        shown_adv: list[Tensor] = []
        shown_by: list[str] = []
        for attack in self.s.attacks[1:]:
            rec = self.state["stages"][f"{d.name}|{threat_key(threat)}|{attack}"]
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
