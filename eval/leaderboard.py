"""``python -m eval leaderboard``: one table of every defense the library ships, derived from its runs.

Every row (:data:`eval.leaderboard_rows.ROWS`) is one harness run on the same first test points of MNIST through
the same adaptive cascade: the undefended classifiers, the projection defenses and DiffPure with a classifier
inside. ``leaderboard --collect`` builds the table from the committed results JSON alone (no attack runs; what CI
and the docs use) and writes ``docs/figures/leaderboard.json`` (with its SHA-256), ``docs/figures/leaderboard.png``
(robust accuracy against the purifier's CPU seconds per image) and the generated tables of
``docs/leaderboard.md`` and the README. ``leaderboard --out DIR`` first runs, one at a time, the harness command of
every row (``DIR/<row>``) and the AutoAttack cross-check (``DIR/<classifier>-autoattack-<threat>``) that no
committed file holds (each resumes itself when interrupted), then writes the same outputs into ``DIR``, reading
the new results from there; copy them under ``docs/figures/`` (the paths ``--collect`` names) to publish them.

A row no results hold is listed as "not measured" with its command, never dropped; a row measured at another n,
on other weights or without the convergence check says so in its notes. Schema of the JSON: ``{"schema",
"threats", "n_target", "rows": [{"name", "label", "defense", "classifier", "randomized", "status", "clean":
{"accuracy", "n", "source"}, "threats": {"<threat>": {"status", "accuracy", "n", "se", "converged":
"yes" | "no" | "unchecked", "convergence", "flags", "majority_vote", "real_passes_per_point",
"process_seconds_per_point", "source", "command", "device", "schema", "on_current_weights", "autoattack"}},
"cost": {"purifier", "network", "passes_per_image", "cpu_seconds_per_image", ...}, "prior", "weights": [{"name",
"sha256", "commit", "training_steps"}], "command", "notes"}]}``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from eval.cli import console_spelling
from eval.harness.record import ladder_rungs
from eval.leaderboard_rows import N_TARGET, ROOT, ROWS, THREATS, RowSpec, collect_row, row_spec
from eval.run_folder import read_record, write_record
from manifold_defense.integrity import atomic_write_text

__all__ = ["RENDERERS", "SCHEMA", "TABLES", "add_parsers", "collect", "load", "main", "plot", "run_missing", "write"]

log = logging.getLogger(__name__)

SCHEMA = "manifold-defense leaderboard v1"
"""The schema of ``leaderboard.json``."""
JSON_PATH = ROOT / "docs" / "figures" / "leaderboard.json"
PLOT_PATH = ROOT / "docs" / "figures" / "leaderboard.png"
PAGES = (ROOT / "docs" / "leaderboard.md", ROOT / "README.md")
_SHORT = {"linf-0.3": "Linf 0.3", "l2-2": "L2 2", "l2-4": "L2 4"}


def select(names: Sequence[str] | None) -> tuple[RowSpec, ...]:
    """The specs of ``names`` in table order (``None``: every row); ``ValueError`` for an unknown name."""
    if names is None:
        return ROWS
    wanted = {row_spec(n).name for n in names}
    return tuple(s for s in ROWS if s.name in wanted)


def collect(rows: Sequence[RowSpec] = ROWS, root: Path = ROOT, extra: Path | None = None) -> dict[str, Any]:
    """The leaderboard record of ``rows`` from the committed results under ``root`` (and ``extra``: a
    ``leaderboard --out`` folder, for threats no committed file holds). Runs no attack."""
    return {"schema": SCHEMA, "threats": list(THREATS), "n_target": N_TARGET,
            "rows": [collect_row(s, root, extra) for s in rows]}  # fmt: skip


def load(path: Path = JSON_PATH) -> dict[str, Any]:
    """The committed leaderboard record (its SHA-256 verified); ``ValueError`` for another schema."""
    rec = read_record(path, what="leaderboard record", recover="run python -m eval leaderboard --collect")
    if rec.get("schema") != SCHEMA:
        raise ValueError(f"{path}: expected schema {SCHEMA!r}, got {rec.get('schema')!r}")
    return rec


def _acc(p: float) -> str:
    text = f"{p:.3f}"
    return text[:-1] if text.endswith("0") else text


def _cell(c: Mapping[str, Any], with_n: bool = False) -> str:
    if c["status"] != "measured":
        return "not measured"
    return f"{_acc(c['accuracy'])} ± {c['se']:.3f}" + (f" (n {c['n']})" if with_n else "")


def _below(c: Mapping[str, Any]) -> str:
    """`` (AA p)`` when AutoAttack on the same points is more than one point below the cascade's worst case;
    `` (maj. p)``: the majority-vote figure of a randomized defense run with ``--majority``."""
    aa = c.get("autoattack") or {}
    gap = aa.get("harness_minus_autoattack")
    below = f" (AA {_acc(aa['accuracy'])})" if gap is not None and gap > 0.01 + 1e-9 else ""
    majority = c.get("majority_vote")
    return below + ("" if majority is None else f" (maj. {_acc(majority)})")


def _noted(row: Mapping[str, Any]) -> bool:
    """Whether a measured row carries notes a reader of the README's short table must see (upper bounds, other
    weights or settings...), which it links to instead of repeating."""
    return row["status"] != "not measured" and bool(row["notes"])


def _seconds(cost: Mapping[str, Any]) -> str:
    if cost["purifier"] is None:
        return "0 (no purifier)"
    return f"{cost['passes_per_image']:g} {cost['network']}; {cost['cpu_seconds_per_image']:.3f} s"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def readme_table(board: Mapping[str, Any] | None = None) -> str:
    """The README's short table: worst case ± standard error per threat, convergence, cost per image."""
    board = board or load()
    lines = [_row(["defense", "clean", *(_SHORT[t] for t in THREATS), "converged", "purifier passes; CPU s / image"]),
             _row(["---"] * (len(THREATS) + 4))]  # fmt: skip
    for r in board["rows"]:
        cells = [r["threats"][t] for t in THREATS]
        clean = "-" if r["clean"] is None else _acc(r["clean"]["accuracy"])
        conv = " / ".join(c.get("converged", "-") for c in cells)
        ns = sorted({c["n"] for c in cells if c["status"] == "measured"})
        label = r["label"] + (f" (n {'/'.join(map(str, ns))})" if ns and ns != [N_TARGET] else "")
        devices = sorted({str(c["device"]) for c in cells if c["status"] == "measured"} - {"cpu", "None"})
        label += f" ({', '.join(devices)} run)" if devices else ""
        label += " ([notes](docs/leaderboard.md#sources-commands-weights))" if _noted(r) else ""
        lines.append(_row([label, clean, *(_cell(c) + _below(c) for c in cells), conv, _seconds(r["cost"])]))
    lines += ["", f"n = {board['n_target']} unless a row says otherwise; ± one standard error; converged: the "
              "convergence rerun or ladder (unchecked: run before the check; an upper bound); AA: AutoAttack on the same "
              "images, where more than a point below; maj.: majority vote of the draws (an upper bound)."]  # fmt: skip
    return "\n".join(lines)


def figures_table(board: Mapping[str, Any] | None = None) -> str:
    """One line per row and threat: worst case, n, standard error, convergence, flags, AutoAttack, majority."""
    board = board or load()
    header = ["defense", "clean (n)", "threat", "worst case ± se (n)", "converged", "flags", "AutoAttack (n)",
              "majority vote"]  # fmt: skip
    lines = [_row(header), _row(["---"] * len(header))]
    for r in board["rows"]:
        clean = "-" if r["clean"] is None else f"{_acc(r['clean']['accuracy'])} ({r['clean']['n']})"
        for t in THREATS:
            c = r["threats"][t]
            aa = c.get("autoattack")
            if aa is None:
                aa_text = "n/a"
            elif aa["status"] != "measured":
                aa_text = "not measured"
            else:
                gap = aa.get("harness_minus_autoattack")
                aa_text = f"{_acc(aa['accuracy'])} ({aa['n']})" + ("" if gap is None else f", harness {gap:+.2f}")
            maj = c.get("majority_vote")
            lines.append(_row([r["label"], clean, _SHORT[t], _cell(c, with_n=True), c.get("converged", "-"),
                               ", ".join(c.get("flags", [])) or "-", aa_text, "-" if maj is None else _acc(maj)]))  # fmt: skip
    return "\n".join(lines)


STAGES = ("clean", "pgd", "bpda-pgd", "bpda-eot-pgd", "surrogate-pgd", "unrolled-pgd", "apgd", "apgd-t", "fab", "square",
          "onmanifold", "overpowered", "real-bpda-eot", "convergence")  # fmt: skip


def stages_table(board: Mapping[str, Any] | None = None) -> str:
    """Robust accuracy after each stage of the cascade (cumulative), per measured row and threat; ``-``: the stage
    does not apply to the defense or was not run."""
    board = board or load()
    lines = [_row(["defense", "threat", *STAGES, "**worst case**"]), _row(["---"] * (len(STAGES) + 3))]
    for r in board["rows"]:
        for t in THREATS:
            c = r["threats"][t]
            if c["status"] != "measured":
                continue
            cells = ["-" if c["stages"].get(a) is None else _acc(c["stages"][a]) for a in STAGES]
            lines.append(_row([r["label"], _SHORT[t], *cells, f"**{_acc(c['accuracy'])}**"]))
    return "\n".join(lines)


def cost_table(board: Mapping[str, Any] | None = None) -> str:
    """Per row: the purifier's passes and CPU seconds per image, and the evaluation's real passes per point."""
    board = board or load()
    header = ["defense", "purifier passes / image", "purifier CPU s / image",
              *(f"eval real passes / point, {_SHORT[t]}" for t in THREATS), "eval process s / point (all threats)"]  # fmt: skip
    lines = [_row(header), _row(["---"] * len(header))]
    for r in board["rows"]:
        cost, cells = r["cost"], [r["threats"][t] for t in THREATS]
        passes = [c.get("real_passes_per_point") for c in cells]
        seconds = [c.get("process_seconds_per_point") for c in cells if c.get("process_seconds_per_point") is not None]
        lines.append(_row([r["label"], f"{cost['passes_per_image']:g}" + (f" ({cost['network']})" if cost["purifier"] else ""),
                           "-" if cost["purifier"] is None else f"{cost['cpu_seconds_per_image']:.3f}",
                           *("-" if p is None else f"{p:g}" for p in passes),
                           f"{sum(seconds):.1f}" if seconds else "-"]))  # fmt: skip
    return "\n".join(lines)


def sources_table(board: Mapping[str, Any] | None = None) -> str:
    """Per row: where each figure comes from (file, command), the prior, the weights' commits and the notes."""
    board = board or load()
    lines = [_row(["defense", "threats: source", "command", "prior; weights (commit)", "notes"]), _row(["---"] * 5)]
    for r in board["rows"]:
        by_source: dict[str, list[str]] = {}
        commands: dict[str, str] = {}
        for t in THREATS:
            c = r["threats"][t]
            key = c.get("source", "not measured")
            by_source.setdefault(key, []).append(_SHORT[t])
            commands[key] = str(c.get("command"))
        src = "; ".join(f"{', '.join(ts)}: " + (k if k == "not measured" else f"[{Path(k).name}]({_rel(k)})")
                        for k, ts in by_source.items())  # fmt: skip
        aa = {t: r["threats"][t].get("autoattack") for t in THREATS}
        done = [f"[{_SHORT[t]}]({_rel(a['source'])})" for t, a in aa.items() if a and a["status"] == "measured"]
        if done:
            src += "; AutoAttack: " + ", ".join(done)
        wrapped = [f"[{_SHORT[t]}]({_rel(a['torchattacks_wrapper']['source'])})" for t, a in aa.items()
                   if a and a.get("torchattacks_wrapper")]  # fmt: skip
        if wrapped:
            src += "; AutoAttack, torchattacks' wrapper: " + ", ".join(wrapped)
        cmd = "; ".join(f"`{console_spelling(v)}`" for v in dict.fromkeys(commands.values()))
        cmd += "".join(f"; `{a['command']}`" for a in aa.values() if a and a["status"] != "measured")
        weights = ", ".join(f"`{w['name']}` ({(w['commit'] or 'uncommitted')[:7]})" for w in r["weights"])
        prior = f"`{r['prior']}`; " if r["prior"] else ""
        lines.append(_row([r["label"], src, cmd, prior + weights, "; ".join(r["notes"]) or "-"]))
    return "\n".join(lines)


def autoattack_table(board: Mapping[str, Any] | None = None) -> str:
    """Per row with an AutoAttack cross-check and threat: the cascade's worst case, AutoAttack at the reference
    budget and the difference, and torchattacks' 10-iteration wrapper on the same points."""
    board = board or load()
    header = ["classifier", "threat", "cascade worst case", "AutoAttack, reference budget (n)", "cascade minus it",
              "within 1 point", "torchattacks' wrapper, 10 iterations (n)"]  # fmt: skip
    lines = [_row(header), _row(["---"] * len(header))]
    for r in board["rows"]:
        for t in THREATS:
            c = r["threats"][t]
            aa = c.get("autoattack")
            if aa is None:
                continue
            w = aa.get("torchattacks_wrapper")
            worst = _acc(c["accuracy"]) if c["status"] == "measured" else "not measured"
            if aa["status"] == "measured":
                ref, gap = f"{_acc(aa['accuracy'])} ({aa['n']})", aa.get("harness_minus_autoattack")
                within = "-" if gap is None else ("yes" if aa["within_1_point"] else "no")
            else:
                ref, gap, within = "not measured", None, "-"
            lines.append(_row([r["label"], _SHORT[t], worst, ref, "-" if gap is None else f"{gap:+.2f}", within,
                               "-" if w is None else f"{_acc(w['accuracy'])} ({w['n']})"]))  # fmt: skip
    return "\n".join(lines)


def ladder_table(board: Mapping[str, Any] | None = None) -> str:
    """Per measured cell with a convergence rerun: the stage rerun and, per rerun of its ladder, the steps factor,
    the survivors it attacked, what it newly broke and the figure after it (an attack-strength curve)."""
    board = board or load()
    header = ["defense", "threat", "rerun of", "figure before", "reruns: steps x -> newly broken of attacked (figure)",
              "converged"]  # fmt: skip
    lines = [_row(header), _row(["---"] * len(header))]
    for r in board["rows"]:
        for t in THREATS:
            c = r["threats"][t]
            lad = c.get("ladder") if c["status"] == "measured" else None
            if not lad or not lad["rungs"][0]["attacked"]:
                continue
            steps = "; ".join(f"x{g['factor']} -> {g['broken']} of {g['attacked']} ({_acc(g['accuracy'])})"
                              for g in lad["rungs"])  # fmt: skip
            lines.append(_row([r["label"], _SHORT[t], lad["rerun_of"], _acc(lad["figure_before"]), steps,
                               c["converged"]]))  # fmt: skip
    return "\n".join(lines)


def _rel(path: str) -> str:
    """A link from ``docs/leaderboard.md`` to a committed file."""
    return path[len("docs/") :] if path.startswith("docs/") else f"../{path}"


TABLES: dict[str, Callable[[Mapping[str, Any] | None], str]] = {
    "leaderboard": readme_table, "leaderboard-figures": figures_table, "leaderboard-stages": stages_table,
    "leaderboard-cost": cost_table, "leaderboard-sources": sources_table, "leaderboard-autoattack": autoattack_table,
    "leaderboard-ladders": ladder_table,
}  # fmt: skip
"""The leaderboard tables, each a function of a record (``None``: the committed one)."""
RENDERERS: dict[str, Callable[[], str]] = {name: partial(f, None) for name, f in TABLES.items()}
"""The same tables of the committed record (``eval/docs_tables.py`` registers them)."""


def plot(board: Mapping[str, Any], path: Path) -> None:
    """Robust accuracy (worst case ± one standard error, one marker per threat, one colour per row) against the
    purifier's CPU seconds per defended image (log x; rows without a purifier at the left, marked "no purifier";
    rows at the same cost are spread a little sideways so that none hides another)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    costs = [r["cost"]["cpu_seconds_per_image"] for r in board["rows"] if r["cost"]["purifier"]]
    lo, hi = (min(costs), max(costs)) if costs else (1e-2, 1.0)
    floor = lo / 10
    markers = dict(zip(THREATS, ("o", "s", "^"), strict=True))
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10")
    seen: dict[float, int] = {}
    rows = []
    for i, r in enumerate(board["rows"]):
        x0 = r["cost"]["cpu_seconds_per_image"] if r["cost"]["purifier"] else floor
        measured = [t for t in THREATS if r["threats"][t]["status"] == "measured"]
        if not measured:
            continue
        k = seen[x0] = seen.get(x0, -1) + 1
        x = x0 * 1.12**k
        rows.append(Line2D([], [], color=colors(i % 10), marker="o", linestyle="", label=r["name"]))
        for t in measured:
            c = r["threats"][t]
            ax.errorbar([x], [c["accuracy"]], yerr=[c["se"]], fmt=markers[t], color=colors(i % 10), capsize=3)
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, hi * 3)
    ticks = [floor] + [10.0**e for e in range(-4, 3) if lo / 10 < 10.0**e < hi * 3]
    ax.set_xticks(ticks, ["no purifier", *(f"{t:g}" for t in ticks[1:])])
    ax.minorticks_off()
    ax.set_xlabel("purifier CPU seconds per defended image (1 thread; log scale)")
    ax.set_ylabel("robust accuracy, worst case of the cascade")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Leaderboard: first {board['n_target']} MNIST test images, adaptive cascade")
    threats = [Line2D([], [], color="black", marker=markers[t], linestyle="", label=_SHORT[t]) for t in THREATS]
    ax.legend(handles=rows + threats, fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(board: Mapping[str, Any], json_path: Path, plot_path: Path, pages: Sequence[Path] = ()) -> None:
    """Write the record (with its SHA-256), the plot and the generated blocks of ``pages``."""
    from eval.docs_tables import render_page

    write_record(json_path, board)
    plot(board, plot_path)
    for page in pages:
        text = page.read_text()
        new = render_page(text)
        if new != text:
            atomic_write_text(page, new)


def _short_ladders(path: Path, spec: RowSpec, rounds: int) -> tuple[str, ...] | None:
    """The threats of the finished run ``path`` whose figure is not converged after fewer than ``rounds`` reruns of
    its convergence ladder (``None``: none; ``()`` stands for every threat the run holds)."""
    rec = read_record(path)
    d = rec["defenses"][spec.defense]
    short = [t for t in rec["threat_models"]
             if any(f["flag"] == "not-converged" and f["where"] == t for f in d.get("flags", []))
             and len(ladder_rungs(d["attacks"]["convergence"][t])) < rounds]  # fmt: skip
    if not short:
        return None
    threats = tuple(rec["threat_models"])
    return () if threats == THREATS else threats


def run_missing(
    specs: Sequence[RowSpec], out: Path, root: Path = ROOT, dry_run: bool = False, rounds: int = 1
) -> list[list[str]]:
    """Run, one at a time, the harness command of every row (and the AutoAttack cross-check of every threat)
    that no committed file and no finished run in ``out`` holds; the argument lists (of ``python -m eval``) run,
    in order. ``dry_run``: only list them. ``rounds`` > 1: every run gets a convergence ladder of up to ``rounds``
    reruns (``--convergence-rounds``), and a finished run in ``out`` with a figure not converged after fewer
    reruns is resumed with it (its stages are read back; only the missing reruns run)."""
    done: list[list[str]] = []
    _run: Callable[[list[str]], list[str]] = list if dry_run else _execute
    ladder = ("--convergence-rounds", str(rounds)) if rounds > 1 else ()
    for spec in specs:
        row = collect_row(spec, root)
        missing = tuple(t for t in THREATS if row["threats"][t]["status"] != "measured")
        folder = out / spec.folder
        if missing and not (folder / "results.json").is_file():
            extra = () if missing == THREATS else ("--threats", ",".join(missing))
            done.append(_run(["robustness", "--out", str(folder), *spec.args, *extra, *ladder]))
        elif ladder and (folder / "results.json").is_file():
            threats = _short_ladders(folder / "results.json", spec, rounds)
            if threats is not None:
                extra = ("--threats", ",".join(threats)) if threats else ()
                done.append(_run(["robustness", "--out", str(folder), *spec.args, *extra, *ladder]))
        for t in THREATS:
            aa = row["threats"][t].get("autoattack")
            target = out / spec.autoattack_folder(t)
            if aa is not None and aa["status"] != "measured" and not (target / "results.json").is_file():
                done.append(_run(spec.autoattack_argv(t, str(out))))
    return done


def _execute(argv: list[str]) -> list[str]:
    log.info("running: python -m eval %s", " ".join(argv))
    result = subprocess.run([sys.executable, "-m", "eval", *argv], cwd=ROOT, check=False)
    if result.returncode != 0:
        raise ValueError(f"python -m eval {' '.join(argv)} failed with exit status {result.returncode}")
    return argv


def add_parsers(sub: Any) -> None:
    """Register the ``leaderboard`` command."""
    p = sub.add_parser("leaderboard", help="one table of every defense, derived from its runs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--collect", action="store_true",
                      help="build the table from the committed results only and rewrite the docs (no attack runs)")  # fmt: skip
    mode.add_argument("--out", type=Path, help="run every missing row into DIR/<row>, then write the table in DIR")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(s.name for s in ROWS)}")
    p.add_argument("--dry-run", action="store_true", help="with --out: print the commands that would run")
    p.add_argument("--convergence-rounds", type=int, default=1, metavar="K",
                   help="with --out: run each row with a convergence ladder of up to K reruns, and resume a finished "
                   "run in DIR whose figure is not converged after fewer (only the missing reruns run)")  # fmt: skip
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval leaderboard``."""
    specs = select(None if args.rows is None else [n.strip() for n in args.rows.split(",") if n.strip()])
    if args.convergence_rounds < 1:
        raise ValueError(f"expected --convergence-rounds >= 1, got {args.convergence_rounds}")
    if args.collect:
        if args.rows is not None:
            raise ValueError("--collect writes the whole leaderboard: --rows goes with --out only")
        if args.convergence_rounds != 1:
            raise ValueError("--collect runs no attack: --convergence-rounds goes with --out only")
        board = collect(specs)
        write(board, JSON_PATH, PLOT_PATH, PAGES)
        where = JSON_PATH.parent
    else:
        out = Path(args.out)
        rounds = args.convergence_rounds
        if args.dry_run:
            for argv in run_missing(specs, out, dry_run=True, rounds=rounds):
                print(" ".join(["manifold-defense", *argv]))
            return 0
        out.mkdir(parents=True, exist_ok=True)
        run_missing(specs, out, rounds=rounds)
        board = collect(specs, extra=out)
        write(board, out / "leaderboard.json", out / "leaderboard.png")
        atomic_write_text(out / "leaderboard.md", "\n\n".join(f(board) for f in TABLES.values()) + "\n")
        where = out
    for r in board["rows"]:
        cells = ", ".join(f"{_SHORT[t]} {_cell(r['threats'][t], with_n=True)}" for t in THREATS)
        print(f"{r['name']}: {cells}")
    print(f"wrote {where}/leaderboard.json and leaderboard.png")
    return 0
