"""The plots of a robustness run (:func:`eval.robustness_report.write_outputs`): accuracy against eps, the example
grids (clean / adversarial / projected) and the on-manifold pairs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["plot_curves", "plot_examples", "plot_onmanifold"]


def plot_curves(record: Mapping[str, Any], path: Path) -> None:
    """Accuracy vs eps, one panel per norm, one line per defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = sorted({n for d in record["defenses"].values() for n in d["curves"]}, key=lambda v: v != "linf")
    fig, axes = plt.subplots(1, max(1, len(norms)), figsize=(5 * max(1, len(norms)), 3.8), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=False):
        for name, d in record["defenses"].items():
            c = d["curves"].get(norm)
            if c:
                ax.plot(c["eps"], c["accuracy"], marker="o", label=f"{name} ({c['attack']}, n={d['n']})")
        ax.set_xlabel(f"{norm} eps")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not norms:
        axes[0][0].text(0.1, 0.5, "no curves computed")
    fig.suptitle(("QUICK " if record.get("quick") else "") + "accuracy vs eps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(ex: Mapping[str, Any], y: list[int] | None, title: str, path: Path) -> None:
    """Rows clean / adversarial / projected (when the defense has a projection), one column per example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(ex.get("attacks", []))
    rows = [("clean", ex.get("clean")), ("adversarial", ex.get("x_adv"))]
    if isinstance(ex.get("projected"), Tensor):
        rows.append(("projected", ex["projected"]))
    fig, axes = plt.subplots(
        len(rows), max(1, count), figsize=(1.6 * max(1, count) + 0.6, 1.8 * len(rows) + 0.6), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, (_label, imgs) in enumerate(rows):
        for c in range(count):
            if not isinstance(imgs, Tensor):
                continue
            img = imgs[c]
            ax = axes[r][c]
            ax.imshow(
                img.reshape(img.shape[-2], img.shape[-1]).numpy()
                if img.shape[0] == 1
                else img.permute(1, 2, 0).numpy(),
                cmap="gray",
                vmin=0,
                vmax=1,
            )
            if r == 0:
                ax.set_title(f"y={y[c] if y else '?'}", fontsize=7)
            elif r == 1:
                ax.set_title(f"{ex['attacks'][c]}: {int(ex['pred'][c])}", fontsize=7)
            else:
                ax.set_title("projection", fontsize=7)
    if count == 0:
        axes[0][0].text(0.0, 0.5, "no point broken: nothing to show", fontsize=9)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_onmanifold(rec: Mapping[str, Any], entry: Mapping[str, Any], path: Path, where: str) -> None:
    """The on-manifold pairs ``G(z) | G(z')`` the classifier gets wrong, closest first."""
    from eval.defense_figures import plot_pairs

    pairs = rec["pairs"]
    pos = pairs["positions"].tolist()
    points = rec["indices"][pos].tolist() if len(pos) else []
    captions = [
        (f"G(z) #{i}", f"G(z'): pred {int(rec['pred_adv'][p])}, l2 {float(rec['pixel_distance'][p]):.2f}")
        for i, p in zip(points, pos, strict=True)
    ]
    title = (
        f"{where}: on-manifold pairs G(z) | G(z'), ||G(z') - G(z)||_2 <= {entry['settings']['budget_l2']:g} "
        f"(closest {len(pos)} of {entry.get('successes', '?')} flips)"
    )
    plot_pairs(path, pairs["x0"], pairs["x_adv"], captions, title)
