"""Resumable state and sharding of the harness: the run's fingerprint, the saved ``state.pt``, per-chunk seeds and
the chunk runner that splits a stage's points over ``torchrun`` ranks.

Resume: after every ``(defense, threat, attack)`` stage rank 0 writes ``DIR/state.pt`` (atomic replace through a
temporary file unique to the writer, behind a SHA-256 header: :mod:`manifold_defense.integrity`), keyed by
a fingerprint of the settings, the data, the models' parameters and the package version that wrote it; a later call
with the same fingerprint skips the finished stages, one with a different fingerprint is refused (never mixed),
and a state written by another version of manifold-defense is refused naming that version. Within a stage rank 0 also saves
each chunk it finishes (and the starting latents of the latent attacks), so a long stage resumes at its first
missing chunk; chunks of other ranks are redone. A state file that fails its hash (cut, altered, empty, random,
or written by an older version without one) is refused naming the file, never read into a figure.

Sharding: every stage splits the global (sorted) list of points it attacks into chunks; each chunk runs under its
own seed, a function of the run's seed, the stage and the chunk's first *global* point index, and randomized
modules are reseeded per chunk. Under ``torchrun`` rank ``r`` computes chunks ``r, r + W, ...`` and the results
are gathered (gloo on CPU, NCCL on CUDA), so ``W`` processes give exactly the table of one process.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eval.harness.defenses import Defense
from eval.harness.settings import SCHEMA, STATE_FILE, RobustnessSettings, jsonable
from eval.run_folder import MARKER as RUN_MARKER
from eval.run_folder import is_bookkeeping
from manifold_defense import __version__
from manifold_defense.integrity import load_checked, save_checked
from manifold_defense.training.distributed import DistContext

__all__ = [
    "COST_PARTS",
    "StateMismatchError",
    "chunk_seed",
    "fingerprint",
    "load_state",
    "run_chunks",
    "save_state",
    "seeded",
]


class StateMismatchError(ValueError):
    """The output folder holds another run's state (different settings, data or models)."""


def _hash_tensor(h: Any, t: Tensor) -> None:
    h.update(str(tuple(t.shape)).encode())
    h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())


#: Settings that a resumed run may change (left out of its fingerprint): they only add stages.
LADDER_SETTINGS = ("convergence_rounds",)


def fingerprint(
    settings: RobustnessSettings, defenses: Sequence[Defense], x: Tensor, y: Tensor, extra: Any
) -> dict[str, Any]:
    """What identifies a run: harness schema and package version, settings, data hash, each defense's name and
    parameter hash (its surrogates' and query stand-in's names, parameters and configuration included), extra
    settings.

    The settings leave out :data:`LADDER_SETTINGS` (``convergence_rounds``): every rerun of the convergence ladder is
    a stage of its own that records its configuration, so a finished run resumed with more rounds extends its
    ladder instead of being refused."""
    h = hashlib.sha256()
    _hash_tensor(h, x)
    _hash_tensor(h, y)
    models = {}
    for d in defenses:
        hm = hashlib.sha256()
        plain = (d.model, d.classifier, d.preprocess, d.bpda_model, d.unrolled_model)
        mods = [m for m in d.modules() if any(m is p for p in plain)]
        for m in mods:
            for p in list(m.parameters()) + list(m.buffers()):
                _hash_tensor(hm, p)
            hm.update(m.extra_repr().encode())
        for key, m in d.surrogates.items():
            hm.update(f"surrogate {key} {d.surrogate == key}".encode())
            for p in list(m.parameters()) + list(m.buffers()):
                _hash_tensor(hm, p)
            for sub in m.modules():
                hm.update(sub.extra_repr().encode())
        if d.query_stand_in is not None:
            key, m = d.query_stand_in
            hm.update(f"query stand-in {key}".encode())
            for p in list(m.parameters()) + list(m.buffers()):
                _hash_tensor(hm, p)
            for sub in m.modules():
                hm.update(sub.extra_repr().encode())
        models[d.name] = hm.hexdigest()[:16]
    return {
        "schema": SCHEMA,
        "version": __version__,
        "settings": {k: v for k, v in settings.to_json().items() if k not in LADDER_SETTINGS},
        "data": h.hexdigest()[:16],
        "defenses": models,
        "extra": jsonable(extra),
    }


def generator_hash(generator: torch.nn.Module) -> str:
    """A short SHA-256 of a generator's parameters (part of the fingerprint when the latent attacks use it)."""
    h = hashlib.sha256()
    for p in generator.parameters():
        _hash_tensor(h, p)
    return h.hexdigest()[:16]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: saved {a!r}, now {b!r}"]


#: How to recover from a state file that fails its integrity check (the message of :class:`IntegrityError`).
RECOVER = (
    "its stages cannot be trusted: run the same command with --fresh (fresh=True) to discard it and recompute "
    "the run, or use a new --out"
)


def load_state(out: Path, fp: dict[str, Any]) -> dict[str, Any]:
    """The saved state in ``out`` if it matches ``fp``; a fresh one if there is none; refuse another run's.

    Raises:
        IntegrityError: ``state.pt`` does not match the SHA-256 written with it (cut, altered, empty, random) or
            was written by an older version without one; the message names the file and how to recompute.
        StateMismatchError: the state is another run's, was written by another version of manifold-defense
            (named), or ``out`` holds other files and no state.
    """
    path = out / STATE_FILE
    if not path.exists():
        foreign = (
            [p.name for p in out.iterdir() if p.name != RUN_MARKER and not is_bookkeeping(p.name)]
            if out.exists()
            else []
        )
        if foreign:
            raise StateMismatchError(
                f"expected {out} to be empty or to hold a robustness run's {STATE_FILE}, got other files "
                f"{sorted(foreign)[:5]}: choose another output folder"
            )
        return {"fingerprint": fp, "stages": {}}
    # verified against its SHA-256, then read with weights_only=True: tensors and plain data only, no code runs
    state = load_checked(path, what="robustness harness state", recover=RECOVER)
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise StateMismatchError(f"expected {path} to be a robustness state file, got {type(state).__name__}")
    _check_version(path, state["fingerprint"])
    if state["fingerprint"] != fp:
        diff = _diff(state["fingerprint"], fp)
        raise StateMismatchError(
            f"{out} holds another run's state (refusing to mix results); differences: {'; '.join(diff[:6])}"
            f"{' ...' if len(diff) > 6 else ''}. Use the same settings to resume, another --out, or --fresh to "
            "discard it"
        )
    return state


def writer(fp: Any) -> str:
    """The version of manifold-defense that wrote a state's fingerprint ``fp``, in words."""
    fp = fp if isinstance(fp, dict) else {}
    if isinstance(fp.get("version"), str):
        return f"manifold-defense {fp['version']} ({fp.get('schema')})"
    return f"a version of manifold-defense older than {__version__}'s harness (it records no version; {fp.get('schema')})"


def _check_version(path: Path, fp: Any) -> None:
    """Refuse a state written by another version of manifold-defense, naming it."""
    if isinstance(fp, dict) and fp.get("version") == __version__ and fp.get("schema") == SCHEMA:
        return
    raise StateMismatchError(
        f"{path} was written by {writer(fp)}; this is manifold-defense {__version__} ({SCHEMA}), which does not "
        "read its stages: run the same command with --fresh (fresh=True) to recompute the run, or use another --out"
    )


def save_state(state: dict[str, Any], out: Path) -> None:
    """Write ``state`` to ``out/state.pt`` behind its SHA-256, atomically (a temporary file unique to this writer,
    then ``os.replace``: a kill leaves the previous state).

    Raises:
        DiskFullError: no space left (the previous ``state.pt`` is unchanged; free space and run again to resume).
    """
    save_checked(state, out / STATE_FILE)


def chunk_seed(seed: int, stage: str, first: int) -> int:
    """The seed of the chunk of ``stage`` whose first global point index is ``first``."""
    return zlib.crc32(f"{seed}|{stage}|{first}".encode()) + seed


@contextmanager
def seeded(seed: int, defense: Defense, device: torch.device) -> Iterator[None]:
    """Fork the global RNG at ``seed`` and reseed the randomized modules of the defense (surrogates included)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for root in defense.modules():
            for m in root.modules():
                reseed = getattr(m, "reseed", None)
                if callable(reseed) and getattr(m, "randomize", True):
                    reseed(seed)
        yield


#: Per-point bookkeeping entries :func:`run_chunks` adds to every chunk's result (each point carries its chunk's
#: total divided by the chunk's size, so the sum over a stage's points is the stage's total, resumed chunks
#: included): ``chunk_seconds`` (seconds of this process in the chunk) and ``real_rows`` (rows through the forward
#: pass of the defended model, its BPDA variant or its preprocessing: for a projection defense, real projections).
COST_PARTS = ("chunk_seconds", "real_rows")


def _real_modules(defense: Defense) -> list[torch.nn.Module]:
    """``defense.model``, ``defense.bpda_model`` and ``defense.preprocess``, without one nested inside another (no
    double count)."""
    found = [m for m in (defense.model, defense.bpda_model, defense.preprocess) if m is not None]
    found = [m for i, m in enumerate(found) if all(m is not o for o in found[:i])]
    return [m for m in found if not any(o is not m and any(s is m for s in o.modules()) for o in found)]


@contextmanager
def _counting_rows(modules: Sequence[torch.nn.Module]) -> Iterator[list[int]]:
    """Count the rows (first dimension of the first tensor argument) passed to the forward of ``modules``.

    Yields a one-element list holding the running count; the hooks are removed on exit.
    """
    count = [0]

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
            count[0] += int(args[0].shape[0])

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def run_chunks(
    state: dict[str, Any],
    key: str,
    defense: Defense,
    indices: Tensor,
    size: int,
    fn: Callable[[Tensor], dict[str, Tensor]],
    *,
    seed: int,
    ctx: DistContext,
    device: torch.device,
    save: Callable[[], None],
    on_chunk: Callable[[str], None] | None = None,
) -> dict[str, Tensor]:
    """Split ``indices`` into chunks of ``size``, run this rank's share under per-chunk seeds, gather.

    A chunk finished by an interrupted run (saved in ``state["partial"][key]`` with the same point indices) is
    reused instead of recomputed; every chunk runs under its own seed (:func:`chunk_seed`), so reuse changes no
    other chunk. Rank 0 saves its chunks after each one; under ``torchrun`` other ranks' unfinished chunks are
    redone. Returns the per-point results of every chunk, concatenated in chunk order (CPU tensors), with the
    :data:`COST_PARTS` entries added.
    """
    chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
    saved: dict[int, dict[str, Any]] = state.setdefault("partial", {}).setdefault(key, {})
    mine: list[tuple[int, dict[str, Tensor]]] = []
    for j, chunk in enumerate(chunks):
        if j % ctx.world_size != ctx.rank:
            continue
        if on_chunk is not None:
            on_chunk(f"{key} chunk {j + 1}/{len(chunks)}")
        done = saved.get(j)
        if done is not None and torch.equal(done["indices"], chunk.cpu()):
            mine.append((j, done["result"]))
            continue
        start = time.perf_counter()
        with (
            seeded(chunk_seed(seed, key, int(chunk[0])), defense, device),
            _counting_rows(_real_modules(defense)) as rows,
        ):
            result = fn(chunk)
        share = torch.full((len(chunk),), 1.0 / len(chunk), dtype=torch.float64)
        cost = {"chunk_seconds": share * (time.perf_counter() - start), "real_rows": share * rows[0]}
        mine.append((j, {k: v.detach().cpu() for k, v in result.items()} | cost))
        if len(chunks) > 1:
            saved[j] = {"indices": chunk.cpu(), "result": mine[-1][1]}
            save()
    if ctx.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, mine)
        mine = [item for part in gathered for item in part]
    mine.sort(key=lambda item: item[0])
    if not mine:
        return {}
    return {k: torch.cat([r[k] for _, r in mine]) for k in mine[0][1]}
