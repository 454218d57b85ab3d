"""Faults injected into harness runs and run folders: nothing lost, nothing silently wrong.

Each class of fault (issue 37) either recovers to exactly the uninterrupted result or is refused with one clear
line naming the file and how to recover:

- kills (an exception after a chunk's save; SIGKILL of a real process, twice in a row, once inside a write): the
  resumed run equals the uninterrupted one;
- ``state.pt`` flipped, cut, emptied, random or written by an older version: ``IntegrityError`` naming the file,
  never a figure; ``fresh=True`` recomputes the uninterrupted result;
- two writers into one folder: the second is refused naming the pid holding it; a dead writer's lock blocks nothing;
- temporary files unique to their writer (every writer of ``eval`` and the zoo goes through them);
- a full disk (``ENOSPC`` simulated in the write) at a state save, at ``run.json`` and at ``results.json``: one
  line, the previous file intact, a correct resume;
- ``run.json`` and ``results.json`` records: empty, altered, old, missing beside a corrupt results file;
- ``--out`` empty, whitespace, the project's own folder.

Tiny stand-in models of :mod:`tests.test_eval_robustness` (64-pixel images, a 2-d latent generator).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import eval.harness.state as state_module
import manifold_defense.integrity as integrity
from eval.cli import run
from eval.harness import run_robustness
from eval.harness.state import save_state
from eval.run_folder import (
    LOCK,
    MARKER,
    RunFolderBusyError,
    RunFolderError,
    claim_run_folder,
    read_record,
    run_folder_session,
    write_record,
)
from manifold_defense.integrity import DiskFullError, IntegrityError, checked_json, load_checked
from tests.test_eval_robustness import TINY_INVERSION, _strip_times, tiny_defenses, tiny_settings, tiny_setup

REPO = Path(__file__).resolve().parents[1]
#: Cheap settings with several chunks per stage (12 points, chunks of 3) and no curves.
KW: dict[str, Any] = {
    "attacks": ("clean", "pgd", "bpda-pgd"),
    "threats": ("linf-0.3",),
    "batch_size": 3,
    "curve_eps_linf": (),
    "curve_eps_l2": (),
}


def run_tiny(out: Path, *, fresh: bool = False) -> dict[str, Any]:
    """The tiny harness run of these tests (undefended and a projection defense) into ``out``."""
    setup = tiny_setup()
    return run_robustness(
        tiny_settings(**KW), tiny_defenses(setup), setup["x"], setup["y"], out, generator=setup["generator"],
        latent_config=TINY_INVERSION, progress=False, fresh=fresh,
    )  # fmt: skip


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run's defense records (times stripped) and its folder."""
    out = tmp_path_factory.mktemp("full")
    return {"defenses": _strip_times(run_tiny(out)["defenses"]), "out": out}


def _locked(out: Path) -> bool:
    """Whether some writer holds ``out``'s lock (a second open file description conflicts even in one process)."""
    fd = os.open(out / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if ".tmp" in p.name)


# ------------------------------------------------------------------------------------------ kill and resume
def _run_stopped_after_save(out: Path, at: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny run into ``out``, interrupted by an exception raised right after its ``at``-th state save; the
    real ``save_checked`` is back in place afterwards."""

    class Stopped(Exception):
        pass

    saves = [0]
    original = state_module.save_checked

    def save_then_stop(obj: Any, path: Any) -> None:
        original(obj, path)
        saves[0] += 1
        if saves[0] == at:
            raise Stopped

    monkeypatch.setattr(state_module, "save_checked", save_then_stop)
    with pytest.raises(Stopped):
        run_tiny(out)
    monkeypatch.setattr(state_module, "save_checked", original)


def test_exception_after_a_chunk_save_resumes_to_the_uninterrupted_result(
    tmp_path: Path, full: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook raising right after the 4th state save (a chunk of the first stage): the saved state is whole and
    the resumed run gives the uninterrupted figures."""

    _run_stopped_after_save(tmp_path, 4, monkeypatch)
    assert not _locked(tmp_path)  # the interrupted call let go of its folder
    saved = load_checked(tmp_path / "state.pt")
    assert any(saved["partial"].values()), "the interruption fell inside a stage: chunks were saved"
    resumed = run_tiny(tmp_path)
    assert _strip_times(resumed["defenses"]) == full["defenses"]
    assert _temps(tmp_path) == []


def test_a_stopped_run_reports_what_it_has_then_resumes_to_the_uninterrupted_result(
    tmp_path: Path, full: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``report_partial`` on a run stopped inside its cascade: results with the stages it did not reach listed as
    not run (flag ``incomplete``), the state file untouched; the same call without it resumes to the full run."""

    _run_stopped_after_save(tmp_path, 9, monkeypatch)
    before = (tmp_path / "state.pt").read_bytes()
    setup = tiny_setup()
    partial = run_robustness(
        tiny_settings(**KW), tiny_defenses(setup), setup["x"], setup["y"], tmp_path, generator=setup["generator"],
        latent_config=TINY_INVERSION, progress=False, report_partial=True,
    )  # fmt: skip
    assert (tmp_path / "state.pt").read_bytes() == before  # placeholders never reach the state
    assert partial["incomplete"] and read_record(tmp_path / "results.json")["incomplete"] == partial["incomplete"]
    for name, d in partial["defenses"].items():
        missing = [k for k in partial["incomplete"] if k.startswith(f"{name}|")]
        assert any(f["flag"] == "incomplete" for f in d["flags"]) == bool(missing)
        # what did run counts: the partial figure is never below the full run's (fewer attacks, an upper bound)
        for tk, acc in d["worst_case"].items():
            assert acc >= full["defenses"][name]["worst_case"][tk]
    assert partial["not_started"] == [n for n in full["defenses"] if n not in partial["defenses"]]
    resumed = run_tiny(tmp_path)
    assert "incomplete" not in resumed and _strip_times(resumed["defenses"]) == full["defenses"]


KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from pathlib import Path
import eval.harness.state as st
import manifold_defense.integrity as integrity
from tests.test_faults_harness import run_tiny

out, mode, at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
count = [0]
if mode == "after-save":  # SIGKILL right after the at-th state save
    original = st.save_checked
    def save_then_die(obj, path):
        original(obj, path)
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    st.save_checked = save_then_die
else:  # SIGKILL inside the at-th state write: its temporary file is written, not yet renamed
    original_replace = os.replace
    def die_before_rename(src, dst):
        if str(dst).endswith("state.pt"):
            count[0] += 1
            if count[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
        return original_replace(src, dst)
    integrity.os.replace = die_before_rename
run_tiny(out)
"""


def test_sigkill_twice_in_a_row_then_resume_gives_the_uninterrupted_result(
    tmp_path: Path, full: dict[str, Any]
) -> None:
    """A real process killed with SIGKILL inside a state write (leaving its temporary file and its lock behind),
    then again after a later chunk's save: neither blocks the folder, each resumes where the last whole state
    ends, and the third run gives the uninterrupted figures (the randomized projection defense included)."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    first = subprocess.run([sys.executable, str(script), str(out), "mid-write", "17"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert [n for n in _temps(out) if n.startswith(".state.pt.tmp-")], (
        "the killed write left its temporary file"
    )
    first_state = load_checked(out / "state.pt")  # the 16th save: the projection's clean stage, two chunks
    assert sorted(first_state["partial"]["projection-tiny|clean"]) == [0, 1]
    second = subprocess.run([sys.executable, str(script), str(out), "after-save", "5"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    # killed again, not refused: the dead run's lock is gone
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert _temps(out) == []  # the second run removed the first one's temporary file
    second_state = load_checked(out / "state.pt")  # resumed at chunk 2, killed inside the next stage
    assert set(first_state["stages"]) < set(second_state["stages"])
    assert sorted(second_state["partial"]["projection-tiny|projection"]) == [0, 1]
    resumed = run_tiny(out)
    assert resumed["resumed_stages"] > 0
    assert _strip_times(resumed["defenses"]) == full["defenses"]


# ------------------------------------------------------------------------------------ state.pt integrity
def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _old_version(path: Path) -> None:  # what the harness wrote before the integrity header
    torch.save(load_checked(path), path)


STATE_FAULTS: list[tuple[str, Callable[[Path], object], str]] = [
    ("flipped-byte", _flip, r"does not match the SHA-256 written with it \(the file was cut or altered\)"),
    ("cut", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), r"does not match the SHA-256"),
    ("empty", lambda p: p.write_bytes(b""), r"is empty"),
    ("random", lambda p: p.write_bytes(os.urandom(4096)), r"not a checked file"),
    ("older-version", _old_version, r"not a checked file \(no integrity header; an older version's"),
]


@pytest.mark.parametrize(("case", "fault", "message"), STATE_FAULTS, ids=[c[0] for c in STATE_FAULTS])
def test_a_damaged_state_is_refused_naming_the_file_never_a_figure(
    tmp_path: Path, full: dict[str, Any], case: str, fault: Callable[[Path], object], message: str
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for p in full["out"].iterdir():  # a finished run's folder
        (out / p.name).write_bytes(p.read_bytes())
    fault(out / "state.pt")
    with pytest.raises(IntegrityError, match=message) as err:
        run_tiny(out)
    assert f"robustness harness state {out / 'state.pt'}" in str(err.value)
    assert "--fresh" in str(err.value)
    assert not (out / "state.pt.tmp").exists() and _temps(out) == []


def test_a_flipped_state_recovers_with_fresh_and_is_one_line_on_the_command_line(
    tmp_path: Path, full: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for p in full["out"].iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    _flip(out / "state.pt")
    again = run_tiny(out, fresh=True)  # discards the damaged state, recomputes every stage
    assert again["resumed_stages"] == 0 and _strip_times(again["defenses"]) == full["defenses"]
    # the command line: one line naming the file, status 2
    argv, cli_out = _cli_args(tmp_path)
    assert run(argv) == 0
    _flip(cli_out / "state.pt")
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{cli_out / 'state.pt'} does not match the SHA-256" in err[0], err


# ------------------------------------------------------------------------------------ one writer per folder
HOLDER = """
import sys, time
from eval.run_folder import claim_run_folder
claim_run_folder(sys.argv[1], "robustness")
print("locked", flush=True)
time.sleep(120)
"""


@contextmanager
def _holder(out: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that claimed ``out`` and holds it until killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked", child.stderr
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def test_a_second_writer_is_refused_and_a_dead_writer_blocks_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with _holder(out) as child:
        with pytest.raises(
            RunFolderBusyError, match=rf"{out} is being written by another run \(pid {child.pid}"
        ):
            claim_run_folder(out, "robustness")
        # the command line: refused before loading anything, one line
        argv, _ = _cli_args(tmp_path, out)
        assert run(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is being written by another run (pid {child.pid}" in err[0], err
        assert not (out / "state.pt").exists() and not (out / "results.json").exists()
        # under torchrun, ranks other than 0 never lock (rank 0 owns the folder): they only check
        monkeypatch.setenv("RANK", "1")
        before = (out / MARKER).read_bytes()
        assert claim_run_folder(out, "robustness") == out and (out / MARKER).read_bytes() == before
        monkeypatch.delenv("RANK")
        child.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
        child.wait(timeout=30)
    with run_folder_session():
        assert claim_run_folder(out, "robustness") == out  # the OS dropped the dead writer's lock
        assert (out / LOCK).read_text().strip() == str(os.getpid())


def test_the_lock_is_held_for_the_session_and_released_after(tmp_path: Path) -> None:
    out = tmp_path / "run"

    with run_folder_session():
        claim_run_folder(out, "cs", {"n": 1})
        assert claim_run_folder(out, "cs", {"n": 1}) == out  # the same writer again: re-entered
        with run_folder_session():  # an inner session releases only what it took
            claim_run_folder(out, "cs", {"n": 1})
        assert _locked(out)
    assert not _locked(out)


# ------------------------------------------------------------------------------------ unique temporary files
def test_temporary_names_are_unique_to_their_writer() -> None:
    a, b = integrity.unique_temp("x/state.pt"), integrity.unique_temp("x/state.pt")
    assert a != b and a.parent == b.parent == Path("x") and f".state.pt.tmp-{os.getpid()}-" in a.name


def test_two_writers_of_one_state_never_collide(tmp_path: Path) -> None:
    """Two threads saving ``state.pt`` into one folder at once (one shared temporary name used to make one of
    them fail or publish half a file): every save succeeds and the file left is whole."""
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(25):
                save_state(
                    {"fingerprint": {"writer": k}, "stages": {"i": torch.full((2000,), float(i))}}, tmp_path
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = load_checked(tmp_path / "state.pt")
    assert final["fingerprint"]["writer"] in (0, 1) and torch.equal(
        final["stages"]["i"], torch.full((2000,), 24.0)
    )
    assert _temps(tmp_path) == []


def test_every_writer_goes_through_unique_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """State, caches of cs / ambient / causal, records, run.json, zoo weights and records and the MNIST cache are
    all written through :func:`manifold_defense.integrity.unique_temp` (then renamed) and read back verified."""
    from eval import ambient, causal
    from eval.cs import ResultCache
    from eval.cs_core import quick_protocol
    from manifold_defense import data, zoo

    targets: list[str] = []
    original = integrity.unique_temp

    def spy(path: Any) -> Path:
        targets.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(integrity, "unique_temp", spy)
    cpu = torch.device("cpu")
    with run_folder_session():
        claim_run_folder(tmp_path / "run", "cs", {"n": 1})
    save_state({"fingerprint": {}, "stages": {}}, tmp_path)
    cache = ResultCache(tmp_path / "cs", quick_protocol(), cpu)
    cache.save("lasso", 10, torch.ones(3), 1.5, {"alpha": 0.1}, torch.zeros(2, 1, 28, 28))
    amb = ambient._Cache(tmp_path / "ambient", ambient.quick_protocol(), cpu)
    amb.save("unmeasure-p0.5", {"mnist_score": 1.0}, torch.zeros(2, 1, 28, 28))
    cau = causal._Cache(tmp_path / "causal", {"seed": 0})
    cau.put("gan", {"tvd": 0.1})
    write_record(tmp_path / "results.json", {"n": 3, "eps": (0.1, 0.2), "nan": float("nan")})
    zoo.save(zoo.build("mnist-vae"), "mnist-vae", tmp_path / "zoo", {"training": {"note": "test"}})
    zoo.update_record("mnist-vae", {"figures": {"x": 1}}, tmp_path / "zoo")
    data._atomic_savez(tmp_path / "cache.npz", {"a": torch.arange(3).numpy()})
    assert sorted(targets) == sorted([
        MARKER, "state.pt", "lasso-m10.pt", "unmeasure-p0.5.pt", "gan.json", "results.json",
        "mnist-vae.safetensors", "mnist-vae.json", "mnist-vae.json", "cache.npz",
    ])  # fmt: skip
    assert cache.load("lasso", 10)[1] == 1.5 and amb.load("unmeasure-p0.5") is not None  # type: ignore[index]
    assert cau.get("gan") == {"tvd": 0.1}
    assert read_record(tmp_path / "results.json")["eps"] == [0.1, 0.2]
    zoo.verify("mnist-vae", tmp_path / "zoo")
    assert _temps(tmp_path) == []
    _flip(tmp_path / "cs" / "lasso-m10.pt")
    with pytest.raises(
        IntegrityError, match=r"cs result cache entry .*lasso-m10.pt does not match .*delete it"
    ):
        cache.load("lasso", 10)
    (tmp_path / "causal" / "gan.json").write_text('{"fingerprint": "{}", "figures": {"tv')
    with pytest.raises(IntegrityError, match=r"causal figures cache entry .*gan.json is not JSON"):
        cau.get("gan")


# ----------------------------------------------------------------------------------------------- disk full
def _enospc_on(fragment: str, monkeypatch: pytest.MonkeyPatch, at: int = 1) -> list[int]:
    """Make the ``at``-th write of a file whose temporary name contains ``fragment`` fail with ENOSPC (as a full
    disk does on its flush); returns the running count."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file being written")
    seen = [0]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            seen[0] += 1
            if seen[0] == at:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(integrity.os, "fsync", fsync)
    return seen


def test_disk_full_at_a_state_save_keeps_the_previous_state_and_resumes(
    tmp_path: Path, full: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _enospc_on(".state.pt.tmp-", monkeypatch, at=5)
    with pytest.raises(
        DiskFullError, match=r"could not write .*state.pt: no space left on its file system"
    ) as err:
        run_tiny(tmp_path)
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    load_checked(tmp_path / "state.pt")  # the 4th save, whole
    assert _temps(tmp_path) == []
    assert _strip_times(run_tiny(tmp_path)["defenses"]) == full["defenses"]


def test_disk_full_while_writing_the_results_is_one_line_then_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv, out = _cli_args(tmp_path)
    reference = tmp_path / "reference"
    assert run([*argv[:-2], "--out", str(reference)]) == 0
    with monkeypatch.context() as m:
        _enospc_on(".results.json.tmp-", m)
        capsys.readouterr()
        assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.json: no space left on its file system" in err[0], err
    assert not (out / "results.json").exists() and _temps(out) == []
    assert run(argv) == 0  # space freed: resumes from the saved state
    got, want = read_record(out / "results.json"), read_record(reference / "results.json")
    assert got["resumed_stages"] > 0
    assert _strip_times(got["defenses"]) == _strip_times(want["defenses"])


def test_disk_full_at_the_start_leaves_no_run_json_that_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _enospc_on(f".{MARKER}.tmp-", m)
        with pytest.raises(DiskFullError, match=r"run\.json: no space left"):
            claim_run_folder(out, "cs", {"n": 1})
    assert not (out / MARKER).exists()
    # what an older version left after a failed start: an empty run.json in an otherwise empty folder
    (out / MARKER).write_text("")
    with run_folder_session():
        assert claim_run_folder(out, "cs", {"n": 2}) == out  # nothing to lose: treated as absent
    assert read_record(out / MARKER, what="run record") == {"command": "cs", "protocol": {"n": 2}}


# --------------------------------------------------------------------------------------- run.json, results
def _finished(out: Path, full: dict[str, Any]) -> Path:
    out.mkdir()
    for p in full["out"].iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def _no_marker(folder: Path, results: str | None = None, edit: tuple[str, str] | None = None) -> None:
    (folder / MARKER).unlink()
    if results is not None:
        (folder / "results.json").write_text(results)
    if edit is not None:
        _edit(folder / "results.json", *edit)


RECORD_FAULTS: list[tuple[str, Callable[[Path], object], str]] = [
    ("run.json-empty-beside-results", lambda d: (d / MARKER).write_text(""),
     r"run.json is unreadable \(empty\) and .* holds other files \(.*results.json"),
    ("run.json-altered", lambda d: _edit(d / MARKER, "robustness", "defense"),
     r"run.json is unreadable \(it does not match the SHA-256 written with it: altered\)"),
    ("run.json-older-version", lambda d: (d / MARKER).write_text(json.dumps({"command": "robustness"})),
     r"run.json is unreadable \(written by an older version of manifold-defense"),
    ("no-run.json-cut-results", lambda d: _no_marker(d, results='{"sch'),
     r"holds no run.json and its results.json .*results.json is corrupt \(not JSON"),
    ("no-run.json-altered-results", lambda d: _no_marker(d, edit=('"n": 12', '"n": 13')),
     r"holds no run.json and its results record .*results.json is corrupt \(it does not match the SHA-256"),
    ("no-run.json-results", _no_marker,
     r"holds a run of unknown origin; refusing to write a `robustness` run over it \(its results would be lost; "
     r"its run.json is missing"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "fault", "message"), RECORD_FAULTS, ids=[c[0] for c in RECORD_FAULTS])
def test_damaged_run_records_are_refused_naming_the_file(
    tmp_path: Path, full: dict[str, Any], case: str, fault: Callable[[Path], object], message: str
) -> None:
    out = _finished(tmp_path / "run", full)
    fault(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunFolderError, match=message):
        claim_run_folder(out, "robustness")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written


def test_a_cut_results_json_is_recomputed_from_the_intact_state(tmp_path: Path, full: dict[str, Any]) -> None:
    out = _finished(tmp_path / "run", full)
    (out / "results.json").write_text((out / "results.json").read_text()[:100])
    record = run_tiny(out)
    assert record["resumed_stages"] > 0
    assert _strip_times(read_record(out / "results.json")["defenses"]) == full["defenses"]


def test_records_carry_their_hash_and_an_alteration_is_refused(tmp_path: Path, full: dict[str, Any]) -> None:
    record = json.loads((full["out"] / "results.json").read_text())
    assert record["sha256"] == checked_json({k: v for k, v in record.items() if k != "sha256"})["sha256"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**record, "n": 13}))
    with pytest.raises(IntegrityError, match=rf"results record {path} does not match the SHA-256"):
        read_record(path)


# ---------------------------------------------------------------------------------------------------- --out
@pytest.mark.parametrize(
    "out", ["", "   ", "=", "= "], ids=["empty", "spaces", "equals-empty", "equals-space"]
)
def test_an_empty_out_is_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    monkeypatch.chdir(tmp_path)
    outs = [f"--out{out}"] if out.startswith("=") else ["--out", out]
    assert run(["cs", "--quick", *outs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "expected --out to name a folder, got" in err[0]
        and "unset shell variable" in err[0]
    )
    assert list(tmp_path.iterdir()) == []


def test_out_as_empty_text_or_the_project_folder_is_refused_by_the_api() -> None:
    with pytest.raises(RunFolderError, match=r"expected --out to name a folder, got ''"):
        claim_run_folder("", "cs")
    with pytest.raises(RunFolderError, match=r"the project's own source folder"):
        claim_run_folder(REPO, "cs")
    assert not (REPO / LOCK).exists()


def test_a_read_only_out_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder this process cannot write (simulated: the tests may run as root, who writes anywhere)."""
    import eval.run_folder as run_folder

    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(run_folder.os, "open", read_only)
    with pytest.raises(RunFolderError, match=rf"cannot write --out {tmp_path}: Permission denied"):
        claim_run_folder(tmp_path, "cs")
    assert run(["cs", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write --out" in err[0] and "choose a folder this process can write" in err[0]


# ------------------------------------------------------------------------------------------------ helpers
def _cli_args(tmp_path: Path, out: Path | None = None) -> tuple[list[str], Path]:
    """A small ``python -m eval robustness`` run on the user-model files of :mod:`tests.test_eval_harness`;
    ``--out`` comes last."""
    from tests.test_eval_harness import _user_files

    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    path, weights = _user_files(models)
    out = out if out is not None else tmp_path / "cli"
    argv = [
        "robustness", "--quick", "--n", "6", "--batch", "2", "--threats", "l2-1", "--defenses", "undefended",
        "--attacks", "clean,pgd", "--no-curves", "--classifier", f"{path}:classifier", "--classifier-weights",
        str(weights), "--generator", "none", "--data", f"{path}:data", "--device", "cpu", "--threads", "1",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    return argv, out


def test_the_byte_flip_changes_exactly_one_byte(tmp_path: Path) -> None:
    """The corruption helper does what the refusals above assume."""
    data = bytes(range(256)) * 4
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    _flip(path)
    changed = path.read_bytes()
    assert len(changed) == len(data) and sum(a != b for a, b in zip(changed, data, strict=True)) == 1
