"""``run_robustness``: the robustness harness as a Python API, over any classifier, generator and tensors.

Usage (any classifier, any generator, tensors)::

    defenses = [undefended_defense(clf), projection_defense("projection-fast", clf, gen, config, encoder=enc)]
    record = run_robustness(RobustnessSettings(n=100), defenses, x, y, Path("runs/rob"), generator=gen,
                            encoder=enc, latent_config=config)

One call for a model or a purifier defense, returning a typed report (:mod:`eval.harness.report`)::

    defended = PurifiedClassifier(clf, my_purifier, randomized=True)
    report = evaluate_robustness(defended, x, y, threats=["linf-0.1"], settings=RobustnessSettings.quick_preset())
    report["purified"].worst_case, report["purified"].flags

The cascade, verdict rule, surrogates, resume and sharding: :mod:`eval.harness` (package docs).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from eval.harness import state as st
from eval.harness.cascade import CLEAN_DOC
from eval.harness.defenses import Defense, purifier_defense, undefended_defense
from eval.harness.flags import FLAGS
from eval.harness.record import CONVERGENCE, CONVERGENCE_DOC, defense_record
from eval.harness.registry import StageKey, stage, stage_keys
from eval.harness.report import RobustnessReport
from eval.harness.runner import Runner
from eval.harness.settings import SCHEMA, STATE_FILE, RobustnessSettings
from eval.inputs import check_labeled_images
from eval.run_folder import claim_run_folder, run_folder_session
from manifold_defense import __version__
from manifold_defense.inversion import InversionConfig
from manifold_defense.purification import PurifiedClassifier
from manifold_defense.training.distributed import DistContext

__all__ = ["as_defense", "evaluate_robustness", "run_robustness", "summary_json", "tensors_from_loader"]


@run_folder_session()  # the folder stays locked against other writers until the call returns
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
    report_partial: bool = False,
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
        report_partial: run nothing; write the outputs of a stopped run from its saved state, every stage it
            did not reach recorded as not run (the ``incomplete`` flag: its figures are upper bounds). The state
            file is left as it was, so the same command without this option resumes the run.

    Returns:
        The results record (also ``out/results.json``), schema in :mod:`eval.robustness_report`.

    Raises:
        StateMismatchError: ``out`` holds another run's state or foreign files.
        ValueError / TypeError: unknown names, bad tensors, a model whose output is not ``(B, K)`` logits.
    """
    from eval.robustness_report import write_outputs

    defenses = _checked(settings, defenses, x, y)
    ctx = ctx if ctx is not None else DistContext(0, 1, x.device)
    x, y = x[: settings.n].detach(), y[: settings.n].detach()
    out = Path(out)
    extra = {"generator": None if generator is None else type(generator).__name__, "latent_config": latent_config,
             "order": [d.name for d in defenses]}  # fmt: skip
    fp = st.fingerprint(settings, defenses, x, y, extra)
    if generator is not None:
        fp["generator"] = st.generator_hash(generator)
    state = _open_state(out, fp, command, fresh, ctx)
    resumed = len(state["stages"])
    start = time.perf_counter()
    everyone = list(defenses)
    if report_partial:
        defenses = _fill_not_run(settings, defenses, state)
    runner = Runner(
        settings, list(defenses), x, y, out, ctx, generator, encoder, latent_config, state, progress, on_stage
    )
    runner.persist = not report_partial
    runner.run()
    record = _results(settings, defenses, state, x, ctx, meta, resumed, start)
    if report_partial:
        record["incomplete"] = sorted(k for k, v in state["stages"].items() if isinstance(v, dict) and v.get("not_run"))
        record["not_started"] = [d.name for d in everyone if d not in defenses]
    if ctx.is_main:
        if not report_partial:  # (a partial report leaves the state as the stopped run saved it)
            st.save_state(state, out)
        write_outputs(record, state["stages"], out)
    if ctx.distributed:
        ctx.barrier()
    return record


#: Why a stage of a ``--report-partial`` record has no figure.
NOT_RUN = "not run: the run was stopped before this stage (--report-partial); resume with the same command"


def _fill_not_run(
    settings: RobustnessSettings, defenses: Sequence[Defense], state: dict[str, Any]
) -> list[Defense]:
    """The defenses a stopped run started (its clean accuracy saved), with placeholders (status ``skipped``,
    ``not_run``) for every attack stage it did not reach, so the record can be written; ``ValueError`` when no
    defense has even its clean accuracy."""
    started = [
        d for d in defenses if all(StageKey(d.name, None, a).text in state["stages"] for a in ("info", "clean"))
    ]
    if not started:
        raise ValueError(
            "expected a stopped run with the clean accuracy of some defense saved, got none: there is nothing to "
            "report yet"
        )
    for d in started:
        for key in stage_keys(settings, d.name, d.preprocess is not None):
            if key.text in state["stages"] or key.attack == "examples":  # grids: built from saved examples
                continue
            if key.threat is None:  # the projection figures of a preprocessing defense
                raise ValueError(f"expected the {key.attack!r} stage of defense {d.name!r} saved, got none")
            state["stages"][key.text] = {"status": "skipped", "reason": NOT_RUN, "not_run": True}
            state.setdefault("partial", {}).pop(key.text, None)
    return started


def _results(
    settings: RobustnessSettings,
    defenses: Sequence[Defense],
    state: dict[str, Any],
    x: Tensor,
    ctx: DistContext,
    meta: Mapping[str, Any] | None,
    resumed: int,
    start: float,
) -> dict[str, Any]:
    """The results record of a finished run (schema in :mod:`eval.robustness_report`)."""
    for d in defenses:
        state["stages"][StageKey(d.name, None, "info").text]["dim"] = int(x[0].numel())
    return {
        "schema": SCHEMA,
        "version": __version__,
        "threat_models": list(settings.threats),
        "n": settings.n,
        "image_shape": list(x.shape[1:]),
        "settings": settings.to_json(),
        "quick": settings.quick,
        "lean": settings.lean,
        "reduced_vs_full": settings.reductions(),
        **dict(meta or {}),
        "world_size": ctx.world_size,
        "resumed_stages": resumed,
        "seconds_this_call": round(time.perf_counter() - start, 1),
        "seconds_stages": round(
            sum(float(v.get("seconds", 0.0)) for v in state["stages"].values() if isinstance(v, dict)), 1
        ),
        "attack_definitions": {"clean": CLEAN_DOC}
        | {a: stage(a).doc for a in settings.attacks[1:]}
        | {CONVERGENCE: CONVERGENCE_DOC},
        "flag_definitions": dict(FLAGS),
        "defenses": {d.name: defense_record(settings, state["stages"], d.name) for d in defenses},
    }


def _checked(
    settings: RobustnessSettings, defenses: Sequence[Defense], x: Tensor, y: Tensor
) -> list[Defense]:
    """The defenses as a list, after checking the settings, the defenses and the data (``TypeError`` /
    ``ValueError`` naming what was expected)."""
    if not isinstance(settings, RobustnessSettings):
        raise TypeError(f"expected settings as RobustnessSettings, got {type(settings).__name__}")
    defenses = list(defenses)
    if not defenses or not all(isinstance(d, Defense) for d in defenses):
        raise TypeError("expected a non-empty sequence of Defense objects")
    names = [d.name for d in defenses]
    if len(set(names)) != len(names):
        raise ValueError(f"expected distinct defense names, got {names}")
    check_labeled_images(x, y, settings.n)
    return defenses


def _open_state(out: Path, fp: dict[str, Any], command: str, fresh: bool, ctx: DistContext) -> dict[str, Any]:
    """Claim ``out`` and read its saved state (rank 0; ``fresh`` discards it first), then share it with every
    rank."""
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
    return state


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


def as_defense(model: Defense | nn.Module, name: str | None = None) -> Defense:
    """``model`` as a :class:`Defense`: a :class:`~manifold_defense.purification.PurifiedClassifier` becomes
    :func:`~eval.harness.defenses.purifier_defense` of its parts (default name ``"purified"``), any other module
    the bare model (``"undefended"``); a :class:`Defense` is returned as it is (``name`` must then be ``None``)."""
    if isinstance(model, Defense):
        if name is not None and name != model.name:
            raise ValueError(f"expected no other name for the Defense {model.name!r}, got {name!r}")
        return model
    if isinstance(model, PurifiedClassifier):
        exact: nn.Module | bool | None = True if model.exact_is_purifier else model.exact
        return purifier_defense(
            name or "purified", model.classifier, model.purifier, randomized=model.randomized,
            surrogates=dict(model.surrogates.items()), exact=exact, seed=model.seed,
        )  # fmt: skip
    if isinstance(model, nn.Module):
        return undefended_defense(model, name or "undefended")
    raise TypeError(f"expected a Defense, a PurifiedClassifier or an nn.Module, got {type(model).__name__}")


def evaluate_robustness(
    defenses: Defense | nn.Module | Sequence[Defense | nn.Module] | Mapping[str, nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    threats: Sequence[str] | None = None,
    settings: RobustnessSettings | None = None,
    out: Path | str | None = None,
    generator: nn.Module | None = None,
    encoder: nn.Module | None = None,
    latent_config: InversionConfig | None = None,
    progress: bool = False,
) -> RobustnessReport:
    """Evaluate models or purifier defenses on ``(x, y)`` under a list of threats: the whole cascade, verdicts
    on the real defense, transfer counts and red flags, as a typed :class:`~eval.harness.report.RobustnessReport`.

    Args:
        defenses: one model or a sequence of them, or ``name -> model``; each a
            :class:`~manifold_defense.purification.PurifiedClassifier` (every stage its variants allow), a bare
            classifier, or a :class:`Defense` (:func:`as_defense`).
        x: ``(N, C, H, W)`` images in [0, 1]; y: ``(N,)`` int64 labels on the same device. Neither is modified.
        threats: threat models, e.g. ``["linf-0.3", "l2-2"]`` (replace the settings'); required for images of
            another shape than MNIST's unless the settings name them.
        settings: :class:`RobustnessSettings` (e.g. :meth:`RobustnessSettings.quick_preset`); default the full
            protocol on all ``N`` points. Images of another shape than MNIST's get curve budgets derived from the
            threats (:func:`eval.harness.settings.default_curve_eps`).
        out: folder for ``report.md``, ``results.json`` and the plots (resumable there); ``None``: a temporary
            folder, removed on return.
        generator, encoder, latent_config: for the latent attacks (skipped without a generator).
        progress: progress bar.

    Raises:
        ValueError / TypeError: as :func:`run_robustness`; MNIST's default threats on images of another shape.
    """
    from eval.harness.settings import MNIST_SHAPE, default_curve_eps

    if isinstance(defenses, Mapping):
        built = [as_defense(m, n) for n, m in defenses.items()]
    elif isinstance(defenses, (Defense, nn.Module)):
        built = [as_defense(defenses)]
    else:
        built = [as_defense(m) for m in defenses]
    shape = tuple(int(s) for s in x.shape[1:]) if isinstance(x, Tensor) else ()
    if settings is None:
        if threats is None and shape != MNIST_SHAPE:
            raise ValueError(
                f"the images have shape {shape}, not MNIST's {MNIST_SHAPE}: the default threat models are "
                "MNIST's budgets; pass threats=[NORM-EPS, ...] chosen for your images"
            )
        settings = RobustnessSettings(n=len(x) if isinstance(x, Tensor) else 1)
    if not isinstance(settings, RobustnessSettings):
        raise TypeError(f"expected settings as RobustnessSettings, got {type(settings).__name__}")
    if threats is not None:
        settings = dataclasses.replace(settings, threats=tuple(threats))
    if shape != MNIST_SHAPE and (settings.curve_eps_linf or settings.curve_eps_l2):
        curve: dict[str, Any] = dict(default_curve_eps(settings.threats, shape))
        settings = dataclasses.replace(settings, **curve)
    kw: dict[str, Any] = dict(generator=generator, encoder=encoder, latent_config=latent_config)
    if out is not None:
        record = run_robustness(settings, built, x, y, Path(out), progress=progress, **kw)
        return RobustnessReport.from_record(record, Path(out))
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        record = run_robustness(settings, built, x, y, Path(tmp) / "run", progress=progress, **kw)
    return RobustnessReport.from_record(record, None)
