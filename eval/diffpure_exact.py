"""``python -m eval diffpure-exact --out DIR --t-star T``: PGD with exact gradients through DiffPure's whole reverse
process, at growing step counts, to show whether the harness's cascade on DiffPure has converged.

The attack differentiates the real purification (every DDIM step, gradient checkpointed: memory of one network
pass), averages ``--eot`` purifications per step (EOT), and runs ``--pgd-steps`` steps (each count a separate run
from the same seed, e.g. 10 / 50 / 200); every adversarial example is then judged on the real randomized defense,
a point counting as robust only when it is classified correctly in each of ``--draws`` fresh purifications (the
worst case over draws, as DiffHammer asks: averaging over draws weakens the verdict). Each ``(threat, steps)`` row
is written to ``DIR/exact.json`` as it finishes (with a hash) and a rerun of the same command resumes at the first
missing row. ``--cumulative`` attacks each count only on the points the shorter counts of its threat left robust:
the rows are then the worst case over the counts so far (monotone by construction), which costs little once most
points break. The cost is dominated by the UNet passes: ``steps x eot x 2 x (reverse steps)`` forward-equivalents per
point and PGD step (the backward pass recomputes each step once), which is why ``scripts/gpu_checks.sh`` runs this
command on a GPU when one is lent.

Papers: Nie et al., "Diffusion Models for Adversarial Purification" (ICML 2022); Lee and Kim, "Robust Evaluation
of Diffusion-Based Adversarial Purification" (ICCV 2023); Wang et al., "DiffHammer" (NeurIPS 2024).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from attacks import PGDConfig
from eval.cli import command_line
from eval.diffpure import add_prior_args, check_positive, int_list, load_prior
from eval.harness import parse_threat
from eval.run_folder import claim_run_folder, read_record, run_folder_session, write_record
from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.diffpure import diffpure_classifier
from manifold_defense.evaluation import correct_in_every_draw, evaluate_pgd

log = logging.getLogger(__name__)
RESULTS = "exact.json"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "diffpure-exact",
        help="PGD with exact gradients through DiffPure's reverse process at growing step counts (convergence)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--t-star", type=int, required=True, help="DiffPure's t* (from diffpure-tstar)")
    p.add_argument("--steps", type=int, default=10, help="DDIM reverse steps of the purifier")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--threats", default="linf-0.3,l2-2,l2-4")
    p.add_argument("--pgd-steps", type=lambda t: int_list(t, 1), default=[10, 50, 200])
    p.add_argument("--eot", type=int, default=4, help="purifications averaged per PGD step")
    p.add_argument("--draws", type=int, default=3, help="fresh purifications per verdict (worst case)")
    p.add_argument("--n", type=int, default=20, help="first test images attacked")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--cumulative", action="store_true",
                   help="each step count attacks only the points every shorter count of its threat left robust "
                   "(rows are then the worst case over the counts so far; far cheaper once most points break)")  # fmt: skip
    add_prior_args(p)
    p.set_defaults(func=run)


@run_folder_session()
def run(args: argparse.Namespace) -> int:
    check_positive(args, ("steps", "eot", "draws", "n", "batch"))
    threats = [parse_threat(t.strip()) for t in args.threats.split(",") if t.strip()]
    prior, dev, weights = load_prior(args, args.t_star)
    classifier = zoo.load("mnist-classifier", dev)
    protocol = {k: getattr(args, k) for k in ("t_star", "steps", "eta", "eot", "draws", "n")} | {"weights": weights}
    if args.cumulative:  # (recorded only when set: folders of earlier runs keep their protocol)
        protocol["cumulative"] = True
    out = claim_run_folder(args.out, "diffpure-exact", protocol)
    path = out / RESULTS
    rows: list[dict[str, Any]] = read_record(path)["rows"] if path.is_file() else []
    test = load_mnist("test", args.data_dir, limit=args.n)
    x, y = test.images.to(dev), test.labels.to(dev)
    defended = diffpure_classifier(classifier, prior, args.t_star, args.steps, eta=args.eta, seed=args.t_star)
    exact = defended.variant("exact").eval()
    with torch.no_grad():
        clean = correct_in_every_draw(defended, x, y, args.draws, args.batch, name="DiffPure")
    for threat in threats:
        alive = clean.cpu().clone()  # --cumulative: the points every shorter count left robust
        for steps in sorted(args.pgd_steps) if args.cumulative else args.pgd_steps:
            key = {"threat": f"{threat.norm.value}-{threat.eps:g}", "pgd_steps": steps}
            done = [r for r in rows if all(r[k] == v for k, v in key.items())]
            if done:
                alive = torch.zeros_like(alive)
                alive[done[0]["robust"]] = True
                continue
            todo = alive.nonzero().flatten() if args.cumulative else torch.arange(len(x))
            robust = torch.zeros(len(x), dtype=torch.bool)
            seconds = 0.0
            if len(todo):
                config = PGDConfig(steps=steps, eot_samples=args.eot, seed=steps)
                sub = todo.to(dev)
                result = evaluate_pgd(
                    exact, x[sub], y[sub], threat, config, eval_model=defended, draws=args.draws,
                    clean_correct=clean[sub], batch_size=args.batch,
                )  # fmt: skip
                robust[todo] = result.robust.cpu()
                seconds = result.seconds
            if args.cumulative:
                alive = robust.clone()
            rows.append({**key, "accuracy": round(float(robust.float().mean()), 4), "n": len(x),
                         "attacked": len(todo), "cumulative": bool(args.cumulative),
                         "clean_accuracy": round(float(clean.float().mean()), 4),
                         "robust": [int(i) for i in robust.nonzero().flatten()],
                         "seconds": round(seconds, 1)})  # fmt: skip
            log.info("%s", json.dumps(rows[-1]))
            write_record(path, {"command": command_line(args), "protocol": protocol, "rows": rows})
    print(json.dumps({"command": command_line(args), "rows": rows}, indent=1))
    return 0
