"""The pair grid of the on-manifold figures (:func:`plot_pairs`): ``G(z) | G(z')`` pairs side by side with a
caption under each image (the projection presets are in :mod:`manifold_defense.presets`, robust accuracy and the
latent attacks' figures in :mod:`manifold_defense.evaluation`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["plot_pairs"]


def plot_pairs(
    path: Any,
    left: Tensor,
    right: Tensor,
    captions: Sequence[tuple[str, str]],
    title: str,
    columns: int = 2,
) -> None:
    """Save a matplotlib grid of image pairs ``left[i] | right[i]`` with a caption under each image.

    Args:
        path: output file (PNG).
        left, right: ``(P, 1, H, W)`` or ``(P, H, W)`` images in [0, 1], ``P >= 0`` (an empty grid says so).
        captions: ``P`` pairs of strings (left caption, right caption).
        title: figure title.
        columns: pairs per row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = left.shape[0]
    if right.shape[0] != count or len(captions) != count:
        raise ValueError(
            f"expected as many right images and captions as left images ({count}), "
            f"got {right.shape[0]} and {len(captions)}"
        )
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.1 * 2 * columns, 2.4 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        r, c = divmod(i, columns)
        for j, (img, cap) in enumerate(((left[i], captions[i][0]), (right[i], captions[i][1]))):
            ax = axes[r][2 * c + j]
            pixels = img.detach().cpu().reshape(-1, img.shape[-2], img.shape[-1])
            shown = pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0)
            ax.imshow(shown.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(cap, fontsize=8)
    if count == 0:
        axes[0][0].text(0.0, 0.5, "no successful pair to show", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
