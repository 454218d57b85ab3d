"""``python -m eval diffpure-tstar --out DIR``: choose DiffPure's diffusion time ``t*`` on the validation split.

For each ``t*`` of ``--t-stars`` the purifier :class:`manifold_defense.diffpure.DiffusionPurifier` (the zoo's
``mnist-ddpm``, ``--steps`` DDIM steps, ``--eta``) is put in front of the classifier (``mnist-classifier``) and
measured on the first validation images (never the test points the harness reports):

- clean accuracy on ``--n`` images, a point counting as correct only when it is correct in each of ``--draws``
  fresh purifications (the worst case over draws, as a randomized defense is scored);
- a short adaptive probe on the first ``--probe-n`` of them: PGD at Linf ``--probe-eps`` with BPDA (identity
  backward through the purifier) and EOT (``--probe-eot`` purifications averaged per step), ``--probe-steps``
  steps, verdicts the worst of ``--draws`` fresh purifications;
- network passes per purified image and seconds per image on this machine.

The chosen ``t*`` is the one with the highest probe accuracy among those whose clean accuracy reaches
``--min-clean`` (ties: the smaller ``t*``, which changes the input less). With ``--test-n N`` the defended clean
accuracy at the chosen ``t*`` is then measured on the first ``N`` test images (worst of ``--draws``). Each ``t*`` row is written to
``DIR/tstar.json`` as it finishes (with a hash; a rerun of the same command resumes at the first missing row), and
the curve to ``DIR/tstar.png``. Papers: Nie et al., "Diffusion Models for Adversarial Purification" (ICML 2022),
who choose ``t*`` the same way (clean accuracy against robustness); BPDA + EOT: Athalye, Carlini, Wagner (ICML 2018).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from attacks import Norm, PGDConfig, ThreatModel
from eval.cli import command_line
from eval.run_folder import claim_run_folder, read_record, run_folder_session, write_record
from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.devices import resolve_device
from manifold_defense.diffpure import diffpure_classifier
from manifold_defense.diffusion import DiffusionModel, ddim_timesteps
from manifold_defense.evaluation import correct_in_every_draw, correct_per_draw, evaluate_pgd

log = logging.getLogger(__name__)
RESULTS = "tstar.json"


def int_list(text: str, low: int = 0) -> list[int]:
    """Comma-separated ints ``>= low`` (an ``argparse`` type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from err
    if not values or any(v < low for v in values):
        raise argparse.ArgumentTypeError(f"expected ints >= {low}, got {text!r}")
    return values


def add_prior_args(p: argparse.ArgumentParser) -> None:
    """The options every DiffPure command shares: where the prior is, the device, threads and data."""
    p.add_argument("--weights-dir", type=Path, default=None, help="where mnist-ddpm is (default: the zoo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=None)


def check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """``ValueError`` naming every option of ``names`` that is not positive."""
    bad = {k: getattr(args, k) for k in names if getattr(args, k) <= 0}
    if bad:
        raise ValueError(f"expected positive values, got {bad}")


def load_prior(args: argparse.Namespace, t_star: int | None = None) -> tuple[DiffusionModel, torch.device, str]:
    """``(mnist-ddpm, device, its weights' SHA-256)`` from ``--weights-dir``, ``--device`` and ``--threads``;
    ``t_star`` (if given) is checked against the prior's timesteps."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    prior = zoo.load("mnist-ddpm", dev, weights_dir=args.weights_dir)
    if not isinstance(prior, DiffusionModel):
        raise TypeError(f"expected mnist-ddpm to load as a DiffusionModel, got {type(prior).__name__}")
    if t_star is not None and not 0 <= t_star < prior.timesteps:
        raise ValueError(f"expected --t-star in [0, {prior.timesteps - 1}], got {t_star}")
    sha = str(zoo.record("mnist-ddpm", args.weights_dir or zoo.WEIGHTS_DIR).get("sha256"))
    return prior, dev, sha


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "diffpure-tstar",
        help="choose DiffPure's t* on the validation split (clean accuracy and a BPDA + EOT probe per t*)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--t-stars", type=int_list, default=[50, 100, 200, 300, 400, 500])
    p.add_argument("--steps", type=int, default=10, help="DDIM reverse steps (network passes) per purification")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise of the reverse steps (0 to 1)")
    p.add_argument("--n", type=int, default=500, help="validation images for clean accuracy")
    p.add_argument("--probe-n", type=int, default=50, help="of those, images for the BPDA + EOT probe")
    p.add_argument("--probe-eps", type=float, default=0.3)
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--probe-eot", type=int, default=4)
    p.add_argument("--draws", type=int, default=3, help="fresh purifications per verdict (worst case)")
    p.add_argument("--min-clean", type=float, default=0.985)
    p.add_argument("--test-n", type=int, default=0, help="test images for the chosen t*'s clean accuracy (0: none)")
    p.add_argument("--batch", type=int, default=100)
    add_prior_args(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    check_positive(args, ("steps", "n", "probe_n", "probe_steps", "probe_eot", "draws", "batch"))
    if args.test_n < 0:
        raise ValueError(f"expected --test-n >= 0, got {args.test_n}")
    if args.probe_n > args.n:
        raise ValueError(f"expected --probe-n <= --n, got {args.probe_n} > {args.n}")
    if not 0.0 <= args.eta <= 1.0 or not 0.0 < args.probe_eps <= 1.0 or not 0.0 <= args.min_clean <= 1.0:
        raise ValueError(
            f"expected --eta in [0, 1], --probe-eps in (0, 1], --min-clean in [0, 1]; got {args.eta}, "
            f"{args.probe_eps}, {args.min_clean}"
        )


def measure_tstar(
    prior: DiffusionModel,
    classifier: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    t_star: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One row of the sweep: clean accuracy (worst of ``draws``), the BPDA + EOT probe, cost per image."""
    defended = diffpure_classifier(classifier, prior, t_star, args.steps, eta=args.eta, seed=t_star)
    start = time.perf_counter()
    with torch.no_grad():
        clean = correct_in_every_draw(defended, x, y, args.draws, args.batch, name=f"diffpure t*={t_star}")
    seconds = (time.perf_counter() - start) / (args.draws * len(x))
    config = PGDConfig(steps=args.probe_steps, eot_samples=args.probe_eot, seed=t_star)
    threat = ThreatModel(Norm.LINF, args.probe_eps)
    xp, yp = x[: args.probe_n], y[: args.probe_n]
    probe = evaluate_pgd(  # BPDA (the defended model's default gradient) + EOT; verdicts on fresh purifications
        defended, xp, yp, threat, config, eval_model=defended, draws=args.draws,
        clean_correct=clean[: args.probe_n], batch_size=args.batch,
    )  # fmt: skip
    return {
        "t_star": t_star,
        "clean_accuracy": round(float(clean.float().mean()), 4),
        "n": len(x),
        "probe_accuracy": round(probe.accuracy, 4),
        "probe_n": len(xp),
        "network_passes_per_image": len(ddim_timesteps(t_star, args.steps)),
        "seconds_per_image": round(seconds, 4),
        "probe_seconds": round(probe.seconds, 1),
    }


def choose(rows: list[dict[str, Any]], min_clean: float) -> dict[str, Any] | None:
    """The row with the best probe accuracy among those with clean accuracy >= ``min_clean`` (ties: smaller t*)."""
    ok = [r for r in rows if r["clean_accuracy"] >= min_clean]
    return min(ok, key=lambda r: (-r["probe_accuracy"], r["t_star"])) if ok else None


@run_folder_session()
def run(args: argparse.Namespace) -> int:
    _check(args)
    prior, dev, weights = load_prior(args)
    classifier = zoo.load("mnist-classifier", dev)
    protocol = {
        k: getattr(args, k)
        for k in ("steps", "eta", "n", "probe_n", "probe_eps", "probe_steps", "probe_eot", "draws")
    } | {"weights": weights}
    out = claim_run_folder(args.out, "diffpure-tstar", protocol)
    path = out / RESULTS
    rows: list[dict[str, Any]] = read_record(path)["rows"] if path.is_file() else []
    val = load_mnist("val", args.data_dir, limit=args.n)
    x, y = val.images.to(dev), val.labels.to(dev)
    for t_star in args.t_stars:
        if any(r["t_star"] == t_star for r in rows):
            continue
        if t_star >= prior.timesteps:
            raise ValueError(f"expected t* < {prior.timesteps} (the prior's timesteps), got {t_star}")
        row = measure_tstar(prior, classifier, x, y, t_star, args)
        rows = sorted([*rows, row], key=lambda r: r["t_star"])
        log.info("t*=%d: %s", t_star, json.dumps(row))
        write_record(path, {"command": command_line(args), "protocol": protocol, "rows": rows})
    best = choose([r for r in rows if r["t_star"] in args.t_stars], args.min_clean)
    record = {
        "command": command_line(args), "protocol": protocol, "rows": rows,
        "chosen": best["t_star"] if best else None, "rule": f"best probe accuracy with clean >= {args.min_clean}",
    }  # fmt: skip
    if best is not None and args.test_n > 0:
        record["test"] = _test_accuracy(prior, classifier, best["t_star"], args, dev)
    write_record(path, record)
    _plot(rows, out / "tstar.png")
    print(json.dumps(record, indent=1))
    return 0


def _test_accuracy(
    prior: DiffusionModel, classifier: torch.nn.Module, t_star: int, args: argparse.Namespace, dev: torch.device
) -> dict[str, Any]:
    """Defended clean accuracy at ``t_star`` on the first ``--test-n`` test images: worst of ``--draws`` (a point
    counts when every draw is right) and, beside it, each draw's accuracy and their mean (one purification per
    image, the usual clean accuracy of a randomized defense)."""
    test = load_mnist("test", args.data_dir, limit=args.test_n)
    defended = diffpure_classifier(classifier, prior, t_star, args.steps, eta=args.eta, seed=t_star + 1)
    with torch.no_grad():
        ok = correct_per_draw(defended, test.images.to(dev), test.labels.to(dev), args.draws, args.batch)
    per_draw = [round(float(d.float().mean()), 4) for d in ok]
    return {"t_star": t_star, "n": args.test_n, "draws": args.draws,
            "clean_accuracy": round(float(ok.all(dim=0).float().mean()), 4),
            "clean_accuracy_per_draw": per_draw, "clean_accuracy_mean_of_draws": round(sum(per_draw) / len(per_draw), 4)}  # fmt: skip


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ts = [r["t_star"] for r in rows]
    ax.plot(ts, [r["clean_accuracy"] for r in rows], "o-", label="clean (worst of draws)")
    ax.plot(ts, [r["probe_accuracy"] for r in rows], "s-", label="BPDA + EOT probe")
    ax.set_xlabel("t* (diffusion timestep of the input)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
