"""Compatibility name of the robustness harness: everything moved to :mod:`eval.harness` (split into settings,
defenses, state, stages, record and API modules). Import from :mod:`eval.harness` in new code."""

from eval.harness import *  # noqa: F403
from eval.harness import __all__ as __all__
