"""Learning-rate schedule of the GAN trainer and the guard that keeps a resumed run on the schedule it started.

:class:`ScheduleGuard` is part of a run's checkpointed state (:func:`manifold_defense.training.loop.run_loop`
saves and loads it like a module), so a resume with another learning rate, objective or decay is refused instead of
silently producing weights that no single command describes.
"""

from __future__ import annotations

from typing import Any


def linear_decay_lr(lr: float, steps: int, decay_from: int | None, step: int) -> float:
    """The rate of step ``step`` (0-based): ``lr`` until ``decay_from``, then linear to 0 at ``steps``."""
    if decay_from is None or step < decay_from:
        return lr
    return lr * (steps - step) / (steps - decay_from)


class ScheduleGuard:
    """Checkpointed record of the settings that shaped the optimizer steps so far, checked on resume.

    The loop's own config record holds only steps, batch size and seed; this refuses a resume whose learning rate,
    objective or other update settings differ from the checkpoint's, or whose decay schedule would differ over
    the steps already done. Checkpoints written before the guard existed carry none: they were constant-rate
    runs, accepted when the new schedule is constant up to their step.
    """

    optional_in_checkpoint = True
    _FIELDS = (
        "objective", "lr", "beta1", "beta2", "n_critic", "gp_weight", "ema_decay", "rec_weight", "batch_size", "pack",
    )  # fmt: skip

    def __init__(self, config: Any) -> None:
        self.config = config
        self.saved: dict[str, Any] | None = None
        self.legacy = False
        self.done = 0

    def state_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            **{f: getattr(c, f) for f in self._FIELDS},
            "lr_decay_from": c.lr_decay_from,
            "steps": c.steps,
            "done": self.done,
        }

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            self.legacy = True
            return
        self.saved = dict(saved)
        for f in self._FIELDS:
            if saved.get(f) != getattr(self.config, f):
                raise ValueError(
                    f"the checkpoint was trained with {f}={saved.get(f)!r}, this run asks for "
                    f"{f}={getattr(self.config, f)!r}: use a fresh checkpoint directory"
                )

    def check(self, start: int) -> None:
        """Refuse to continue from step ``start`` when the learning rates of steps ``0..start-1`` would differ."""
        c = self.config
        if self.saved is None:
            if self.legacy and c.lr_decay_from is not None and start > c.lr_decay_from:
                raise ValueError(
                    f"the checkpoint (step {start}) was trained at a constant learning rate, but lr_decay_from="
                    f"{c.lr_decay_from} would have decayed it: set lr_decay_from >= {start}"
                )
            return
        old_from, old_steps = self.saved.get("lr_decay_from"), int(self.saved.get("steps", c.steps))
        probe = _schedule_probe(start, old_from, c.lr_decay_from)
        if any(linear_decay_lr(c.lr, old_steps, old_from, t) != c.lr_at(t) for t in probe):
            raise ValueError(
                f"the checkpoint (step {start}) followed lr_decay_from={old_from} over steps={old_steps}; "
                f"lr_decay_from={c.lr_decay_from} over steps={c.steps} gives other learning rates for the steps "
                "already done: resume with the checkpoint's schedule or use a fresh checkpoint directory"
            )


def _schedule_probe(start: int, *decay_from: int | None) -> list[int]:
    """Steps where two piecewise-linear schedules that agree there agree on all of ``0..start-1``."""
    points = {0, start - 1}
    for d in decay_from:
        if d is not None and d < start:
            points |= {d, min(d + 1, start - 1)}
    return sorted(p for p in points if 0 <= p < start)
