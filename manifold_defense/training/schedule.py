"""Learning-rate schedule of the GAN trainer and the guard that keeps a resumed run on the schedule it started.

:class:`ScheduleGuard` is part of a run's checkpointed state (:func:`manifold_defense.training.loop.run_loop`
saves and loads it like a module). The settings that shape every step (learning rate, objective, betas, batch
size...) are recorded and checked by the loop itself (:attr:`~manifold_defense.training.loop.LoopConfig.settings`);
the step target and the step where the decay starts may change on resume, as long as the learning rates of the
steps already done stay the same, which is what this guard checks.
"""

from __future__ import annotations

from typing import Any


def linear_decay_lr(lr: float, steps: int, decay_from: int | None, step: int) -> float:
    """The rate of step ``step`` (0-based): ``lr`` until ``decay_from``, then linear to 0 at ``steps``."""
    if decay_from is None or step < decay_from:
        return lr
    return lr * (steps - step) / (steps - decay_from)


class ScheduleGuard:
    """Checkpointed record of the learning-rate schedule the steps so far followed, checked on resume.

    ``config`` needs ``lr``, ``steps``, ``lr_decay_from`` and ``lr_at(step)``. A resume whose decay schedule
    (``lr_decay_from`` over ``steps``) would give other rates for the steps already done is refused. Checkpoints
    written before the guard existed carry none: they were constant-rate runs, accepted when the new schedule is
    constant up to their step.
    """

    optional_in_checkpoint = True

    def __init__(self, config: Any) -> None:
        self.config = config
        self.saved: dict[str, Any] | None = None
        self.legacy = False
        self.done = 0

    def state_dict(self) -> dict[str, Any]:
        c = self.config
        return {"lr_decay_from": c.lr_decay_from, "steps": c.steps, "done": self.done}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            self.legacy = True
            return
        self.saved = dict(saved)

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
