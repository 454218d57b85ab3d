"""Break anatomy: what a purifier did with each adversarial example that broke it, read from a harness run.

A purifier in front of a classifier (a GAN projection, DiffPure, a user's purifier) can lose a point in two
different ways. *Steered*: the attack moves the purifier's output to another digit, and the classifier, robust or
not, faithfully reads the wrong digit; the classifier's own robustness is beside the point, only the purifier was
beaten. *Survived*: the purified image still shows the true digit, yet the classifier reads another; the
perturbation (or an on-manifold one the purifier produced) survived the purification and fooled the classifier.
The two call for different fixes (a better prior or a stronger purifier against a more robust classifier), and the
harness's worst case does not tell them apart.

``manifold-defense break-anatomy RUN_DIR`` rebuilds the run's defenses from the command recorded in its
``results.json`` (the weights, data and settings are checked against the fingerprint in its ``state.pt``: a run
whose models changed is refused), takes the adversarial example that first broke each point (``broken_x_adv`` of
the cascade's stages) and, for each, reads:

- the bare classifier on the adversarial input, without the purifier (``alone``: would it have resisted?);
- ``--draws`` purifications of the adversarial input by the real defense, each under the harness's reseeding
  (a randomized purifier gives a fresh one each time): how often the classifier is wrong on them;
- on the first wrong draw, the purified image the classifier read (taken at the classifier's input): what one or
  more *judges* (other classifiers, not the defended one) read on it, and its L2 move ``||P(x_adv) - P(x)||``
  against the clean point's purification under the same seed, beside the input's move ``||x_adv - x||``.

A reproduced break is *steered* when every judge reads the classifier's wrong digit, *survived* when every judge
reads the true digit, and *ambiguous* otherwise; one that no draw reproduces (the harness's verdict draws were
other seeds) is *not reproduced*. The judges are classifiers too: a
judge fooled by what is left of the perturbation calls a survival a steer, so two judges of different training
(default ``mnist-classifier`` and ``mnist-l2-at``) must agree. Nothing is written into the run's folder; ``--json``
writes the per-point record with its SHA-256.

Threat model: that of the run (its ``--threats``); this reads its examples and attacks nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eval.cli import command_line
from eval.harness import state as st
from eval.harness.defenses import Defense
from eval.harness.registry import ladder_keys
from eval.leaderboard_rows import load_checked_json
from manifold_defense.integrity import atomic_write_text, checked_json, load_checked

__all__ = [
    "CATEGORIES",
    "COMMITTED",
    "RENDERERS",
    "SCHEMA",
    "BrokenPoint",
    "add_parsers",
    "anatomy",
    "broken_examples",
    "categorize",
    "markdown_summary",
    "rebuild_run",
    "summary",
]

SCHEMA = "manifold-defense break-anatomy v1"
#: The categories of a break, in the order the tables list them.
CATEGORIES: tuple[str, ...] = ("steered", "survived", "ambiguous", "not reproduced")
#: The default judges (the one a run defends is dropped: each zoo classifier's run keeps two).
DEFAULT_JUDGES = ("mnist-classifier", "mnist-pgd-at", "mnist-l2-at")


@dataclass(frozen=True)
class BrokenPoint:
    """One broken point of a run: where it broke, and what the purifier and the judges made of its example.

    ``index``: position among the run's points; ``label``: true class; ``threat``/``stage``: where it first broke;
    ``alone``: the bare classifier's class on the adversarial input; ``defended``: the classifier's class on the
    first purification of it that it gets wrong (the label when none does); ``judges``: judge name -> class read
    on that purified image; ``clean_judges``: the same on the clean point's purification under the same seed
    (each judge's reading of the unattacked purified image); both empty when no draw was wrong; ``input_judges``:
    each judge on the adversarial input itself, unpurified;
    ``input_move`` / ``purified_move``: L2 distances ``||x_adv - x||`` and ``||P(x_adv) - P(x)||`` (same seed);
    ``wrong_draws`` of ``draws``: purifications of the adversarial input classified wrong; ``category``:
    :func:`categorize`, or ``not reproduced`` when no draw was wrong.
    """

    index: int
    label: int
    threat: str
    stage: str
    alone: int
    defended: int
    judges: dict[str, int]
    clean_judges: dict[str, int]
    input_judges: dict[str, int]
    input_move: float
    purified_move: float
    wrong_draws: int
    draws: int
    category: str


def categorize(label: int, defended: int, judges: Mapping[str, int]) -> str:
    """The category of one break (:data:`CATEGORIES`): ``not reproduced`` when the fixed purification is classified
    correctly, ``steered`` when every judge reads the classifier's wrong class on it, ``survived`` when every judge
    reads the true class, ``ambiguous`` otherwise (judges disagree, or read a third class)."""
    if not judges:
        raise ValueError("expected at least one judge, got none")
    if defended == label:
        return "not reproduced"
    seen = set(judges.values())
    if seen == {defended}:
        return "steered"
    if seen == {label}:
        return "survived"
    return "ambiguous"


def broken_examples(state: Mapping[str, Any], defense: str, threat: str, attacks: Sequence[str]) -> list[tuple[int, str, Tensor]]:
    """``(index, stage, x_adv)`` of every point of ``defense`` broken at ``threat`` (a threat key, ``linf-0.3``),
    with the example of the first stage (in ``attacks`` order, then the reruns of the convergence ladder) that broke it,
    by index.

    Raises ``ValueError`` when the state holds no stage of that defense and threat."""
    stages = state.get("stages")
    if not isinstance(stages, Mapping):
        raise ValueError(f"expected a robustness state with 'stages', got {type(stages).__name__}")
    found: dict[int, tuple[str, Tensor]] = {}
    seen_any = False
    ladder = [k.attack for k in ladder_keys(stages, defense, threat)]
    for attack in (*attacks, *ladder):
        rec = stages.get(f"{defense}|{threat}|{attack}")
        if not isinstance(rec, Mapping):
            continue
        seen_any = True
        if rec.get("status") != "ran" or "broken_x_adv" not in rec:
            continue
        broken = rec["indices"][~rec["robust"]].tolist()
        for i, xa in zip(broken, rec["broken_x_adv"], strict=True):
            found.setdefault(int(i), (attack, xa))
    if not seen_any:
        raise ValueError(f"the run holds no stage of defense {defense!r} at threat {threat!r}")
    return [(i, found[i][0], found[i][1]) for i in sorted(found)]


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        logits = model(x)
    if not torch.isfinite(logits).all():
        raise ValueError("expected finite logits from the model, got NaN or inf")
    return logits.argmax(1)


class _Inputs:
    """Records what a classifier module is called on (a forward pre-hook): the purified images it classifies."""

    def __init__(self, module: nn.Module) -> None:
        self.seen: list[Tensor] = []
        self._handle = module.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].detach()))

    def close(self) -> None:
        self._handle.remove()


def _draw(defense: Defense, x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """One purification of ``x`` by the real defense under the harness's reseeding at ``seed``: ``(purified
    images, the classifier's classes on them)``, read at the classifier's input."""
    assert defense.classifier is not None
    tap = _Inputs(defense.classifier)
    try:
        with st.seeded(seed, defense, x.device):
            pred = _predict(defense.model, x)
    finally:
        tap.close()
    if len(tap.seen) != 1 or tap.seen[0].shape != x.shape:
        raise ValueError(f"expected defense {defense.name!r} to call its classifier once on purified images of shape "
                         f"{tuple(x.shape)}, got {[tuple(t.shape) for t in tap.seen]}")  # fmt: skip
    return tap.seen[0], pred


def anatomy(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    broken: Sequence[tuple[int, str, Tensor]],
    judges: Mapping[str, nn.Module],
    *,
    threat: str,
    draws: int = 8,
    seed: int = 0,
    batch: int = 100,
) -> list[BrokenPoint]:
    """The :class:`BrokenPoint` of each ``(index, stage, x_adv)`` in ``broken`` (:func:`broken_examples`).

    Each example is purified ``draws`` times by the real defense (draw ``k`` under the harness's reseeding at
    ``seed + 1 + k``; a deterministic defense gives the same image every draw); the first draw the classifier gets
    wrong is dissected: the judges read its purified image, its move is measured against the clean point's
    purification under the same seed. No wrong draw: ``not reproduced``.

    Args:
        defense: a purifier defense of the harness (with a ``classifier`` that its model calls on purified images).
        x, y: the run's points ``(N, C, H, W)`` in [0, 1] and labels ``(N,)``; not modified.
        judges: name -> classifier (images -> logits), each other than the defended classifier.
        threat: the threat key, recorded; draws: purifications per example (>= 1); seed: the run's seed.
        batch: examples purified together (>= 1); each batch is drawn under the same seeds.
    """
    if defense.preprocess is None or defense.classifier is None:
        raise ValueError(f"defense {defense.name!r} has no purifier: break anatomy reads purifier defenses only")
    for name, value in (("draws", draws), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected {name} as an int >= 1, got {value!r}")
    if not judges:
        raise ValueError("expected at least one judge, got none")
    out: list[BrokenPoint] = []
    for start in range(0, len(broken), batch):
        out += _anatomy_batch(defense, x, y, broken[start : start + batch], judges, threat, draws, seed)
    return out


def _anatomy_batch(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    broken: Sequence[tuple[int, str, Tensor]],
    judges: Mapping[str, nn.Module],
    threat: str,
    draws: int,
    seed: int,
) -> list[BrokenPoint]:
    assert defense.classifier is not None  # checked by anatomy
    device = x.device
    idx = torch.tensor([b[0] for b in broken], device=device)
    x0, y0 = x[idx], y[idx]
    x_adv = torch.stack([b[2] for b in broken]).to(device=device, dtype=x.dtype)
    alone = _predict(defense.classifier, x_adv)
    rows = len(broken)
    chosen = torch.full((rows,), -1, dtype=torch.long, device=device)
    p_adv, p_clean = torch.zeros_like(x_adv), torch.zeros_like(x0)
    defended = alone.clone()
    wrong = torch.zeros(rows, dtype=torch.long, device=device)
    for k in range(draws):
        purified, pred = _draw(defense, x_adv, seed + 1 + k)
        miss = pred != y0
        wrong += miss.long()
        first = miss & (chosen < 0)
        if first.any():
            clean, _ = _draw(defense, x0, seed + 1 + k)
            chosen[first], defended[first] = k, pred[first]
            p_adv[first], p_clean[first] = purified[first], clean[first]
    read = {name: _predict(j, p_adv) for name, j in judges.items()}
    read_clean = {name: _predict(j, p_clean) for name, j in judges.items()}
    read_input = {name: _predict(j, x_adv) for name, j in judges.items()}
    input_move = (x_adv - x0).flatten(1).norm(dim=1)
    purified_move = (p_adv - p_clean).flatten(1).norm(dim=1)
    out = []
    for r, (i, stage, _) in enumerate(broken):
        hit = bool(chosen[r] >= 0)
        j = {name: int(v[r]) for name, v in read.items()} if hit else {}
        category = categorize(int(y0[r]), int(defended[r]), j) if hit else "not reproduced"
        out.append(BrokenPoint(
            index=int(i), label=int(y0[r]), threat=threat, stage=stage, alone=int(alone[r]),
            defended=int(defended[r]) if hit else int(y0[r]), judges=j,
            clean_judges={name: int(v[r]) for name, v in read_clean.items()} if hit else {},
            input_judges={name: int(v[r]) for name, v in read_input.items()},
            input_move=round(float(input_move[r]), 4), purified_move=round(float(purified_move[r]), 4) if hit else 0.0,
            wrong_draws=int(wrong[r]), draws=draws, category=category,
        ))  # fmt: skip
    return out


def summary(points: Sequence[BrokenPoint]) -> dict[str, Any]:
    """Counts per category, how many the bare classifier resisted, the judges' clean accuracy on the purified clean
    points, median moves and the wrong-draw rate, over ``points`` (one threat)."""

    def median(values: list[float]) -> float | None:
        return round(float(torch.tensor(values).median()), 4) if values else None

    counts = {c: sum(p.category == c for p in points) for c in CATEGORIES}
    draws = sum(p.draws for p in points)
    return {
        "broken": len(points),
        "categories": counts,
        "alone_correct": sum(p.alone == p.label for p in points),
        # steered points whose unpurified input every judge already reads as the classifier's wrong class: the
        # perturbation changed the digit (or transferred to the judges) before the purifier moved it
        "steered_input_read_wrong": sum(
            p.category == "steered" and set(p.input_judges.values()) == {p.defended} for p in points
        ),
        "judges_clean_correct": {  # each judge's reading of the clean points' purifications, where dissected
            name: sum(p.clean_judges.get(name) == p.label for p in points)
            for name in sorted({n for p in points for n in p.clean_judges})
        },
        "median_input_move": median([p.input_move for p in points]),
        "median_purified_move": {c: median([p.purified_move for p in points if p.category == c]) for c in CATEGORIES[:3]},
        "wrong_draw_rate": None if draws == 0 else round(sum(p.wrong_draws for p in points) / draws, 4),
    }


def markdown_summary(record: Mapping[str, Any]) -> str:
    """The per-threat table of a break-anatomy record (the JSON ``--json`` writes)."""
    head = ["defense", "threat", "judges", "broken", "steered (input already read so)", "survived", "ambiguous", "not reproduced",
            "classifier alone right", "judges right on the clean purification",
            "median L2 move: input / purified, steered / survived", "wrong draws"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in record["rows"]:
        s = row["summary"]
        c = s["categories"]
        moved = s["median_purified_move"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rate = "-" if s["wrong_draw_rate"] is None else f"{s['wrong_draw_rate']:.2f}"
        judges = ", ".join(f"`{j}`" for j in row["judges"])
        steered = f"{c['steered']} ({s['steered_input_read_wrong']})"
        cells = [row["defense_label"], row["threat_label"], judges, s["broken"], steered, c["survived"], c["ambiguous"],
                 c["not reproduced"], f"{s['alone_correct']} of {s['broken']}",
                 " / ".join(str(s["judges_clean_correct"].get(j, 0)) for j in row["judges"])
                 + f" of {s['broken'] - c['not reproduced']}",
                 f"{fmt(s['median_input_move'])} / {fmt(moved['steered'])}, {fmt(moved['survived'])}", rate]  # fmt: skip
        lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    lines.append("")
    lines.append("*judges*: the classifiers that read the purified image of each example's first wrong draw; *steered*: every judge "
                 "reads the classifier's wrong digit (in brackets: of those, the points whose unpurified adversarial input every "
                 "judge already reads as that digit); *survived*: every judge reads the true digit; *not reproduced*: "
                 f"none of {record['draws']} purifications was wrong; *judges right on the clean purification*: each "
                 "judge (in order) on the clean point's purification under the same seed, a check that it reads "
                 "purified digits; *wrong draws*: the share of those purifications classified wrong.")  # fmt: skip
    return "\n".join(lines)


#: The committed record of the leaderboard's purifier rows (docs/leaderboard.md renders it).
COMMITTED = "docs/figures/break_anatomy.json"


def _committed_table() -> str:
    from eval.run_folder import read_record

    return markdown_summary(read_record(Path(__file__).resolve().parent.parent / COMMITTED))


#: Generated docs tables of this module (``eval.docs_tables``): name -> renderer.
RENDERERS = {"break-anatomy": _committed_table}


def rebuild_run(run_dir: Path, device: torch.device) -> tuple[dict[str, Any], dict[str, Any], list[Defense], Tensor, Tensor]:
    """``(results, state, defenses, x, y)`` of the harness run in ``run_dir``: its ``results.json`` and verified
    ``state.pt``, and its defenses and points rebuilt from the recorded command.

    Raises:
        ValueError: no results or state, a command other than ``robustness``, or rebuilt data or
            defenses whose hashes differ from the state's fingerprint (the models or data changed since the run).
    """
    from eval.cli import build_parser
    from eval.harness.command import evaluation_defenses, load_models
    from eval.harness.models import load_data
    from eval.robustness import evaluation_from_args, settings_from_args

    results_path, state_path = run_dir / "results.json", run_dir / st.STATE_FILE
    for path in (results_path, state_path):
        if not path.is_file():
            raise ValueError(f"expected a harness run folder holding {path.name}, got {run_dir} without it")
    results = load_checked_json(results_path)
    state = load_checked(state_path, what="robustness harness state", recover=st.RECOVER)
    command = results.get("command")
    words = shlex.split(command) if isinstance(command, str) else []
    if words[:4] != ["python", "-m", "eval", "robustness"]:
        raise ValueError(f"{results_path}: expected a recorded 'python -m eval robustness ...' command (runs of other "
                         f"commands, 'defense' included, are not read), got {command!r}")  # fmt: skip
    args = build_parser().parse_args(words[3:])
    settings = settings_from_args(args)
    request = evaluation_from_args(args, settings, args.defenses, run_dir, "robustness")
    x, y, _ = load_data(request.data, settings.n, device)
    models = load_models(request.models, device, mnist=request.data == "mnist")
    defenses = evaluation_defenses(request, models, x, settings)
    saved = state["fingerprint"]
    now = st.fingerprint(settings, defenses, x, y, None)
    if now["data"] != saved["data"]:
        raise ValueError(f"{run_dir}: the rebuilt points differ from the run's (data hash {now['data']}, the run's "
                         f"{saved['data']}): the data changed since the run")  # fmt: skip
    for name, digest in now["defenses"].items():
        if saved["defenses"].get(name) != digest:
            raise ValueError(f"{run_dir}: defense {name!r} rebuilt from the recorded command differs from the run's "
                             f"(hash {digest}, the run's {saved['defenses'].get(name)}): its weights or settings "
                             "changed since the run")  # fmt: skip
    return results, state, defenses, x, y


def _labels(results: Mapping[str, Any], name: str, threat: str) -> tuple[str, str]:
    models = str(results.get("models", ""))
    clf = models.split(",")[0].removeprefix("classifier ").strip() or "classifier"
    norm, eps = threat.split("-", 1)
    return f"{name} + `{clf}`", f"{'Linf' if norm == 'linf' else 'L2'} {eps}"


def add_parsers(sub: Any) -> None:
    """Register the ``break-anatomy`` command."""
    p = sub.add_parser("break-anatomy", help="what a purifier did with each example that broke it (steered or survived)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="harness run folders (robustness --out)")
    p.add_argument("--judges", default=None,
                   help=f"comma-separated classifiers (zoo names or module:factory) that read the purified images, "
                        f"none of them the defended classifier (default {','.join(DEFAULT_JUDGES)}, less the defended "
                        "one)")  # fmt: skip
    p.add_argument("--draws", type=int, default=8, help="purifications per example by the real defense (default 8)")
    p.add_argument("--batch", type=int, default=100, help="examples purified together (default 100)")
    p.add_argument("--json", type=Path, metavar="OUT.json", default=None, dest="json_out",
                   help="write the record (per-point and per-threat) as JSON with its SHA-256")  # fmt: skip
    p.add_argument("--reuse", type=Path, metavar="PREVIOUS.json", default=None,
                   help="a record this command wrote: the rows of a run whose results.json is unchanged (same "
                   "SHA-256), read with the same --judges, --draws, --batch and device, are taken from it instead "
                   "of purifying again")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=main)


def reusable_rows(previous: Mapping[str, Any], judges: str | None, draws: int, batch: int, device: str
                  ) -> dict[tuple[str, str], list[dict[str, Any]]]:  # fmt: skip
    """The rows of a previous record by ``(run folder, its results' SHA-256)``, when it was made with the same
    ``judges`` argument (``None``: the default), ``draws``, ``batch`` and ``device`` (else none: its rows would
    differ from a fresh reading)."""
    if previous.get("schema") != SCHEMA:
        raise ValueError(f"expected a break-anatomy record (schema {SCHEMA!r}) to reuse, got {previous.get('schema')!r}")
    same = (previous.get("judges_arg"), previous.get("draws"), previous.get("batch"), previous.get("device"))
    if same != (judges, draws, batch, device):
        return {}
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in previous.get("rows", []):
        if row.get("run_results_sha256"):
            out.setdefault((row["run"], row["run_results_sha256"]), []).append(row)
    return out


def _same(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold the same tensors (parameters and buffers); ``False`` when neither holds any (two
    modules without state cannot be told apart by their weights, and a judge is never refused on that ground)."""
    sa, sb = list(a.state_dict().values()), list(b.state_dict().values())
    return bool(sa) and [t.shape for t in sa] == [t.shape for t in sb] and all(
        torch.equal(u, v.to(u.device)) for u, v in zip(sa, sb, strict=True)
    )


def _judges(text: str | None, device: torch.device, defended: Sequence[nn.Module]) -> dict[str, nn.Module]:
    """The judges named by ``--judges`` (``None``: :data:`DEFAULT_JUDGES` less any the run defends); a named judge
    that is a defended classifier is refused (``ValueError``)."""
    from eval.harness.models import load_model

    names = list(DEFAULT_JUDGES) if text is None else [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"expected --judges as comma-separated classifier names, got {text!r}")
    out = {}
    for name in names:
        judge = load_model(name, "classifier", device)
        if any(_same(judge, clf) for clf in defended):
            if text is None:
                continue
            raise ValueError(f"judge {name!r} is the defended classifier itself: expected another classifier "
                             "(a judge must read the purified image independently)")  # fmt: skip
        out[name] = judge
    if not out:
        raise ValueError(f"every judge {names} is a defended classifier: expected at least one other (--judges)")
    return out


def main(args: argparse.Namespace) -> int:
    """Handler of ``manifold-defense break-anatomy``: prints the per-threat table; writes ``--json`` when given."""
    from manifold_defense.devices import resolve_device

    for flag, value in (("--draws", args.draws), ("--batch", args.batch)):
        if isinstance(value, bool) or value < 1:
            raise ValueError(f"expected {flag} as an int >= 1, got {value!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    previous = {} if args.reuse is None else reusable_rows(
        load_checked_json(args.reuse), args.judges, args.draws, args.batch, str(device)
    )
    rows: list[dict[str, Any]] = []
    reused: list[str] = []
    for run_dir in args.runs:
        results, state, defenses, x, y = rebuild_run(run_dir, device)  # checked even when its rows are reused
        sha = str(results.get("sha256"))
        if (str(run_dir), sha) in previous:
            rows += previous[(str(run_dir), sha)]
            reused.append(str(run_dir))
            continue
        purifiers = [d for d in defenses if d.preprocess is not None and d.classifier is not None]
        if not purifiers:
            raise ValueError(f"{run_dir}: the run evaluates no purifier defense: nothing to dissect")
        judges = _judges(args.judges, device, [d.classifier for d in purifiers if d.classifier is not None])
        settings = state["fingerprint"]["settings"]
        for d in purifiers:
            for threat in results["threat_models"]:
                broken = broken_examples(state, d.name, threat, settings["attacks"])
                points = anatomy(d, x, y, broken, judges, threat=threat, draws=args.draws, seed=settings["seed"],
                                 batch=args.batch)  # fmt: skip
                label, threat_label = _labels(results, d.name, threat)
                rows.append({"run": str(run_dir), "run_command": results["command"], "run_results_sha256": sha,
                             "defense": d.name,
                             "judges": list(judges),
                             "defense_label": label, "threat": threat, "threat_label": threat_label, "n": settings["n"],
                             "summary": summary(points), "points": [dataclasses.asdict(p) for p in points]})  # fmt: skip
    record = {"schema": SCHEMA, "command": command_line(args), "draws": args.draws, "batch": args.batch,
              "device": str(device), "judges_arg": args.judges, "reused": reused, "rows": rows}  # fmt: skip
    print(markdown_summary(record))
    if args.json_out is not None:
        atomic_write_text(args.json_out, json.dumps(checked_json(record), indent=1) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0
