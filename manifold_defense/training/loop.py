"""The one training loop every model's trainer runs: seeded batches, atomic checkpoints, exact resume.

Batch ``s`` is a deterministic function of ``(seed, s)``: the epoch's permutation comes from a ``torch.Generator``
seeded by ``(seed, epoch)``, and the global torch RNG (dropout, latent noise) runs inside
``torch.random.fork_rng`` seeded by ``seed``, its state saved with every checkpoint. A run killed at any point and
started again with the same arguments resumes from its last checkpoint and ends in the same state as an
uninterrupted run. The caller's global RNG state is left as it was.

Checkpoints hold tensors, numbers and strings only and are read back with ``torch.load(weights_only=True)``, which
executes no code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from manifold_defense.devices import resolve_device
from manifold_defense.progress import progress as progress_display

StepFn = Callable[[int, tuple[torch.Tensor, ...]], Mapping[str, float]]
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class LoopConfig:
    """Schedule of a training run.

    Attributes:
        steps: number of optimizer steps (batches) in the whole run.
        batch_size: examples per batch (the last partial batch of each epoch is dropped).
        seed: seeds the batch order and the RNG of the step function.
        checkpoint_every: steps between checkpoints (and at the end) when a checkpoint directory is given.
        log_every: steps between entries of the returned history.
        bound_to: fingerprint of the frozen inputs the run depends on (e.g. :func:`module_fingerprint` of the
            generator an encoder is trained for); a checkpoint resumes only into a run with the same one, so a
            folder's checkpoint is never continued against other weights. Empty: not bound.
    """

    steps: int
    batch_size: int
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 100
    bound_to: str = ""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoopConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.bound_to, str):
            raise TypeError(f"LoopConfig.bound_to must be a str, got {type(self.bound_to).__name__}")


def dataset_tensors(dataset: Dataset[Any]) -> tuple[torch.Tensor, ...]:
    """The tensors of a ``TensorDataset`` (or anything indexable returning tuples), stacked once."""
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors)
    n = len(dataset)  # type: ignore[arg-type]
    items = [dataset[i] for i in range(n)]
    if not items:
        raise ValueError("expected a non-empty dataset, got 0 examples")
    first = items[0] if isinstance(items[0], tuple | list) else (items[0],)
    columns = [
        [item[k] if isinstance(item, tuple | list) else item for item in items] for k in range(len(first))
    ]
    return tuple(torch.stack([torch.as_tensor(v) for v in col]) for col in columns)


def check_images(images: torch.Tensor, what: str = "training images") -> None:
    """Raise unless ``images`` is a float ``(N, C, H, W)`` tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        got = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(f"{what}: expected a float tensor (N, C, H, W), got {got}")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0 or images.isnan().any():
        raise ValueError(f"{what}: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


class NonFiniteMetricError(ValueError):
    """A training step reported a NaN or inf metric (its loss, usually from non-finite logits)."""


def check_finite_metrics(metrics: Mapping[str, Any], where: str) -> None:
    """Raise :class:`NonFiniteMetricError` naming ``where`` (model, step, batch) unless every metric is finite.

    The one check behind every training loop (:func:`run_loop` calls it after each step, before anything is
    logged or checkpointed): a NaN loss means NaN weights from here on, and a checkpoint of them would be
    silently wrong.
    """
    bad = {k: float(v) for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        raise NonFiniteMetricError(
            f"expected finite training metrics {where}, got {bad}: the model (or its data) produced NaN or inf "
            "values; training stops before they reach a checkpoint"
        )


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation of ``range(n)`` from a generator seeded by ``(seed, epoch)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _batch_indices(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"dataset of {n} examples is smaller than one batch of {batch_size}")
    epoch, offset = divmod(step, per_epoch)
    return _epoch_permutation(n, seed, epoch)[offset * batch_size : (offset + 1) * batch_size]


def run_loop(
    step_fn: StepFn,
    tensors: tuple[torch.Tensor, ...],
    config: LoopConfig,
    state: Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    desc: str = "train",
    save_checkpoints: bool = True,
    extendable: bool = False,
    validate: Callable[[int], Mapping[str, float]] | None = None,
    validate_every: int | None = None,
) -> list[dict[str, float]]:
    """Run ``step_fn(step, batch)`` for ``config.steps`` steps with checkpointing; return the logged history.

    Args:
        step_fn: does one optimizer step on ``batch`` (tensors already on ``device``) and returns scalar metrics.
        tensors: the training data, e.g. ``(images, labels)``, all with the same first dimension, kept on CPU.
        config: steps, batch size, seed, checkpoint and log intervals.
        state: everything whose state must survive a restart (models, optimizers, schedulers: anything with
            ``state_dict``/``load_state_dict``), by name.
        device: where batches are moved.
        checkpoint_dir: folder for ``checkpoint.pt`` and ``history.json``; ``None`` disables checkpointing.
        progress: show a tqdm progress bar.
        desc: the progress bar's label.
        save_checkpoints: write ``checkpoint.pt``/``history.json``; ``False`` still resumes from an existing
            checkpoint but never writes one (the non-zero ranks of a distributed run).
        validate: optional hook ``validate(step) -> metrics`` called after step ``step`` (1-based count of
            steps done) every ``validate_every`` steps and after the last step; its metrics are merged into
            that step's history entry (a new entry when the step is not a logging step) before the checkpoint
            is written, so a resumed run keeps them.
        validate_every: steps between validations (required with ``validate``).
        extendable: accept a checkpoint of the same run with another step count (not beyond the steps it has
            done), so a run can be continued to more steps or finished early; only for trainers whose steps do
            not depend on the total (constant learning rate, like :func:`~manifold_defense.training.train_gan`).

    Returns:
        History: one ``{"step": s, **metrics}`` entry every ``config.log_every`` steps (each metric the mean over
        the steps of the interval that reported it),
        plus the validation metrics.
    """
    if validate is not None and (
        isinstance(validate_every, bool) or not isinstance(validate_every, int) or validate_every <= 0
    ):
        raise ValueError(
            f"expected validate_every to be a positive int with validate, got {validate_every!r}"
        )
    dev = resolve_device(device)
    n = int(tensors[0].shape[0])
    if any(int(t.shape[0]) != n for t in tensors):
        raise ValueError(
            f"expected tensors with the same first dimension, got {[tuple(t.shape) for t in tensors]}"
        )
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    history: list[dict[str, float]] = []
    start = 0
    rng_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        if ckpt_path is not None and ckpt_path.is_file():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if not _compatible(ckpt.get("config"), config, extendable):
                raise ValueError(
                    f"checkpoint {ckpt_path} was written by another run (config {ckpt.get('config')}), "
                    f"expected {_config_record(config)}: use a fresh checkpoint directory"
                )
            for name, obj in state.items():
                saved_state = ckpt["state"].get(name)
                if saved_state is None and not getattr(obj, "optional_in_checkpoint", False):
                    raise ValueError(f"checkpoint {ckpt_path} holds no {name!r} state: use a fresh checkpoint directory")
                obj.load_state_dict(saved_state)
            torch.set_rng_state(ckpt["rng_cpu"])
            if dev.type == "cuda" and ckpt.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng_cuda"], dev)
            start = int(ckpt["step"])
            if start > config.steps:
                raise ValueError(
                    f"checkpoint {ckpt_path} has done {start} steps, more than the {config.steps} asked for: "
                    f"ask for at least {start} steps or use a fresh checkpoint directory"
                )
            history = list(ckpt["history"])
            sums, count = dict(ckpt["running_sums"]), int(ckpt["running_count"])
            counts = dict(ckpt.get("running_counts") or {k: count for k in sums})
        else:
            sums, count, counts = {}, 0, {}
        bar = progress_display(
            range(start, config.steps),
            desc=desc,
            unit="step",
            disable=not progress,
            initial=start,
            total=config.steps,
        )
        for step in bar:
            idx = _batch_indices(n, step, config.batch_size, config.seed)
            batch = tuple(t[idx].to(dev, non_blocking=True) for t in tensors)
            metrics = step_fn(step, batch)
            check_finite_metrics(
                metrics, f"in {desc!r} at step {step} (batch of examples {idx[:8].tolist()} ...)"
            )
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
            count += 1
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                entry = {"step": float(done), **{k: v / counts[k] for k, v in sums.items()}}
                history.append(entry)
                bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k != "step"})
                sums, count, counts = {}, 0, {}
            if (
                validate is not None
                and validate_every is not None
                and (done % validate_every == 0 or done == config.steps)
            ):
                val = {k: float(v) for k, v in validate(done).items()}
                if history and history[-1]["step"] == float(done):
                    history[-1].update(val)
                else:
                    history.append({"step": float(done), **val})
                bar.set_postfix({k: f"{v:.4g}" for k, v in history[-1].items() if k != "step"})
            if (
                save_checkpoints
                and ckpt_path is not None
                and (done % config.checkpoint_every == 0 or done == config.steps)
            ):
                _atomic_torch_save(
                    {
                        "step": done,
                        "config": _config_record(config),
                        "state": {name: obj.state_dict() for name, obj in state.items()},
                        "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                        "history": history,
                        "running_sums": sums,
                        "running_count": count,
                        "running_counts": counts,
                    },
                    ckpt_path,
                )
                (ckpt_path.parent / "history.json").write_text(json.dumps(history, indent=1))
    return history


def _compatible(saved: Any, config: LoopConfig, extendable: bool) -> bool:
    """Whether a checkpoint's config record belongs to this run (with ``extendable``: up to its step count)."""
    record = _config_record(config)
    if saved == record:
        return True
    if not extendable or not isinstance(saved, dict):
        return False
    return {**saved, "steps": record["steps"]} == record


def _config_record(config: LoopConfig) -> dict[str, int | str]:
    record: dict[str, int | str] = {
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }
    if config.bound_to:  # absent when unbound, so checkpoints written before the field still resume
        record["bound_to"] = config.bound_to
    return record


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of a module's parameters and buffers, by name: the same weights give the same string.

    Used as :attr:`LoopConfig.bound_to` by trainers whose result depends on a frozen model (the encoder on its
    generator), so a checkpoint trained against one generator is not resumed against another.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module to fingerprint, got {type(module).__name__}")
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
