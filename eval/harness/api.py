"""``run_robustness``: the robustness harness as a Python API, over any classifier, generator and tensors.

Usage (any classifier, any generator, tensors)::

    defenses = [undefended_defense(clf), projection_defense("projection-fast", clf, gen, config, encoder=enc)]
    record = run_robustness(RobustnessSettings(n=100), defenses, x, y, Path("runs/rob"), generator=gen,
                            encoder=enc, latent_config=config)

The cascade, verdict rule, surrogates, resume and sharding: :mod:`eval.harness` (package docs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from eval.harness import state as st
from eval.harness.defenses import Defense
from eval.harness.record import defense_record
from eval.harness.settings import ATTACK_DOCS, FLAGS, SCHEMA, STATE_FILE, RobustnessSettings
from eval.harness.stages import Runner
from eval.inputs import check_labeled_images
from eval.run_folder import claim_run_folder
from manifold_defense.inversion import InversionConfig
from manifold_defense.training.distributed import DistContext

__all__ = ["run_robustness", "summary_json", "tensors_from_loader"]


def run_robustness(
    settings: RobustnessSettings,
    defenses: Sequence[Defense],
    x: Tensor,
    y: Tensor,
    out: Path,
    *,
    generator: nn.Module | None = None,
    encoder: nn.Module | None = None,
    latent_config: InversionConfig | None = None,
    ctx: DistContext | None = None,
    progress: bool = True,
    fresh: bool = False,
    meta: Mapping[str, Any] | None = None,
    on_stage: Callable[[str], None] | None = None,
    command: str = "robustness",
) -> dict[str, Any]:
    """Run the cascade on every defense, write ``out/results.json``, ``out/report.md`` and the plots.

    Args:
        settings: :class:`RobustnessSettings`.
        defenses: :class:`Defense` objects (distinct names), models in eval mode on ``x``'s device.
        x: ``(N, C, H, W)`` images in [0, 1], ``N >= settings.n`` (a data loader: concatenate its batches, e.g.
            with :func:`tensors_from_loader`); y: ``(N,)`` int64 labels, same device. Neither is modified.
        out: output folder (created); holds ``state.pt`` while and after running.
        generator: ``(B, k) -> (B, C, H, W)`` for the latent attacks (skipped without it); encoder: optional
            warm start; latent_config: the inversion schedule for the starting latents (default Defense-GAN's).
        ctx: distributed context (default: single process); every rank must call with the same arguments.
        progress: progress bar (rank 0).
        fresh: discard a saved state of *this* harness in ``out`` (never other files).
        meta: extra top-level JSON fields (command, device...).
        on_stage: called with each finished stage's key (after its state is saved).
        command: the ``python -m eval`` command that owns ``out`` (:func:`eval.run_folder.claim_run_folder`).

    Returns:
        The results record (also ``out/results.json``), schema in :mod:`eval.robustness_report`.

    Raises:
        StateMismatchError: ``out`` holds another run's state or foreign files.
        ValueError / TypeError: unknown names, bad tensors, a model whose output is not ``(B, K)`` logits.
    """
    from eval.robustness_report import write_outputs

    if not isinstance(settings, RobustnessSettings):
        raise TypeError(f"expected settings as RobustnessSettings, got {type(settings).__name__}")
    defenses = list(defenses)
    if not defenses or not all(isinstance(d, Defense) for d in defenses):
        raise TypeError("expected a non-empty sequence of Defense objects")
    names = [d.name for d in defenses]
    if len(set(names)) != len(names):
        raise ValueError(f"expected distinct defense names, got {names}")
    check_labeled_images(x, y, settings.n)
    ctx = ctx if ctx is not None else DistContext(0, 1, x.device)
    x, y = x[: settings.n].detach(), y[: settings.n].detach()
    out = Path(out)
    extra = {
        "generator": None if generator is None else type(generator).__name__,
        "latent_config": latent_config,
        "order": names,
    }
    fp = st.fingerprint(settings, defenses, x, y, extra)
    if generator is not None:
        fp["generator"] = st.generator_hash(generator)
    state: dict[str, Any] = {}
    if ctx.is_main:
        claim_run_folder(out, command)  # the settings are checked by the state's fingerprint
        if fresh and (out / STATE_FILE).exists():
            (out / STATE_FILE).unlink()
            for name in ("results.json", "report.md"):
                (out / name).unlink(missing_ok=True)
            for png in out.glob("*.png"):
                png.unlink()
        state = st.load_state(out, fp)
        out.mkdir(parents=True, exist_ok=True)
    if ctx.distributed:
        import torch.distributed as dist

        box: list[Any] = [state if ctx.is_main else None]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    resumed = len(state["stages"])
    start = time.perf_counter()
    Runner(
        settings, defenses, x, y, out, ctx, generator, encoder, latent_config, state, progress, on_stage
    ).run()
    for d in defenses:
        state["stages"][f"{d.name}|info"]["dim"] = int(x[0].numel())
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "threat_models": list(settings.threats),
        "n": settings.n,
        "image_shape": list(x.shape[1:]),
        "settings": settings.to_json(),
        "quick": settings.quick,
        "reduced_vs_full": settings.reductions(),
        **dict(meta or {}),
        "world_size": ctx.world_size,
        "resumed_stages": resumed,
        "seconds_this_call": round(time.perf_counter() - start, 1),
        "seconds_stages": round(
            sum(float(v.get("seconds", 0.0)) for v in state["stages"].values() if isinstance(v, dict)), 1
        ),
        "attack_definitions": {a: ATTACK_DOCS[a] for a in settings.attacks},
        "flag_definitions": dict(FLAGS),
        "defenses": {d.name: defense_record(settings, state["stages"], d.name) for d in defenses},
    }
    if ctx.is_main:
        st.save_state(state, out)
        write_outputs(record, state["stages"], out)
    if ctx.distributed:
        ctx.barrier()
    return record


def tensors_from_loader(loader: Any, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Concatenate ``(x, y)`` batches of a data loader (the first ``limit`` points)."""
    import torch

    xs, ys, count = [], [], 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"expected the loader to yield (x, y) batches, got {type(batch).__name__}")
        xs.append(batch[0])
        ys.append(batch[1])
        count += len(batch[1])
        if limit is not None and count >= limit:
            break
    if not xs:
        raise ValueError("expected a non-empty data loader")
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def summary_json(record: Mapping[str, Any]) -> str:
    """The record as JSON text (indent 1)."""
    return json.dumps(record, indent=1) + "\n"
