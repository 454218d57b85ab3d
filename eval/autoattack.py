"""``python -m eval autoattack``: torchattacks' AutoAttack on a classifier from the zoo or a training checkpoint.

AutoAttack (Croce and Hein, ICML 2020) is the reference robustness number for an undefended (for example
adversarially trained) classifier: the ``standard`` version runs APGD-CE, APGD-T, FAB-T and Square and keeps, per
point, the first success. ``--budget torchattacks`` (the default, the budget of every figure recorded before the
option existed) runs torchattacks' ``AutoAttack`` wrapper, whose APGD, APGD-T and FAB take 10 iterations;
``--budget reference`` runs the same parts at the reference implementation's 100 iterations
(:class:`attacks.AutoAttackReference`), the figure to compare with published AutoAttack numbers. Threat model:
``||x_adv - x||_p <= eps`` with ``p`` in {inf, 2}, images in [0, 1], white box. For a defense with an input transformation (the projection defense) use ``python -m eval robustness``,
which runs APGD through BPDA and the adaptive cascade; this command attacks the classifier's own gradients.

Writes ``DIR/results.json``: ``{"model", "n", "clean_accuracy", "robust_accuracy", "threat_model", "version",
"budget", "audit": {"max_perturbation", "min", "max", "nan_count"}, "seconds", "settings"}`` and prints the two
accuracies.
The audit recomputes every figure from the returned adversarial images: the robust accuracy counts a point as
robust only if the classifier is right on its adversarial image, which must lie in the threat model.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attacks import PGD, Attack, AutoAttackReference, Norm, PGDConfig, ThreatModel, TorchattacksAttack
from attacks.base import check_finite_logits, model_name, predict
from eval.cli import command_line
from eval.inputs import check_labeled_images, positive_int_arg
from eval.run_folder import claim_run_folder
from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.devices import resolve_device
from manifold_defense.metrics import accuracy
from manifold_defense.progress import progress as progress_display
from manifold_defense.training.loop import load_checkpoint

__all__ = [
    "BUDGETS",
    "BUDGET_LABELS",
    "AutoAttackResult",
    "add_parsers",
    "attack_accuracy",
    "autoattack_accuracy",
    "budget_of",
    "figure_key",
    "load_checkpoint_classifier",
    "main",
    "record_figure",
]

log = logging.getLogger(__name__)

VERSIONS = ("standard", "plus", "rand")
#: ``torchattacks``: torchattacks' ``AutoAttack`` wrapper (10 iterations of APGD, APGD-T, FAB); ``reference``: the
#: reference implementation's budget (100 iterations; :class:`attacks.AutoAttackReference`).
BUDGETS = ("torchattacks", "reference")
BUDGET_LABELS = {"torchattacks": "torchattacks' 10-iteration wrapper", "reference": "reference budget"}
"""How tables name each budget."""


def budget_of(record: Mapping[str, Any]) -> str:
    """The budget an ``autoattack`` result or zoo figure ran: its ``budget``, or ``"torchattacks"`` for one
    written before the option existed."""
    return str(record.get("budget") or "torchattacks")


@dataclass(frozen=True)
class AutoAttackResult:
    """Accuracies of one AutoAttack run.

    Attributes:
        n: number of images.
        clean_accuracy: accuracy on the clean images.
        robust_accuracy: fraction of images still classified correctly on their adversarial image.
        max_perturbation: largest ``||x_adv - x||_p`` over the images (must be <= eps up to float error).
        value_range: ``(min, max)`` of the adversarial images.
        nan_count: non-finite values in the adversarial images.
        seconds: wall time of the attack.
    """

    n: int
    clean_accuracy: float
    robust_accuracy: float
    max_perturbation: float
    value_range: tuple[float, float]
    nan_count: int
    seconds: float


def autoattack_accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    threat: ThreatModel,
    *,
    version: str = "standard",
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = True,
    budget: str = "torchattacks",
) -> AutoAttackResult:
    """Clean and AutoAttack accuracy of ``model`` on ``(images, labels)``.

    Args:
        model: ``(B, C, H, W)`` in [0, 1] -> ``(B, K)`` logits, in eval mode on the images' device.
        images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)`` int64 in ``[0, K)``.
        threat: Linf or L2 :class:`attacks.ThreatModel`.
        version: torchattacks' AutoAttack version: ``"standard"`` (default), ``"plus"`` or ``"rand"``.
        batch_size: images per AutoAttack call (results do not depend on it beyond the attack's own seeding).
        seed: AutoAttack's seed.
        progress: tqdm bar over the batches.
        budget: ``"torchattacks"`` (torchattacks' wrapper, 10 iterations of APGD, APGD-T and FAB) or
            ``"reference"`` (the reference implementation's 100; :class:`attacks.AutoAttackReference`).

    Raises:
        TypeError: images or labels not tensors, labels not int64 on the images' device.
        ValueError: unknown version or budget, non-positive batch size, images and labels of different lengths, images
            not ``(N, C, H, W)`` in [0, 1], a model output that is not ``(B, K)`` logits, fewer than 4 classes
            (APGD-T's targeted DLR loss needs 4).
    """
    if version not in VERSIONS:
        raise ValueError(f"expected version in {VERSIONS}, got {version!r}")
    if budget not in BUDGETS:
        raise ValueError(f"expected budget in {BUDGETS}, got {budget!r}")
    num_classes = _check_inputs(model, images, labels, batch_size)
    if version != "rand" and num_classes < 4:
        raise ValueError(
            f"expected a model with at least 4 classes for AutoAttack {version!r} (its targeted DLR loss "
            f"compares the 4 largest logits), got {num_classes}"
        )
    attack: Attack
    if budget == "reference":
        attack = AutoAttackReference(threat, version=version, seed=seed)
    else:
        attack = TorchattacksAttack("AutoAttack", threat, seed=seed, version=version)
    return _run(model, images, labels, attack, batch_size, progress, "autoattack")


def _check_inputs(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> int:
    """Refuse bad arguments of :func:`attack_accuracy` / :func:`autoattack_accuracy`; put ``model`` in eval mode
    and return its number of classes (one forward pass on the first image)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected the model as a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"expected batch_size as an int >= 1, got {batch_size!r}")
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"expected images and labels as tensors, got {type(images).__name__} and {type(labels).__name__}"
        )
    if images.dim() < 1 or labels.dim() < 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"expected as many labels as images (at least one), got shapes {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    check_labeled_images(images, labels, 1)
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    if not isinstance(out, Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"expected the model to return logits (B, K), got {got}")
    check_finite_logits(out, f"model {model_name(model)}", "on image 0")
    return int(out.shape[1])


def attack_accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: Attack,
    *,
    batch_size: int = 250,
    progress: bool = True,
    desc: str = "autoattack",
) -> AutoAttackResult:
    """Clean and robust accuracy of ``model`` under any :class:`attacks.Attack` (AutoAttack's adapter, PGD, ...),
    audited from the returned adversarial images (threat model, value range, NaN count).

    Args:
        model: ``(B, C, H, W)`` in [0, 1] -> ``(B, K)`` logits, put in eval mode, on the images' device
            (call :func:`autoattack_accuracy` for AutoAttack).
        images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)`` int64.
        attack: the attack; its ``threat`` bounds the audit.
        batch_size: images per attack call; progress: show a bar; desc: its label.

    Raises:
        TypeError: model not an ``nn.Module``, attack not an :class:`attacks.Attack`, images or labels not tensors.
        ValueError: as :func:`autoattack_accuracy` (batch size, shapes, value range, logits).
    """
    if not isinstance(attack, Attack):
        raise TypeError(f"expected attack as an attacks.Attack, got {type(attack).__name__}")
    _check_inputs(model, images, labels, batch_size)
    return _run(model, images, labels, attack, batch_size, progress, desc)


def _run(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: Attack,
    batch_size: int,
    progress: bool,
    desc: str,
) -> AutoAttackResult:
    threat = attack.threat
    clean_ok, robust_ok, max_pert, lo, hi, nans = [], [], 0.0, float("inf"), float("-inf"), 0
    start = time.perf_counter()
    batches = range(0, images.shape[0], batch_size)
    for i in progress_display(batches, desc=desc, unit="batch", disable=not progress):
        x, y = images[i : i + batch_size], labels[i : i + batch_size]
        result = attack(model, x, y)
        x_adv = result.x_adv
        name, where = f"model {model_name(model)}", f"images {i}-{i + x.shape[0] - 1}"
        clean_ok.append((predict(model, x, name, f"on clean {where}") == y).cpu())
        robust_ok.append((predict(model, x_adv, name, f"on adversarial {where}") == y).cpu())
        delta = (x_adv - x).flatten(1)
        norms = delta.abs().amax(1) if threat.norm is Norm.LINF else delta.norm(dim=1)
        max_pert = max(max_pert, float(norms.max()))
        lo, hi = min(lo, float(x_adv.min())), max(hi, float(x_adv.max()))
        nans += int((~torch.isfinite(x_adv)).sum())
    return AutoAttackResult(
        n=int(images.shape[0]),
        clean_accuracy=float(torch.cat(clean_ok).float().mean()),
        robust_accuracy=float(torch.cat(robust_ok).float().mean()),
        max_perturbation=max_pert,
        value_range=(lo, hi),
        nan_count=nans,
        seconds=time.perf_counter() - start,
    )


def load_checkpoint_classifier(path: Path, name: str, device: torch.device) -> nn.Module:
    """The classifier held in a training checkpoint (``state["model"]``), built as zoo model ``name``.

    Checkpoints of :mod:`manifold_defense.training` are read with
    :func:`~manifold_defense.training.loop.load_checkpoint`: their integrity hash is verified (a cut or altered
    file raises :class:`~manifold_defense.integrity.IntegrityError`) and ``weights_only=True`` runs no code.
    """
    ckpt = load_checkpoint(path)
    saved = ckpt["state"] if isinstance(ckpt["state"], dict) else {}
    state = saved.get("model")
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected a training checkpoint of a classifier trainer with state['model'], got the "
            f"{ckpt.get('trainer') or 'unnamed'} trainer's with state {sorted(saved)}"
        )
    model = zoo.build(name)
    model.load_state_dict(state, strict=True)
    log.info("loaded %s from %s (step %s)", name, path, ckpt.get("step"))
    return model.to(device).eval()


def figure_key(norm: str, eps: float, attack: str = "autoattack") -> str:
    """Key of a figure in a zoo record's ``figures``: ``autoattack_linf_0.3``, ``pgd100_l2_2.5``."""
    return f"{attack}_{norm}_{eps:g}"


def record_figure(
    model: str,
    report: dict[str, Any],
    weights_dir: Path | None,
    clean_test: tuple[float, int] | None = None,
) -> dict[str, Any]:
    """Merge an ``autoattack`` report into the zoo record of ``model`` (``figures.autoattack_<norm>_<eps>``, with
    the ``budget`` it ran), keeping the record's other figures; the weights' SHA-256 must still match the record.

    ``clean_test``: ``(accuracy, n)`` on the whole MNIST test split, recorded as ``figures.clean_accuracy`` with
    ``n``, ``device`` and ``command`` (the same fields ``measure-zoo`` writes for ``mnist-classifier``).
    """
    zoo.verify(model, weights_dir)
    rec = zoo.record(model, weights_dir)
    threat = report["threat_model"]
    figures = dict(rec.get("figures", {}))
    figures[figure_key(threat["norm"], threat["eps"], report.get("attack", "autoattack"))] = {
        key: report[key] for key in ("n", "clean_accuracy", "robust_accuracy", "version", "seconds")
    } | {
        "budget": budget_of(report),
        "command": report["settings"]["command"],
        "device": report["settings"]["device"],
        "threads": report["settings"]["threads"],
        "data": report["settings"]["data"],
    }
    if clean_test is not None:
        figures.update(
            {
                "clean_accuracy": clean_test[0],
                "n": clean_test[1],
                "data": "MNIST test split",
                "device": report["settings"]["device"],
                "command": report["settings"]["command"],
                "torch": report["settings"]["torch"],
            }
        )
    return zoo.update_record(model, {"figures": figures}, weights_dir)


def add_parsers(sub: Any) -> None:
    """Register the ``autoattack`` command."""
    p = sub.add_parser(
        "autoattack",
        help="torchattacks' AutoAttack on a zoo classifier or a training checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="mnist-pgd-at", help="zoo classifier name (default mnist-pgd-at)")
    p.add_argument(
        "--weights-dir", type=Path, default=None, help="folder of the zoo weights (default: package)"
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None,
        help="training checkpoint.pt to evaluate instead of the zoo weights (built as --model)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json)")
    p.add_argument(
        "--n", type=positive_int_arg, default=1000, help="first N MNIST test images (default 1000)"
    )
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--eps", type=float, default=0.3, help="budget (default 0.3, Madry's MNIST Linf)")
    p.add_argument("--version", choices=VERSIONS, default="standard")
    p.add_argument(
        "--budget",
        choices=BUDGETS,
        default="torchattacks",
        help="torchattacks: its AutoAttack wrapper (10 iterations of APGD, APGD-T, FAB; the default, as every "
        "earlier figure); reference: the reference implementation's 100 iterations",
    )
    p.add_argument(
        "--pgd-steps",
        type=positive_int_arg,
        default=None,
        help="run the library's PGD with this many steps (random start, step 2.5 eps / steps; e.g. 100 at l2 2.5, "
        "Jalal et al.'s evaluation) instead of AutoAttack; recorded as figures.pgd<steps>_<norm>_<eps>",
    )
    p.add_argument("--restarts", type=positive_int_arg, default=1, help="PGD restarts (with --pgd-steps)")
    p.add_argument("--batch", type=positive_int_arg, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=positive_int_arg, default=None)
    p.add_argument("--data-dir", type=Path, default=None, help="torchvision MNIST folder (default: bundle)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--write",
        action="store_true",
        help="also merge the result into the model's zoo record (in --weights-dir) as figures.autoattack_<norm>_<eps>",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval autoattack``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.eps > 0:
        raise ValueError(f"expected --eps > 0, got {args.eps}")
    if args.write and args.checkpoint is not None:
        raise ValueError("--write records a zoo model's figure: it cannot be used with --checkpoint")
    device = resolve_device(args.device)
    protocol = ("model", "checkpoint", "weights_dir", "n", "norm", "eps", "version", "seed", "data_dir",
                "pgd_steps", "restarts", "budget")  # fmt: skip
    settings = {k: getattr(args, k, None) for k in protocol}
    if args.budget == "torchattacks":
        del settings["budget"]  # the folders written before --budget existed ran this budget and stay resumable
    claim_run_folder(args.out, "autoattack", settings)
    if args.checkpoint is not None:
        model = load_checkpoint_classifier(args.checkpoint, args.model, device)
    else:
        model = zoo.load(args.model, device, weights_dir=args.weights_dir)
    data = load_mnist("test", args.data_dir, limit=args.n)
    threat = ThreatModel(Norm.LINF if args.norm == "linf" else Norm.L2, args.eps)
    if args.pgd_steps is None:
        name = "autoattack"
        result = autoattack_accuracy(
            model,
            data.images.to(device),
            data.labels.to(device),
            threat,
            version=args.version,
            batch_size=args.batch,
            seed=args.seed,
            progress=not args.no_progress,
            budget=args.budget,
        )
    else:
        name = f"pgd{args.pgd_steps}"
        pgd = PGD(
            threat, PGDConfig(steps=args.pgd_steps, restarts=args.restarts, random_start=True, seed=args.seed)
        )
        result = attack_accuracy(
            model, data.images.to(device), data.labels.to(device), pgd, batch_size=args.batch,
            progress=not args.no_progress, desc=name,
        )  # fmt: skip
    body = asdict(result)
    report = {
        "attack": name,
        "model": args.model,
        "source": str(args.checkpoint) if args.checkpoint is not None else "zoo",
        "n": result.n,
        "clean_accuracy": result.clean_accuracy,
        "robust_accuracy": result.robust_accuracy,
        "threat_model": {"norm": args.norm, "eps": args.eps},
        "version": args.version
        if args.pgd_steps is None
        else f"PGD {args.pgd_steps} steps x {args.restarts} restarts",
        "budget": args.budget if args.pgd_steps is None else None,
        "audit": {k: body[k] for k in ("max_perturbation", "value_range", "nan_count")},
        "seconds": round(result.seconds, 1),
        "settings": {
            "seed": args.seed,
            "batch": args.batch,
            "data": f"first {result.n} MNIST test images",
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "command": command_line(args),
        },
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.write:
        test = load_mnist("test", args.data_dir)
        clean = accuracy(model, test.images, test.labels)
        record_figure(args.model, report, args.weights_dir, clean_test=(clean, len(test)))
        print(
            f"clean accuracy on the {len(test)} test images {clean:.4f}; recorded in the zoo record of {args.model}"
        )
    budget_text = ", reference budget" if report["budget"] == "reference" else ""
    print(
        f"{args.model} ({report['source']}), n {result.n}: clean {result.clean_accuracy:.4f}, {name} "
        f"({report['version']}{budget_text}, {args.norm} {args.eps}) {result.robust_accuracy:.4f}; max perturbation "
        f"{result.max_perturbation:.4f}; {result.seconds:.0f} s; wrote {args.out}/results.json"
    )
    return 0
