"""The causal controller (CausalGAN, Kocaoglu, Snyder, Dimakis, Vishwanath, ICLR 2018): one small generator per
node of a causal graph, sampled in topological order, each fed its parents' sampled values.

The paper trains its controller adversarially (a WGAN over the label vector, Gumbel-style relaxed outputs). Our
attributes are discrete with a few values, so each node's generator is a small network mapping its parents'
one-hot values to the logits of its conditional ``P(node | parents)``, trained by maximum likelihood on the
attribute labels (cross-entropy, one term per node), and sampled with the Gumbel-max trick
(``argmax(logits + Gumbel noise)``, the exact categorical draw the paper's Gumbel relaxation approximates).
Maximum likelihood has no adversarial instability, trains in seconds, and makes the controller's joint computable
exactly (:meth:`CausalController.joint`), so its label TVD has no sampling error.

Intervention ``do(X = x)`` fixes the node's value and skips its generator; its descendants use it, its ancestors
are sampled as before (so they keep their marginal). Conditioning is by rejection: controller samples are drawn
until enough satisfy the condition (as the paper's code does for its label conditioning).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from manifold_defense.causal.graph import CausalGraph, joint_table

__all__ = ["CausalController", "train_controller"]


class CausalController(nn.Module):
    """One generator per node of ``graph``: ``nodes[name](one-hot parents) -> logits`` of ``P(name | parents)``.

    Args:
        graph: a :class:`CausalGraph`, or its :meth:`~CausalGraph.spec` (JSON form, used by the zoo).
        hidden: hidden units of each node's two-layer network (a root node has a learned logit vector only).
    """

    def __init__(self, graph: CausalGraph | Mapping[str, Any], hidden: int = 32) -> None:
        super().__init__()
        self.graph = graph if isinstance(graph, CausalGraph) else CausalGraph.from_spec(graph)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"expected hidden to be a positive int, got {hidden!r}")
        self.nodes = nn.ModuleDict()
        self.roots = nn.ParameterDict()
        for name in self.graph.order:
            node = self.graph[name]
            width = sum(self.graph[p].cardinality for p in node.parents)
            if width == 0:
                self.roots[name] = nn.Parameter(torch.zeros(node.cardinality))
            else:
                self.nodes[name] = nn.Sequential(
                    nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, node.cardinality)
                )

    def _inputs(self, name: str, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [F.one_hot(values[p], self.graph[p].cardinality).float() for p in self.graph.parents(name)]
        return torch.cat(parts, dim=1)

    def logits(self, name: str, values: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        """Logits ``(n, k)`` of ``P(name | parents)`` for parent values in ``values`` (``{parent: (n,) long}``)."""
        if name in self.roots:
            return self.roots[name].unsqueeze(0).expand(n, -1)
        dev = next(self.parameters()).device
        return self.nodes[name](self._inputs(name, {k: v.to(dev) for k, v in values.items()}))

    def log_likelihood(self, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean log-likelihood per example of label rows ``(N, len(nodes))`` (columns in topological order),
        each row counted ``weights[i]`` times when given (distinct rows with their counts: the same value).
        Labels are checked as :meth:`CausalGraph.label_rows` checks them."""
        return self._log_likelihood(self.graph.label_rows(labels), weights)

    def _log_likelihood(self, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        values = {name: labels[:, i] for i, name in enumerate(self.graph.order)}
        n = labels.shape[0]
        dev = next(self.parameters()).device
        w = torch.ones(n, device=dev) if weights is None else weights.to(dev, torch.float32)
        total = torch.zeros((), device=dev)
        for name in self.graph.order:
            nll = F.cross_entropy(self.logits(name, values, n), values[name].to(dev), reduction="none")
            total = total - (w * nll).sum() / w.sum()
        return total

    @torch.no_grad()
    def cpt(self, name: str, parent_values: torch.Tensor) -> torch.Tensor:
        """The learned conditional as a CPT function (:data:`~manifold_defense.causal.graph.CPT`)."""
        parents = self.graph.parents(name)
        values = {p: parent_values[:, i] for i, p in enumerate(parents)}
        return F.softmax(self.logits(name, values, parent_values.shape[0]).double(), dim=1).cpu()

    def joint(self, intervene: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The controller's exact label joint (under ``do(intervene)``), shape ``graph.shape``."""
        return joint_table(self.graph, self.cpt, intervene)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        intervene: Mapping[str, Any] | None = None,
        condition: Mapping[str, Any] | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        max_draws: int = 1_000_000,
    ) -> torch.Tensor:
        """``n`` label rows ``(n, len(nodes))`` (value indices, columns in topological order), on the CPU.

        Args:
            n: rows wanted.
            intervene: ``{node: value}`` set by ``do()`` (value names or indices).
            condition: ``{node: value}`` to condition on, by rejection sampling.
            seed / generator: the randomness (one of them; ``seed`` 0 when neither is given). The caller's
                global RNG is not used.
            max_draws: rejection sampling gives up (``ValueError``) after this many draws.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"expected n to be a positive int, got {n!r}")
        if seed is not None and generator is not None:
            raise ValueError("expected a seed or a generator, got both")
        rng = (
            generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
        )
        do = self.graph.assignment(intervene, "intervention")
        cond = self.graph.assignment(condition)
        kept: list[torch.Tensor] = []
        have = drawn = 0
        while have < n:
            if drawn >= max_draws:
                raise ValueError(
                    f"condition {condition}: only {have} of {n} samples accepted in {drawn} draws (probability "
                    "too small for rejection sampling)"
                )
            batch = max(1024, 2 * (n - have)) if cond else n
            rows = self._draw(batch, do, rng)
            drawn += batch
            if cond:
                ok = torch.ones(batch, dtype=torch.bool)
                for name, index in cond.items():
                    ok &= rows[:, self.graph.order.index(name)] == index
                rows = rows[ok]
            kept.append(rows)
            have += rows.shape[0]
        return torch.cat(kept)[:n]

    def _draw(self, n: int, do: Mapping[str, int], rng: torch.Generator) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {}
        for name in self.graph.order:
            if name in do:
                values[name] = torch.full((n,), do[name], dtype=torch.long)
                continue
            logits = self.logits(name, values, n).float().cpu()
            uniform = torch.rand(logits.shape, generator=rng).clamp_(1e-12, 1.0 - 1e-7)
            values[name] = (logits - torch.log(-torch.log(uniform))).argmax(1)  # Gumbel-max
        return torch.stack([values[name] for name in self.graph.order], dim=1)


def train_controller(
    controller: CausalController,
    labels: torch.Tensor,
    *,
    steps: int = 2000,
    lr: float = 0.01,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the controller to label rows ``(N, len(nodes))`` by maximum likelihood (full-batch Adam over the
    distinct rows weighted by their counts, the same objective as over all rows).

    Labels are value indices of any integer dtype (or whole-number floats); a fractional value or one outside a
    node's range raises ``ValueError`` naming the node and the value (:meth:`CausalGraph.label_rows`). The
    controller has no checkpoint: it trains in seconds, from scratch on every call (its weights re-initialized
    from ``seed``).

    Returns:
        ``{"nll": final mean negative log-likelihood per example, "seconds": wall time}``.
    """
    labels = controller.graph.label_rows(labels, "controller training labels")
    if labels.shape[0] == 0:
        raise ValueError("controller training labels: expected at least one label row, got 0")
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in controller.nodes.values():
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
    opt = torch.optim.Adam(controller.parameters(), lr=lr)
    controller.train()
    nll = torch.zeros(())
    rows, counts = labels.unique(dim=0, return_counts=True)
    for _ in range(steps):
        nll = -controller._log_likelihood(rows, counts)  # rows checked once, above
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
    controller.eval()
    return {"nll": float(nll.detach()), "seconds": round(time.perf_counter() - start, 2)}
