"""The one training loop every model's trainer runs: seeded batches, atomic checkpoints, exact resume.

Batch ``s`` is a deterministic function of ``(seed, s)``: the epoch's permutation comes from a ``torch.Generator``
seeded by ``(seed, epoch)``, and the global torch RNG (dropout, latent noise) runs inside
``torch.random.fork_rng`` seeded by ``seed``, its state saved with every checkpoint. A run killed at any point and
started again with the same arguments resumes from its last checkpoint and ends in the same state as an
uninterrupted run. The caller's global RNG state is left as it was.

Checkpoints hold tensors, numbers and strings only and are read back with ``torch.load(weights_only=True)``, which
executes no code. They are written by :func:`manifold_defense.integrity.save_checked` with a SHA-256 of their content,
so a cut or altered checkpoint is refused by name instead of resuming into another run. Each records the settings
that define its run (:attr:`LoopConfig.trainer` and :attr:`LoopConfig.settings`); a resume under other settings is
refused, naming every setting that differs.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manifold_defense.devices import resolve_device
from manifold_defense.integrity import IntegrityError, atomic_write_text, load_checked, save_checked
from manifold_defense.modes import frozen
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
    trainer: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoopConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.bound_to, str):
            raise TypeError(f"LoopConfig.bound_to must be a str, got {type(self.bound_to).__name__}")
        if not isinstance(self.trainer, str):
            raise TypeError(f"LoopConfig.trainer must be a str, got {type(self.trainer).__name__}")
        if not isinstance(self.settings, Mapping):
            raise TypeError(f"LoopConfig.settings must be a mapping, got {type(self.settings).__name__}")


#: Fields of a trainer's config that never change the weights a run produces (left out of its settings record).
NOT_RUN_DEFINING = ("steps", "checkpoint_every", "log_every", "validate_every")


def _plain(value: Any) -> Any:
    """A JSON-like copy of a setting (tuples as lists, dataclasses as dicts, enums by value, functions by name).

    Only built-in types come out (a ``str`` enum or a numpy float becomes a plain ``str`` / ``float``), so the
    record loads with ``torch.load(weights_only=True)`` and compares equal to the one read back.
    """
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if value is None:
        return None
    for kind in (bool, int, float, str):  # bool before int; subclasses (numpy scalars) become the built-in type
        if isinstance(value, kind):
            return kind(value)
    if inspect.isroutine(value) or isinstance(value, type):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    enum_value = getattr(value, "value", None)
    if isinstance(enum_value, bool | int | float | str):
        return _plain(enum_value)
    return repr(value)


def run_settings(config: Any, *, exclude: tuple[str, ...] = NOT_RUN_DEFINING, **extra: Any) -> dict[str, Any]:
    """The settings record of a trainer's config dataclass: every field but ``exclude``, plus ``extra``.

    The fields in ``exclude`` (by default :data:`NOT_RUN_DEFINING`: the step target, checkpoint and logging
    intervals) may differ between a checkpoint and the run that resumes it; every other field must match.
    """
    if not is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a trainer config dataclass instance, got {type(config).__name__}")
    record = {f.name: _plain(getattr(config, f.name)) for f in fields(config) if f.name not in exclude}
    record.update({k: _plain(v) for k, v in extra.items()})
    return record


#: What every trainer takes as training data (the one message of :func:`dataset_tensors`).
ACCEPTED_DATA = (
    "a TensorDataset, an indexable Dataset whose examples are (image, label, ...) tuples of tensors or numbers, "
    "or a tuple of tensors (images, labels, ...) with one row per example"
)


def _column_value(value: Any, what: str, index: int, column: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool | int | float) or type(value).__module__ == "numpy":
        return torch.as_tensor(value)
    raise TypeError(
        f"{what}: expected {ACCEPTED_DATA}; example {index} holds a {type(value).__name__} in position {column}"
    )


def dataset_tensors(dataset: Any, what: str = "training data") -> tuple[torch.Tensor, ...]:
    """The columns of a training dataset as tensors with one row per example, stacked once (on the CPU).

    Args:
        dataset: a ``TensorDataset`` (its tensors), a tuple or list of tensors with the same first dimension
            (returned as they are), or any indexable dataset (``len`` and ``[i]``) whose examples are tuples or
            lists of tensors, Python numbers or numpy values (a bare tensor example is one column).
        what: the data's name in error messages.

    Raises:
        TypeError: a ``DataLoader`` (the trainers draw their own seeded batches of ``config.batch_size``, so its
            sampler, batch size and order would be ignored: pass ``loader.dataset``), examples that are dicts or
            other objects, a column given as a Python list, anything else that is not a dataset.
        ValueError: an empty dataset, examples with different numbers of fields or different shapes, columns of
            different lengths.
    """
    if isinstance(dataset, DataLoader):
        raise TypeError(
            f"{what}: expected {ACCEPTED_DATA}, got a DataLoader: pass its dataset (loader.dataset); the trainer "
            "draws its own seeded batches of config.batch_size, so a loader's sampler, batch size and order "
            "would be ignored"
        )
    if isinstance(dataset, TensorDataset):
        columns: tuple[torch.Tensor, ...] = tuple(dataset.tensors)
    elif isinstance(dataset, tuple | list) and not (
        dataset and all(isinstance(item, tuple | list) for item in dataset)  # a list of examples: a dataset
    ):
        bad = [f"{type(t).__name__} at position {i}" for i, t in enumerate(dataset) if not isinstance(t, torch.Tensor)]
        if bad or not dataset:
            raise TypeError(
                f"{what}: expected {ACCEPTED_DATA}, got a {type(dataset).__name__} holding "
                f"{', '.join(bad) or 'nothing'}: convert each column with torch.as_tensor, or wrap the examples in "
                "a Dataset (e.g. TensorDataset(images, labels))"
            )
        columns = tuple(dataset)
    elif isinstance(dataset, Mapping | str | bytes | torch.Tensor) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        hint = " (a bare tensor: wrap it as TensorDataset(images))" if isinstance(dataset, torch.Tensor) else ""
        raise TypeError(f"{what}: expected {ACCEPTED_DATA}, got {type(dataset).__name__}{hint}")
    else:
        n = len(dataset)
        if n == 0:
            raise ValueError(f"{what}: expected a non-empty dataset, got 0 examples")
        items = [dataset[i] for i in range(n)]
        rows: list[tuple[Any, ...]] = []
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                rows.append((item,))
            elif isinstance(item, tuple | list):
                rows.append(tuple(item))
            else:
                keys = f" with keys {sorted(map(str, item))}" if isinstance(item, Mapping) else ""
                raise TypeError(
                    f"{what}: expected {ACCEPTED_DATA}; example {i} is a {type(item).__name__}{keys}: return "
                    "(image, label) tuples from the dataset's __getitem__"
                )
            if len(rows[-1]) != len(rows[0]):
                raise ValueError(
                    f"{what}: expected every example to have {len(rows[0])} fields like example 0, example {i} "
                    f"has {len(rows[-1])}"
                )
        stacked = []
        for k in range(len(rows[0])):
            values = [_column_value(row[k], what, i, k) for i, row in enumerate(rows)]
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"{what}: expected field {k} to have one shape in every example, got {sorted(shapes)}")
            stacked.append(torch.stack(values))
        columns = tuple(stacked)
    if not columns or columns[0].dim() == 0 or columns[0].shape[0] == 0:
        raise ValueError(f"{what}: expected a non-empty dataset, got 0 examples")
    lengths = [int(t.shape[0]) if t.dim() else 0 for t in columns]
    if len(set(lengths)) > 1:
        raise ValueError(f"{what}: expected columns with one row per example, got lengths {lengths}")
    return columns


def check_labels(
    labels: Any,
    n: int,
    what: str = "training labels",
    *,
    num_classes: int | None = None,
    kind: str = "class indices",
) -> torch.Tensor:
    """Class-index labels as a new int64 tensor ``(n,)`` (the caller's tensor is not modified).

    Accepted: a tensor of any integer dtype (converted), or a float tensor whose values are all whole numbers
    (converted exactly). Refused with a ``ValueError`` naming the bad value: fractional or non-finite floats,
    negative indices, indices ``>= num_classes`` (when given), bool or complex labels, another shape (one-hot
    or soft labels ``(n, K)``: pass ``labels.argmax(1)``); with a ``TypeError``: anything but a tensor.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor of {kind} ({n},), got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{what}: expected integer {kind}, got {labels.dtype}")
    if tuple(labels.shape) != (n,):
        hint = " (one-hot or soft labels: pass labels.argmax(1))" if labels.dim() == 2 and labels.shape[0] == n else ""
        raise ValueError(f"{what}: expected {kind} of shape ({n},), got {labels.dtype} {tuple(labels.shape)}{hint}")
    if labels.is_floating_point():
        bad = ~torch.isfinite(labels) | (labels != labels.round())
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{what}: expected whole-number {kind}, got {labels[i].item():.6g} at row {i} ({labels.dtype} labels "
                "are converted only when every value is a whole number)"
            )
    out = labels.detach().to("cpu", torch.int64, copy=True)
    if out.numel():
        low, high = int(out.min()), int(out.max())
        top = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        if low < 0 or (num_classes is not None and high >= num_classes):
            value = low if low < 0 else high
            raise ValueError(f"{what}: expected {kind} in {top}, got {value} at row {int((out == value).nonzero()[0, 0])}")
    return out


def image_label_tensors(data: Any, what: str = "training") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a classifier's ``what`` data, checked: images float ``(N, C, H, W)`` in [0, 1],
    labels int64 ``(N,)`` (:func:`check_labels`); further columns are ignored. See :func:`dataset_tensors`."""
    columns = dataset_tensors(data, f"{what} data")
    if len(columns) < 2:
        raise ValueError(f"{what} data: expected (image, label) pairs, got {len(columns)} field(s) per example")
    images = columns[0].detach().cpu()
    check_images(images, f"{what} images")
    return images, check_labels(columns[1], int(images.shape[0]), f"{what} labels")


def check_class_count(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, what: str = "training labels"
) -> None:
    """Raise unless every label is below the number of logits ``model`` returns for two of ``images`` (probed in
    eval mode without gradients; the model's modes are restored)."""
    with torch.no_grad(), frozen(model):
        logits = model(images[:2].to(device))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"classifier {type(model).__name__}: expected logits (B, K), got {got}")
    check_labels(labels, int(labels.shape[0]), what, num_classes=int(logits.shape[1]))


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
            ckpt = load_checkpoint(ckpt_path)
            _check_resumable(ckpt, config, extendable, ckpt_path)
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
            segments = _segments(ckpt)
            sums, count = dict(ckpt["running_sums"]), int(ckpt["running_count"])
            counts = dict(ckpt.get("running_counts") or {k: count for k in sums})
        else:
            sums, count, counts = {}, 0, {}
            segments = []
        began = time.perf_counter()
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
                save_checked(
                    {
                        "step": done,
                        "config": _config_record(config),
                        "trainer": config.trainer,
                        "settings": _plain(dict(config.settings)),
                        "state": {name: obj.state_dict() for name, obj in state.items()},
                        "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                        "history": history,
                        "running_sums": sums,
                        "running_count": count,
                        "running_counts": counts,
                        "segments": [*segments, _segment(start, done, time.perf_counter() - began, dev)],
                    },
                    ckpt_path,
                )
                atomic_write_text(ckpt_path.parent / "history.json", json.dumps(history, indent=1))
    return history


def _segment(start: int, end: int, seconds: float, device: torch.device) -> dict[str, Any]:
    """One process's share of a run: steps ``[start, end)``, its wall seconds, device and threads."""
    return {"steps": [start, end], "seconds": round(seconds, 1), "device": str(device),
            "threads": torch.get_num_threads()}  # fmt: skip


def _segments(ckpt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The processes that trained a checkpoint, oldest first; a checkpoint written before segments were recorded
    gets one segment of unknown time for the steps it had done."""
    if "segments" in ckpt:
        return [dict(s) for s in ckpt["segments"]]
    return [{"steps": [0, int(ckpt["step"])], "seconds": None, "device": None, "threads": None}]


def training_time(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The wall time of the run whose checkpoint is in ``checkpoint_dir``, over every process that trained it.

    Returns ``{"seconds": total or None, "segments": [...]}``: the total is ``None`` when a segment's time was
    not recorded (its checkpoint predates the record). ``None`` when there is no checkpoint.
    """
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    segments = _segments(load_checkpoint(path))
    times = [s["seconds"] for s in segments]
    total = None if any(t is None for t in times) else round(sum(times), 1)
    return {"seconds": total, "segments": segments}


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`run_loop`, verifying its integrity hash.

    Raises:
        IntegrityError: the file is cut, altered, empty or not a checkpoint of this library, or a checkpoint of
            the older unchecked format (``scripts/upgrade_checkpoint.py`` converts those).
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip format: written before checkpoints carried a hash and settings
        raise IntegrityError(
            f"training checkpoint {path} is in the older format (plain torch.save: no integrity hash, no record of "
            "the settings that define its run); convert it once with `python scripts/upgrade_checkpoint.py "
            "<arguments of the python -m eval command that resumes it>` (see the script), or delete it to train "
            "from the start"
        )
    ckpt = load_checked(
        path,
        what="training checkpoint",
        recover="it cannot be resumed; delete it (or use a fresh checkpoint directory) to train from the start",
    )
    if not isinstance(ckpt, dict) or not {"step", "config", "state"} <= set(ckpt):
        raise IntegrityError(f"training checkpoint {path} is not a checkpoint of run_loop: use a fresh directory")
    return ckpt


def _check_resumable(ckpt: Mapping[str, Any], config: LoopConfig, extendable: bool, path: Path) -> None:
    """Refuse a checkpoint of another trainer, other settings or another schedule, naming what differs."""
    saved_trainer = ckpt.get("trainer", "")
    if saved_trainer != config.trainer:
        raise ValueError(
            f"checkpoint {path} was written by the {saved_trainer or 'unnamed'!s} trainer, this run is the "
            f"{config.trainer or 'unnamed'} trainer: use a fresh checkpoint directory"
        )
    saved = dict(ckpt.get("settings") or {})
    wanted = _plain(dict(config.settings))
    differ = [
        f"{k}: checkpoint {saved.get(k, '(absent)')!r}, this run {wanted.get(k, '(absent)')!r}"
        for k in sorted(set(saved) | set(wanted))
        if saved.get(k, "(absent)") != wanted.get(k, "(absent)")
    ]
    if differ:
        may = "the step target, checkpoint and logging intervals" if extendable else "checkpoint and logging intervals"
        raise ValueError(
            f"checkpoint {path} was trained with other settings ({'; '.join(differ)}): resume with the "
            f"checkpoint's settings or use a fresh checkpoint directory (only settings the checkpoint does not "
            f"record may change on resume of the {config.trainer or 'unnamed'} trainer: {may}, and any other its "
            "config lists in RESUME_MAY_CHANGE)"
        )
    if not _compatible(ckpt.get("config"), config, extendable):
        record, old = _config_record(config), ckpt.get("config")
        old_record = old if isinstance(old, dict) else {}
        keys = sorted(k for k in set(record) | set(old_record) if old_record.get(k) != record.get(k))
        if extendable:
            keys = [k for k in keys if k != "steps"]
        named = ", ".join(
            "bound_to (the frozen models it was trained against, e.g. the generator's weights)" if k == "bound_to"
            else k
            for k in keys
        )
        raise ValueError(
            f"checkpoint {path} was written by another run ({named or 'config'} differ: checkpoint {old}, "
            f"this run {record}): use a fresh checkpoint directory"
        )


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
