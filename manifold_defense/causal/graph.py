"""Causal graphs over discrete attributes, and exact distributions from conditional probability tables.

A :class:`CausalGraph` is a DAG of named discrete nodes, each with named values and a tuple of parents. It is
validated on construction (unknown parents, cycles, duplicate names and values raise ``ValueError`` naming the
problem) and knows a topological order. :func:`joint_table` turns per-node conditionals ``P(v | parents)`` into
the joint, under interventions ``do(X = x)`` by the truncated factorization (Pearl 2009, eq. 3.10): the intervened
nodes' factors are replaced by point masses, every other factor is kept. :func:`marginal` then conditions the
joint (restrict and renormalize) and sums out all but one node, so conditional and interventional distributions of
every node are exact, not sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CausalGraph", "Node", "joint_table", "marginal", "tvd"]

#: ``cpt(node, parent_values) -> probabilities``: the conditional distribution of ``node`` for each row of
#: ``parent_values`` (``(R, len(parents))`` long tensor of value indices in the graph's parent order), ``(R, k)``.
CPT = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Node:
    """One discrete attribute: its name, value names (index ``i`` is value ``values[i]``) and parents."""

    name: str
    values: tuple[str, ...]
    parents: tuple[str, ...] = ()

    @property
    def cardinality(self) -> int:
        return len(self.values)


class CausalGraph:
    """A DAG over discrete nodes.

    Args:
        nodes: the nodes, in any order; each node's parents must be other nodes of the graph.

    Raises:
        ValueError: no nodes, a duplicate node name, fewer than two or duplicate values, an unknown parent, a node
            that is its own parent, or a cycle (the message names the nodes on it).

    Example:
        >>> g = CausalGraph([Node("D", ("0", "1")), Node("T", ("thin", "thick"), ("D",))])
        >>> g.order
        ('D', 'T')
    """

    def __init__(self, nodes: Iterable[Node]) -> None:
        node_list = list(nodes)
        if not node_list:
            raise ValueError("causal graph: expected at least one node, got none")
        by_name: dict[str, Node] = {}
        for node in node_list:
            if not isinstance(node, Node):
                raise TypeError(f"causal graph: expected Node objects, got {type(node).__name__}")
            if not isinstance(node.name, str) or not node.name:
                raise ValueError(f"causal graph: expected a non-empty node name, got {node.name!r}")
            if node.name in by_name:
                raise ValueError(f"causal graph: duplicate node {node.name!r}")
            if len(node.values) < 2 or len(set(node.values)) != len(node.values):
                raise ValueError(
                    f"causal graph: node {node.name!r} needs at least two distinct values, got {node.values}"
                )
            by_name[node.name] = node
        for node in node_list:
            for p in node.parents:
                if p == node.name:
                    raise ValueError(f"causal graph: node {node.name!r} is its own parent (a cycle)")
                if p not in by_name:
                    raise ValueError(
                        f"causal graph: node {node.name!r} has unknown parent {p!r}; nodes are {sorted(by_name)}"
                    )
            if len(set(node.parents)) != len(node.parents):
                raise ValueError(f"causal graph: node {node.name!r} lists a parent twice: {node.parents}")
        self._nodes = by_name
        self.order: tuple[str, ...] = _topological_order(by_name)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> CausalGraph:
        """A graph from ``{name: {"values": [...], "parents": [...]}}`` (the JSON form of :meth:`spec`)."""
        if not isinstance(spec, Mapping):
            raise TypeError(f"causal graph spec: expected a mapping of node names, got {type(spec).__name__}")
        return cls(Node(n, tuple(v["values"]), tuple(v.get("parents", ()))) for n, v in spec.items())

    def spec(self) -> dict[str, dict[str, list[str]]]:
        """The graph as JSON-ready data, nodes in topological order."""
        return {n: {"values": list(self[n].values), "parents": list(self[n].parents)} for n in self.order}

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names in topological order."""
        return self.order

    def __getitem__(self, name: str) -> Node:
        return self._nodes[self.check_node(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __repr__(self) -> str:
        edges = ", ".join(f"{p}->{n}" for n in self.order for p in self._nodes[n].parents)
        return f"CausalGraph(nodes={list(self.order)}, edges=[{edges}])"

    def parents(self, name: str) -> tuple[str, ...]:
        return self[name].parents

    def check_node(self, name: Any) -> str:
        """``name`` if it is a node of the graph; ``ValueError`` naming the nodes otherwise."""
        if not isinstance(name, str) or name not in self._nodes:
            raise ValueError(f"unknown node {name!r}: expected one of {list(self.order)}")
        return name

    def value_index(self, name: str, value: Any) -> int:
        """The index of ``value`` (a value name or an int index) of node ``name``; ``ValueError`` if out of range."""
        node = self[name]
        if isinstance(value, str):
            if value not in node.values:
                raise ValueError(
                    f"node {name!r}: unknown value {value!r}, expected one of {list(node.values)}"
                )
            return node.values.index(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"node {name!r}: expected a value name or an int index, got {value!r}")
        if not 0 <= value < node.cardinality:
            raise ValueError(
                f"node {name!r}: value index {value} out of range, expected 0..{node.cardinality - 1} "
                f"({list(node.values)})"
            )
        return value

    def assignment(self, values: Mapping[str, Any] | None, what: str = "condition") -> dict[str, int]:
        """``{node: value}`` with names or indices checked, as ``{node: index}``."""
        if values is None:
            return {}
        if not isinstance(values, Mapping):
            raise ValueError(
                f"{what}: expected a mapping of node names to values, got {type(values).__name__}"
            )
        return {self.check_node(k): self.value_index(k, v) for k, v in values.items()}

    def label_rows(self, labels: Any, what: str = "label rows") -> torch.Tensor:
        """Label rows ``(N, len(nodes))`` of value indices (columns in topological order), checked, as a new int64
        tensor (the caller's is not modified).

        Any integer dtype is accepted, and floats whose values are whole numbers; a fractional or non-finite
        value, or a value index outside a node's ``0..cardinality-1``, raises ``ValueError`` naming the node,
        the value and the allowed range (:func:`manifold_defense.training.loop.check_labels`).
        """
        from manifold_defense.training.loop import check_labels  # the trainers' one label check

        if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[1] != len(self.order):
            got = (
                f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            )
            raise ValueError(f"{what}: expected label rows (N, {len(self.order)}) in the order {list(self.order)}, "
                             f"got {got}")  # fmt: skip
        n = int(labels.shape[0])
        columns = [
            check_labels(
                labels[:, i], n, f"labels of node {name!r}", num_classes=self[name].cardinality, kind="value indices"
            )
            for i, name in enumerate(self.order)
        ]
        return torch.stack(columns, dim=1) if n else torch.zeros(0, len(self.order), dtype=torch.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        """Cardinalities in topological order (the shape of :func:`joint_table`)."""
        return tuple(self._nodes[n].cardinality for n in self.order)


def _topological_order(nodes: Mapping[str, Node]) -> tuple[str, ...]:
    """Kahn's algorithm, ties broken by the order the nodes were given; ``ValueError`` naming a cycle."""
    done: list[str] = []
    remaining = dict(nodes)
    while remaining:
        ready = [n for n, node in remaining.items() if all(p in done for p in node.parents)]
        if not ready:
            raise ValueError(f"causal graph: expected a DAG, got a cycle among {sorted(remaining)}")
        done.append(ready[0])
        del remaining[ready[0]]
    return tuple(done)


def joint_table(graph: CausalGraph, cpt: CPT, intervene: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The joint distribution as a float64 tensor of shape ``graph.shape`` (axes in topological order).

    ``intervene``: ``do(node = value)`` for each item, by the truncated factorization (the intervened nodes'
    factors become point masses at the set values).
    """
    do = graph.assignment(intervene, "intervention")
    joint = torch.ones(graph.shape, dtype=torch.float64)
    grids = torch.stack(
        torch.meshgrid(*[torch.arange(k) for k in graph.shape], indexing="ij"), dim=-1
    ).reshape(-1, len(graph.order))
    for axis, name in enumerate(graph.order):
        node = graph[name]
        if name in do:
            factor = (grids[:, axis] == do[name]).to(torch.float64)
        else:
            cols = [graph.order.index(p) for p in node.parents]
            probs = cpt(name, grids[:, cols]).to(torch.float64)
            factor = probs.gather(1, grids[:, axis : axis + 1]).squeeze(1)
        joint = joint * factor.reshape(graph.shape)
    return joint


def marginal(
    graph: CausalGraph,
    joint: torch.Tensor,
    node: str,
    condition: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """``P(node | condition)`` under ``joint`` (from :func:`joint_table`); ``ValueError`` for a zero-probability
    condition."""
    cond = graph.assignment(condition)
    axis = graph.order.index(graph.check_node(node))
    table = joint.clone()
    for name, index in cond.items():
        keep = torch.zeros(graph[name].cardinality, dtype=table.dtype)
        keep[index] = 1.0
        shape = [1] * table.dim()
        shape[graph.order.index(name)] = -1
        table = table * keep.reshape(shape)
    total = table.sum()
    if float(total) <= 0.0:
        raise ValueError(f"condition {condition} has probability 0")
    dims = [d for d in range(table.dim()) if d != axis]
    return (table.sum(dim=dims) if dims else table) / total


def tvd(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` of two distributions of the same shape."""
    if p.shape != q.shape:
        raise ValueError(
            f"tvd: expected distributions of the same shape, got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    return 0.5 * float((p.to(torch.float64) - q.to(torch.float64)).abs().sum())
