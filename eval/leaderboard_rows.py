"""The rows of the leaderboard (``python -m eval leaderboard``) and how each is read from its committed results.

A row is a :class:`RowSpec`: which defense and classifier, the harness command that measures it (one harness run
per row), and the committed ``results.json`` files (:class:`Source`) that hold its figures, each for the threats
it covers. :func:`collect_row` turns a spec into the row the leaderboard publishes: clean accuracy, and per threat
the worst case with ``n`` and its standard error ``sqrt(p (1 - p) / n)``, the convergence verdict, the red flags,
the AutoAttack cross-check and the majority vote where they apply, the evaluation's real passes per point, the
purifier's cost per defended image (``docs/figures/purifier_cost.json``), the prior and the git commit of every
weights file. A threat no committed file holds is ``"not measured"`` with the command that measures it: nothing
is dropped or invented. Bad input (an unknown row, a file of another schema, a file of another classifier or of
a quick run) raises ``ValueError`` naming what was expected and what came.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.autoattack import budget_of
from eval.harness.record import ladder_rungs
from eval.run_folder import read_record
from manifold_defense import zoo

__all__ = [
    "DIFFPURE_T_STAR",
    "N_TARGET",
    "ROWS",
    "THREATS",
    "RowSpec",
    "Source",
    "collect_row",
    "converged_verdict",
    "load_checked_json",
    "other_settings",
    "read_results",
    "row_spec",
    "standard_error",
]

ROOT = Path(__file__).resolve().parent.parent
THREATS = ("linf-0.3", "l2-2", "l2-4")
"""The threats of every row, in column order."""
N_TARGET = 100
"""The number of first test points every row is measured on (a row measured at another n says so)."""
#: Committed figures of the leaderboard's own runs.
LB = "docs/figures/leaderboard"
COST = "docs/figures/purifier_cost.json"
ROBUSTNESS_SCHEMAS = {"manifold-defense robustness v1": 1, "manifold-defense robustness v2": 2}
#: Flags that describe a defense rather than warn about its figure (left out of the flags column).
INFORMATIONAL = {"randomized-defense"}
COMMON = ("--n", str(N_TARGET), "--threads", "1", "--no-progress")
AUTOATTACK_BUDGET = "reference"
"""The budget of the AutoAttack cross-check column: the reference implementation's 100 iterations
(:class:`attacks.AutoAttackReference`). The 10-iteration runs of torchattacks' wrapper, the column before, stay
beside it (``torchattacks_wrapper``)."""


@dataclass(frozen=True)
class Source:
    """A committed harness ``results.json`` and the threats of a row it supplies.

    Attributes:
        path: the file, relative to the repository root.
        threats: the threats it supplies (each must be among the file's ``threat_models``).
        defense: the defense's name inside the file (``None``: the row's ``defense``).
    """

    path: str
    threats: tuple[str, ...] = THREATS
    defense: str | None = None


@dataclass(frozen=True)
class RowSpec:
    """One leaderboard row.

    Attributes:
        name: the row's id (also its run folder under ``leaderboard --out DIR``).
        label: how the tables name it.
        defense: the harness defense (``undefended``, ``projection-fast``, ``projection-defense-gan``,
            ``diffpure``, ``diffpure-fixed``).
        classifier: the zoo classifier inside.
        args: the harness arguments that measure the row (after ``robustness --out DIR``, before ``--threats``).
        sources: the committed results that hold its figures.
        purifier: its key in ``docs/figures/purifier_cost.json`` (``None``: no purifier).
        prior: the zoo generator or diffusion model the purifier uses (``None``: none).
        weights: the zoo models whose weights the figures rest on (the classifier first).
        autoattack: the AutoAttack version of the cross-check column (``None``: it does not apply).
        run: the run folder's name when several rows come from one harness run (default ``name``).
    """

    name: str
    label: str
    defense: str
    classifier: str
    args: tuple[str, ...]
    sources: tuple[Source, ...] = ()
    purifier: str | None = None
    prior: str | None = None
    weights: tuple[str, ...] = ()
    autoattack: str | None = None
    run: str | None = None

    @property
    def folder(self) -> str:
        """The run folder's name under ``leaderboard --out DIR``."""
        return self.run or self.name

    def command(self, out: str = "DIR", threats: tuple[str, ...] = THREATS) -> str:
        """The harness command that measures ``threats`` of this row into ``out/<folder>``."""
        extra = () if tuple(threats) == THREATS else ("--threats", ",".join(threats))
        return " ".join(["manifold-defense robustness --out", f"{out}/{self.folder}", *self.args, *extra])

    def autoattack_path(self, threat: str, budget: str = AUTOATTACK_BUDGET) -> str:
        """Where the committed AutoAttack result of ``threat`` at ``budget`` lives."""
        tag = "autoattack" if budget == "torchattacks" else f"autoattack-{budget}"
        return f"{LB}/{tag}_{self.classifier}_{threat}_n{N_TARGET}.json"

    def autoattack_folder(self, threat: str) -> str:
        """The run folder of the cross-check at ``threat`` under ``leaderboard --out DIR``."""
        return f"{self.classifier}-autoattack-{AUTOATTACK_BUDGET}-{threat}"

    def autoattack_argv(self, threat: str, out: str = "DIR") -> list[str]:
        """The ``python -m eval`` arguments of the cross-check at ``threat`` (same first ``N_TARGET`` test points,
        the reference budget)."""
        norm, eps = threat.split("-", 1)
        return ["autoattack", "--model", self.classifier, "--n", str(N_TARGET), "--norm", norm, "--eps", eps,
                "--version", str(self.autoattack), "--budget", AUTOATTACK_BUDGET, "--out",
                f"{out}/{self.autoattack_folder(threat)}", "--threads", "1", "--no-progress"]  # fmt: skip

    def autoattack_command(self, threat: str, out: str = "DIR") -> str:
        """The ``autoattack`` command of the cross-check at ``threat``."""
        return " ".join(["manifold-defense", *self.autoattack_argv(threat, out)])


def _undefended(clf: str, label: str) -> RowSpec:
    return RowSpec(
        name=clf, label=label, defense="undefended", classifier=clf,
        args=("--defenses", "undefended", "--classifier", clf, *COMMON),
        sources=(Source(f"{LB}/undefended_{clf}_n{N_TARGET}.json"),), prior="mnist-gan",
        weights=(clf, "mnist-gan", "mnist-encoder"), autoattack="standard",
    )  # fmt: skip


#: DiffPure's diffusion time: the t* that ``diffpure-tstar`` chose on the shipped prior (docs/figures/diffpure_tstar.json).
DIFFPURE_T_STAR = 150
_DIFFPURE = ("--diffpure-t-star", str(DIFFPURE_T_STAR), "--final-eot", "20", "--majority", "--no-curves")
_DP_FILE = "docs/figures/diffpure_cascade_results.json"
_DP_FIXED_FILE = "docs/figures/diffpure_fixed_cascade_results.json"

ROWS: tuple[RowSpec, ...] = (
    _undefended("mnist-classifier", "`mnist-classifier` (undefended)"),
    _undefended("mnist-pgd-at", "`mnist-pgd-at` (Madry PGD training)"),
    _undefended("mnist-l2-at", "`mnist-l2-at` (l2 PGD training)"),
    _undefended("mnist-rmd", "`mnist-rmd` (robust manifold training)"),
    RowSpec(
        name="fast-classifier", label="fast projection + `mnist-classifier`", defense="projection-fast",
        classifier="mnist-classifier", args=("--defenses", "projection-fast", *COMMON),
        sources=(Source(f"{LB}/fast-classifier_linf-0.3_n{N_TARGET}.json", ("linf-0.3",)),
                 Source("docs/figures/fast_cascade_l2_pac50k_results.json", ("l2-2", "l2-4"))),
        purifier="projection-fast", prior="mnist-gan", weights=("mnist-classifier", "mnist-gan", "mnist-encoder"),
    ),
    RowSpec(
        name="dgan-classifier", label="Defense-GAN's projection + `mnist-classifier`",
        defense="projection-defense-gan", classifier="mnist-classifier",
        args=("--defenses", "projection-defense-gan", "--dgan-n", str(N_TARGET), *COMMON),
        sources=(Source("docs/figures/dgan_cascade_h200_results.json"),), purifier="projection-defense-gan",
        prior="mnist-gan", weights=("mnist-classifier", "mnist-gan", "mnist-encoder"),
    ),
    RowSpec(
        name="fast-pgd-at", label="fast projection + `mnist-pgd-at`", defense="projection-fast",
        classifier="mnist-pgd-at", args=("--defenses", "projection-fast", "--classifier", "mnist-pgd-at", *COMMON),
        sources=(Source(f"{LB}/fast-pgd-at_linf-0.3_n{N_TARGET}.json", ("linf-0.3",)),
                 Source(f"{LB}/fast-pgd-at_l2-2_n{N_TARGET}.json", ("l2-2",)),
                 Source(f"{LB}/fast-pgd-at_l2-4_n{N_TARGET}.json", ("l2-4",))),
        purifier="projection-fast", prior="mnist-gan", weights=("mnist-pgd-at", "mnist-gan", "mnist-encoder"),
    ),
    RowSpec(
        name="diffpure-classifier", label=f"DiffPure (t* {DIFFPURE_T_STAR}) + `mnist-classifier`", defense="diffpure",
        classifier="mnist-classifier", args=("--defenses", "diffpure", *_DIFFPURE, *COMMON),
        sources=(Source(_DP_FILE),),
        purifier="diffpure", prior="mnist-ddpm",
        weights=("mnist-classifier", "mnist-ddpm"),
    ),
    RowSpec(
        name="diffpure-fixed-classifier", label="DiffPure, fixed noise + `mnist-classifier`",
        defense="diffpure-fixed", classifier="mnist-classifier",
        args=("--defenses", "diffpure-fixed", *_DIFFPURE, *COMMON),
        sources=(Source(_DP_FIXED_FILE),),
        purifier="diffpure", prior="mnist-ddpm", weights=("mnist-classifier", "mnist-ddpm"),
    ),
    RowSpec(
        name="diffpure-pgd-at", label=f"DiffPure (t* {DIFFPURE_T_STAR}) + `mnist-pgd-at`", defense="diffpure",
        classifier="mnist-pgd-at",
        args=("--defenses", "diffpure", "--classifier", "mnist-pgd-at", *_DIFFPURE, *COMMON),
        sources=(Source(f"{LB}/diffpure-pgd-at_linf-0.3_n{N_TARGET}.json", ("linf-0.3",)),
                 Source(f"{LB}/diffpure-pgd-at_l2-2_n{N_TARGET}.json", ("l2-2",)),
                 Source(f"{LB}/diffpure-pgd-at_l2-4_n{N_TARGET}.json", ("l2-4",))),
        purifier="diffpure", prior="mnist-ddpm", weights=("mnist-pgd-at", "mnist-ddpm"),
    ),
)
"""Every row of the leaderboard, in table order."""


def row_spec(name: str, rows: tuple[RowSpec, ...] = ROWS) -> RowSpec:
    """The spec of row ``name``; ``ValueError`` naming the known rows otherwise."""
    for spec in rows:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown leaderboard row {name!r}; expected one of {[s.name for s in rows]}")


def standard_error(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / n)``: the standard error of an accuracy ``p`` measured on ``n`` points."""
    if not 0.0 <= p <= 1.0 or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"expected an accuracy in [0, 1] and n >= 1, got {p!r} and {n!r}")
    return math.sqrt(p * (1.0 - p) / n)


def load_checked_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, its ``sha256`` verified when it carries one (``ValueError`` otherwise)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: expected a JSON results file, got unparseable text ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return read_record(path) if "sha256" in data else data


def read_results(path: Path, spec: RowSpec, defense: str) -> tuple[dict[str, Any], int]:
    """The harness results at ``path`` and their schema version; ``ValueError`` unless they are a robustness
    results file (v1 or v2) holding ``defense`` on ``spec``'s classifier, from a full (not quick) run on the first
    test points of MNIST."""
    rec = load_checked_json(path)
    schema = rec.get("schema")
    if schema not in ROBUSTNESS_SCHEMAS:
        raise ValueError(f"{path}: expected a robustness results file (schema {sorted(ROBUSTNESS_SCHEMAS)}), "
                         f"got schema {schema!r} (keys {sorted(rec)[:6]})")  # fmt: skip
    if defense not in rec.get("defenses", {}):
        raise ValueError(f"{path}: expected defense {defense!r} in it, got {sorted(rec.get('defenses', {}))}")
    models = str(rec.get("models", ""))
    if f"classifier {spec.classifier}," not in models + ",":
        raise ValueError(f"{path}: expected a run on classifier {spec.classifier}, got models {models!r}")
    if rec.get("quick"):
        raise ValueError(f"{path}: a --quick smoke run is no leaderboard figure (row {spec.name})")
    if not str(rec.get("data", "")).startswith("MNIST test split, first "):
        raise ValueError(f"{path}: expected the first test points of MNIST, got data {rec.get('data')!r}")
    return rec, ROBUSTNESS_SCHEMAS[schema]


def _git(*args: str) -> tuple[int, str] | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.returncode, out.stdout.strip()


def weights_commit(name: str) -> str | None:
    """The last git commit that changed zoo model ``name``'s weights file (``None`` without git history)."""
    got = _git("log", "-1", "--format=%H", "--", f"manifold_defense/zoo/weights/{name}.safetensors")
    return got[1] or None if got and got[0] == 0 else None


def _on_weights(path: str, commits: list[str | None]) -> bool | None:
    """Whether results file ``path`` was committed after every weights commit (``True`` when its content is not
    committed yet: measured on the working tree's weights); ``None`` without git history. The last commit that
    changed the file counts: a rerun that replaces a file, in place or after the old run moved to the history,
    is the new run's."""
    if any(c is None for c in commits):
        return None
    pending = _git("status", "--porcelain", "--", path)
    if pending is None or pending[0] != 0:
        return None
    if pending[1]:
        return True
    got = _git("log", "-1", "--format=%H", "--", path)
    if got is None or got[0] != 0:
        return None
    if not got[1]:
        return True
    last = got[1]
    for c in commits:
        anc = _git("merge-base", "--is-ancestor", str(c), last)
        if anc is None or anc[0] not in (0, 1):
            return None
        if anc[0] == 1:
            return False
    return True


def converged_verdict(d: Mapping[str, Any], tk: str, version: int) -> tuple[str, str]:
    """``("yes" | "no" | "unchecked", detail)`` from the convergence entry and the ``not-converged`` flag."""
    if version < 2:
        return "unchecked", "v1 run, made before the convergence check: an upper bound"
    entry = d["attacks"].get("convergence", {}).get(tk)
    if entry is None or entry.get("status") != "ran":
        return "unchecked", "no convergence rerun: " + (entry or {}).get("reason", "not run")
    fired = any(f["flag"] == "not-converged" and f["where"] == tk for f in d.get("flags", []))
    ladder = entry.get("ladder") or []
    if len(ladder) > 1:
        steps = ", ".join(f"x{2 ** r['round']}: {r['broken']}" for r in ladder)
        detail = (f"{entry['rerun_of']} rerun as a ladder of {len(ladder)} on {entry['attacked']} survivors, newly "
                  f"broken by steps factor {steps}: {entry['figure_before']:.4g} -> {entry['accuracy']:.4g}")  # fmt: skip
    else:
        detail = (f"{entry['rerun_of']} rerun with twice its steps on {entry['attacked']} survivors broke "
                  f"{entry['broken']}: {entry['figure_before']:.4g} -> {entry['accuracy']:.4g}")  # fmt: skip
    return ("no" if fired else "yes"), detail


def ladder_of(d: Mapping[str, Any], tk: str) -> dict[str, Any] | None:
    """The convergence rerun (or ladder of reruns) of threat ``tk`` as an attack-strength curve: ``rerun_of``,
    ``figure_before`` and per rerun ``factor`` (steps times the original's), ``attacked``, ``broken`` (newly) and
    ``accuracy`` after it; ``None`` when none ran. A results file written before the ladder existed has one rerun."""
    e = d["attacks"].get("convergence", {}).get(tk)
    if e is None or e.get("status") != "ran":
        return None
    return {"rerun_of": e["rerun_of"], "figure_before": e["figure_before"],
            "rungs": [{"factor": 2 ** r["round"], "attacked": r["attacked"], "broken": r["broken"],
                       "accuracy": r["accuracy"]} for r in ladder_rungs(e)]}  # fmt: skip


def _cell(spec: RowSpec, src: Source, rec: Mapping[str, Any], version: int, tk: str) -> dict[str, Any]:
    d = rec["defenses"][src.defense or spec.defense]
    if tk not in rec["threat_models"] or tk not in d["worst_case"]:
        raise ValueError(f"{src.path}: expected threat {tk} for row {spec.name}, got {rec['threat_models']}")
    p, n = float(d["worst_case"][tk]), int(d["n"])
    converged, detail = converged_verdict(d, tk, version)
    stages = (d.get("cost") or {}).get("stages", {})
    passes = sum(r["real_passes"] for k, r in stages.items() if k.startswith(f"{tk}|"))
    seconds = sum(r["process_seconds"] for k, r in stages.items() if k.startswith(f"{tk}|"))
    majority = (d.get("majority_vote") or {}).get("accuracy", {}).get(tk)
    return {
        "status": "measured", "accuracy": p, "n": n, "se": round(standard_error(p, n), 4),
        "converged": converged, "convergence": detail, "ladder": ladder_of(d, tk) if version >= 2 else None,
        "flags": sorted({f["flag"] for f in d.get("flags", []) if f["where"] == tk} - INFORMATIONAL),
        "stages": {a: per[tk].get("accuracy") for a, per in d["attacks"].items() if tk in per},
        "majority_vote": majority, "real_passes_per_point": round(passes / n, 1) if stages else None,
        "process_seconds_per_point": round(seconds / n, 2) if stages else None,
        "source": src.path, "command": rec.get("command"), "device": rec.get("device"), "schema": version,
        "stages_missing": _missing_stages(rec),
        "not_run": [k for k in rec.get("incomplete", []) if k.split("|")[1:2] == [tk]],
        "lean": bool(rec.get("lean", False)),
        "other_settings": other_settings(spec, str(rec.get("command") or "")),
    }  # fmt: skip


#: The options that define a row's defense; a source run with another value measured another defense.
DEFINING = {"--classifier": "mnist-classifier", "--diffpure-t-star": None, "--diffpure-steps": None,
            "--diffpure-eta": None}  # fmt: skip


def _option(words: list[str], flag: str) -> str | None:
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def other_settings(spec: RowSpec, command: str) -> list[str]:
    """The defining options (``DEFINING``) whose value in a source run's ``command`` differs from the row's
    command, each as ``"--flag: run VALUE, row VALUE"`` (an option a command leaves out counts as its default)."""
    run, row = shlex.split(command), list(spec.args)
    out = []
    for flag, default in DEFINING.items():
        mine, theirs = _option(row, flag) or default, _option(run, flag) or default
        if mine != theirs:
            out.append(f"{flag}: run {theirs}, row {mine}")
    return out


def _missing_stages(rec: Mapping[str, Any]) -> list[str]:
    """The stages of today's cascade the run did not have (it ran before they joined, or left them out)."""
    from eval.harness.cascade import ATTACKS

    ran = set((rec.get("settings") or {}).get("attacks", ATTACKS))
    return [a for a in ATTACKS if a not in ran]


def _autoattack(
    spec: RowSpec, tk: str, cell: Mapping[str, Any], root: Path, extra: Path | None
) -> dict[str, Any] | None:
    """The AutoAttack cross-check of ``tk`` (``None`` where it does not apply): the committed result at the
    reference budget, else one in ``extra``, else "not measured" with its command; beside it the committed run of
    torchattacks' wrapper where there is one. ``ValueError`` for a file of another model, threat or budget."""
    if spec.autoattack is None:
        return None
    path = spec.autoattack_path(tk)
    found = None if extra is None else extra / spec.autoattack_folder(tk) / "results.json"
    if not (root / path).is_file() and found is not None and found.is_file():
        path = str(found)
    if not (root / path).is_file():
        out: dict[str, Any] = {"status": "not measured", "command": spec.autoattack_command(tk)}
    else:
        rec = _read_autoattack(root / path, spec, tk, AUTOATTACK_BUDGET)
        out = {"status": "measured", "accuracy": round(float(rec["robust_accuracy"]), 4), "n": int(rec["n"]),
               "version": rec["version"], "budget": AUTOATTACK_BUDGET, "source": path,
               "command": rec["settings"]["command"]}  # fmt: skip
        if cell.get("status") == "measured" and cell["n"] == out["n"]:
            out["harness_minus_autoattack"] = round(cell["accuracy"] - out["accuracy"], 4)
            out["within_1_point"] = abs(cell["accuracy"] - out["accuracy"]) <= 0.01 + 1e-9
    wrapper = spec.autoattack_path(tk, "torchattacks")
    if (root / wrapper).is_file():
        w = _read_autoattack(root / wrapper, spec, tk, "torchattacks")
        out["torchattacks_wrapper"] = {"accuracy": round(float(w["robust_accuracy"]), 4), "n": int(w["n"]),
                                       "source": wrapper, "command": w["settings"]["command"]}  # fmt: skip
    return out


def _read_autoattack(path: Path, spec: RowSpec, tk: str, budget: str) -> dict[str, Any]:
    """An ``autoattack`` results file, checked to be ``spec``'s classifier at ``tk`` and ``budget`` (a file
    without ``budget`` was written by torchattacks' wrapper, before the option existed)."""
    rec = load_checked_json(path)
    norm, eps = tk.split("-", 1)
    got = (rec.get("attack"), rec.get("model"), rec.get("version"), rec.get("source"), rec.get("threat_model"),
           budget_of(rec))  # fmt: skip
    want = ("autoattack", spec.classifier, spec.autoattack, "zoo", {"norm": norm, "eps": float(eps)}, budget)
    if got != want:
        raise ValueError(f"{path}: expected an autoattack result (attack, model, version, source, threat, budget) "
                         f"{want}, got {got}")  # fmt: skip
    return rec


def _cost(spec: RowSpec, root: Path) -> dict[str, Any]:
    if spec.purifier is None:
        return {"purifier": None, "passes_per_image": 0, "cpu_seconds_per_image": None}
    rec = load_checked_json(root / COST)
    if spec.purifier not in rec.get("purifiers", {}):
        raise ValueError(f"{COST}: expected purifier {spec.purifier!r}, got {sorted(rec.get('purifiers', {}))}")
    r = rec["purifiers"][spec.purifier]
    return {"purifier": spec.purifier, "network": r["network"], "passes_per_image": r["passes_per_image"],
            "cpu_seconds_per_image": r["seconds_per_image"], "threads": rec["threads"], "device": rec["device"],
            "source": COST, "command": rec["command"]}  # fmt: skip


def _models(spec: RowSpec) -> list[dict[str, Any]]:
    out = []
    for name in spec.weights:
        rec = zoo.record(name)
        steps = (rec.get("training") or {}).get("config", {}).get("steps")
        out.append({"name": name, "sha256": rec["sha256"], "commit": weights_commit(name), "training_steps": steps})
    return out


def collect_row(spec: RowSpec, root: Path = ROOT, extra: Path | None = None) -> dict[str, Any]:
    """The published row of ``spec`` from the committed results under ``root``.

    Args:
        spec: the row.
        root: the repository root its sources are relative to.
        extra: a ``leaderboard --out`` folder: a threat no committed file holds is read from
            ``extra/<folder>/results.json`` when that file exists (its figures are then not yet committed).
    """
    cells: dict[str, dict[str, Any]] = {}
    clean: dict[str, Any] | None = None
    randomized: bool | None = None
    models = _models(spec)
    commits = [m["commit"] for m in models]
    sources = list(spec.sources)
    if extra is not None and (extra / spec.folder / "results.json").is_file():
        missing = tuple(t for t in THREATS if not any(t in s.threats and (root / s.path).is_file() for s in sources))
        sources.append(Source(str(extra / spec.folder / "results.json"), missing))
    for src in sources:
        path = Path(src.path) if Path(src.path).is_absolute() else root / src.path
        if not path.is_file() or not src.threats:
            continue
        rec, version = read_results(path, spec, src.defense or spec.defense)
        d = rec["defenses"][src.defense or spec.defense]
        current = _on_weights(src.path, commits) if not Path(src.path).is_absolute() else True
        if clean is None:
            clean = {"accuracy": d["clean"], "n": int(d["n"]), "source": src.path}
            randomized = bool(d["randomized"])
        for tk in src.threats:
            if tk not in cells:
                cells[tk] = _cell(spec, src, rec, version, tk) | {"on_current_weights": current}
    missing = tuple(t for t in THREATS if t not in cells)
    for tk in missing:
        cells[tk] = {"status": "not measured", "command": spec.command(threats=missing)}
    threats = {}
    for tk in THREATS:
        cell = cells[tk]
        aa = _autoattack(spec, tk, cell, root, extra)
        threats[tk] = cell | ({"autoattack": aa} if aa is not None else {})
    notes = _notes(threats)
    return {
        "name": spec.name, "label": spec.label, "defense": spec.defense, "classifier": spec.classifier,
        "randomized": randomized, "autoattack_version": spec.autoattack,
        "status": "measured" if not missing else ("not measured" if len(missing) == len(THREATS) else "partial"),
        "clean": clean, "threats": threats, "cost": _cost(spec, root), "prior": spec.prior, "weights": models,
        "command": spec.command(), "notes": notes,
    }  # fmt: skip


def _notes(threats: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a reader must know beside the figures: another n, other weights, another device, no convergence
    check."""
    notes = []
    measured = {tk: c for tk, c in threats.items() if c["status"] == "measured"}
    other_n = sorted({c["n"] for c in measured.values() if c["n"] != N_TARGET})
    if other_n:
        notes.append(f"measured at n {', '.join(map(str, other_n))}, not {N_TARGET}")
    other = sorted({o for c in measured.values() for o in c.get("other_settings", [])})
    if other:
        notes.append(f"measured with other settings than the row's command ({'; '.join(other)}): not this row's "
                     "defense until rerun")  # fmt: skip
    if any(c.get("on_current_weights") is False for c in measured.values()):
        notes.append("measured on other weights than the shipped ones (an earlier prior or classifier)")
    devices = sorted({str(c["device"]) for c in measured.values() if c.get("device") not in (None, "cpu")})
    if devices:
        notes.append(f"run on {', '.join(devices)}")
    stopped = sorted({k for c in measured.values() for k in c.get("not_run", [])})
    if stopped:
        notes.append(f"written from a stopped run (--report-partial) without {', '.join(stopped)}: those figures are "
                     "upper bounds until the run is resumed")  # fmt: skip
    missing = sorted({a for c in measured.values() for a in c.get("stages_missing", [])})
    if missing:
        notes.append(f"run without the stages {', '.join(missing)} of today's cascade (added later, or left out): "
                     "its figures are upper bounds under the current cascade")  # fmt: skip
    if any(c["schema"] < 2 for c in measured.values()):
        notes.append("v1 harness run: no convergence check, figures are upper bounds")
    lean = sorted(tk for tk, c in measured.items() if c.get("lean"))
    if lean:
        notes.append(f"lean cascade at {', '.join(lean)} (cheaper budgets, --lean): its worst case holds as far as "
                     "the lean-versus-full comparison on the same points shows")  # fmt: skip
    below = [f"{tk} by {c['autoattack']['harness_minus_autoattack']:.2f}" for tk, c in measured.items()
             if (c.get("autoattack") or {}).get("harness_minus_autoattack", 0.0) > 0.01 + 1e-9]  # fmt: skip
    if below:
        notes.append("AutoAttack on the same points is below the cascade's worst case (" + ", ".join(below)
                     + "): the cascade is the weaker attack there, AutoAttack's figure the tighter bound")  # fmt: skip
    if not measured:
        notes.append("not measured: run its command")
    return notes

