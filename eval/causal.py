"""``python -m eval causal --out DIR [--quick] [--train]``: CausalGAN (Kocaoglu, Snyder, Dimakis, Vishwanath,
ICLR 2018) on the digit world, checked against its exact conditional and interventional distributions.

The digit world (:mod:`manifold_defense.causal.world`: ``D -> T, D -> S, T -> S``; D digit of 0, 1, 3, 4, 7, T stroke
thickness, S slant) is ours, so ``P(D | T = t)`` and ``P(D | do(T = t))`` are known exactly. The command

1. samples ``train_size`` labelled images of the world (seed ``seed``);
2. fits the causal controller (true graph) on their labels, and two wrong-graph baselines on the same labels:
   ``independent`` (no edges) and ``reversed`` (the complete graph in the wrong order S -> T -> D);
3. trains the label-conditioned image GAN (``--train``, checkpointed in ``DIR/checkpoints/gan``, resumable) or
   loads the shipped ``causal-digit-gan`` and ``causal-digit-controller`` from the zoo (the default without
   ``--train``);
4. for the observational setting, ``do(T = thick)``, ``T = thick``, ``do(T = thin)``, ``T = thin``,
   ``do(S = right)`` and ``S = right``, draws ``n_samples`` images from each model (the same image generator for the
   baselines: only the controller differs) and reads their attributes back (D: the zoo classifier; T, S:
   morphometrics), then compares each read distribution with the exact one of the same setting, and with the exact
   one of the matching other setting (conditioning versus intervention); the same for real world images drawn from
   the exact distributions (the reading floor);
5. writes ``results.json``, ``results.md``, ``do_vs_condition.png`` (do(T = thick) next to T = thick, sorted by
   digit) and, after training, the models as a zoo folder ``DIR/models``.

Resumable: the GAN resumes from its checkpoint, each (model, setting) figure is cached in ``DIR/cache`` (keyed by
the protocol and the models' SHA-256). The same command with more ``--steps`` continues the GAN run in the same
folder (its constant learning rate allows it, as ``eval train gan``) and recomputes the figures of the new weights.
``--quick``: 2000 training images, 30 GAN steps, 200 samples per setting: a smoke test (about a minute), not the
protocol; its image figures are meaningless.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval.causal_report import SETTINGS, SHOWN, figure_checks, plot_do_vs_condition, write_markdown, write_zoo
from eval.cli import command_line
from eval.inputs import positive_int_arg
from eval.run_folder import claim_run_folder, read_record, run_folder_session, write_record
from manifold_defense import zoo
from manifold_defense.causal import (
    CausalController,
    CausalGAN,
    CausalGraph,
    ConditionalGenerator,
    DigitWorld,
    Node,
    ProjectionCritic,
    marginal,
    one_hot_labels,
    read_attributes,
    train_causal_gan,
    train_controller,
    tvd,
)
from manifold_defense.data import load_mnist
from manifold_defense.devices import resolve_device
from manifold_defense.training import GANTrainConfig

__all__ = ["SETTINGS", "CausalProtocol", "add_parsers", "baseline_graphs", "main", "run", "write_zoo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CausalProtocol:
    """Settings of one ``eval causal`` run (all decide its figures; ``images=False``: ``--labels-only``)."""

    train: bool = False
    train_size: int = 20000
    steps: int = 5000
    batch_size: int = 64
    bn_batches: int = 40
    controller_steps: int = 1500
    n_samples: int = 2000
    seed: int = 0
    quick: bool = False
    images: bool = True

    def gan_config(self) -> GANTrainConfig:
        return GANTrainConfig(steps=self.steps, batch_size=self.batch_size, bn_batches=self.bn_batches,
                              seed=self.seed, checkpoint_every=min(500, self.steps))  # fmt: skip


def quick_protocol(**overrides: Any) -> CausalProtocol:
    base = CausalProtocol(train=True, train_size=2000, steps=30, batch_size=32, bn_batches=2, controller_steps=300,
                          n_samples=200, quick=True)  # fmt: skip
    return dataclasses.replace(base, **overrides)


def baseline_graphs() -> dict[str, CausalGraph]:
    """The wrong graphs: attributes independent, and the complete graph in the wrong order (S -> T -> D)."""
    g = DigitWorld.graph
    return {
        "independent": CausalGraph(Node(n, g[n].values) for n in g.order),
        "reversed": CausalGraph(
            [Node("S", g["S"].values), Node("T", g["T"].values, ("S",)), Node("D", g["D"].values, ("S", "T"))]
        ),
    }


def _columns(graph: CausalGraph) -> list[int]:
    """Columns of world-ordered label rows, in ``graph``'s order."""
    return [DigitWorld.graph.order.index(n) for n in graph.order]


def _to_world(graph: CausalGraph, rows: torch.Tensor) -> torch.Tensor:
    """Label rows in ``graph``'s order to the world's order (D, T, S)."""
    return rows[:, [graph.order.index(n) for n in DigitWorld.graph.order]]


def _world_joint(controller: CausalController) -> torch.Tensor:
    """The controller's exact joint with its axes in the world's order."""
    joint = controller.joint()
    return joint.permute(*[controller.graph.order.index(n) for n in DigitWorld.graph.order])


def _exact(kind: str, assignment: dict[str, str], node: str) -> torch.Tensor:
    if kind == "do":
        return DigitWorld.distribution(node, intervene=assignment)
    return DigitWorld.distribution(node, condition=assignment or None)


def _histogram(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(values.long(), minlength=k).double() / max(len(values), 1)


def _figures(
    read: dict[str, torch.Tensor], labels: torch.Tensor | None, kind: str, assignment: dict[str, str]
) -> dict[str, Any]:
    """Per node: the read distribution, its TVD to the exact one of this setting and of the matching other
    setting (do <-> condition); for the fixed node, the fraction read as the set value."""
    g = DigitWorld.graph
    out: dict[str, Any] = {}
    for node in g.order:
        k = g[node].cardinality
        hist = _histogram(read[node], k)
        entry: dict[str, Any] = {"read": [round(float(v), 4) for v in hist]}
        if node in assignment:
            entry["read_as_set"] = round(float(hist[g.value_index(node, assignment[node])]), 4)
        else:
            exact = _exact(kind, assignment, node)
            entry["exact"] = [round(float(v), 4) for v in exact]
            entry["tvd"] = round(tvd(hist, exact), 4)
            if kind in ("do", "condition"):
                other = _exact("condition" if kind == "do" else "do", assignment, node)
                entry["tvd_to_other"] = round(tvd(hist, other), 4)
                entry["exact_do_vs_condition"] = round(tvd(exact, other), 4)
        if labels is not None:
            entry["label"] = [round(float(v), 4) for v in _histogram(labels[:, g.order.index(node)], k)]
            if node in read:
                entry["read_agrees_with_label"] = round(
                    float((read[node] == labels[:, g.order.index(node)]).double().mean()), 4
                )
        out[node] = entry
    if kind == "observe":
        joint = torch.zeros(g.shape, dtype=torch.float64)
        rows = torch.stack([read[n] for n in g.order], dim=1)
        for row, count in zip(*rows.unique(dim=0, return_counts=True), strict=True):
            joint[tuple(row.tolist())] = float(count)
        out["joint_tvd"] = round(tvd(joint / joint.sum(), DigitWorld.joint()), 4)
    return out


class _Cache:
    """Per-item figures in ``folder`` as JSON, fingerprinted by the protocol and the models' SHA-256; each entry
    carries a SHA-256 of its content (:func:`eval.run_folder.write_record`): a cut or altered one raises
    :class:`~manifold_defense.integrity.IntegrityError` naming it."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder, self.fingerprint = folder, json.dumps(fingerprint, sort_keys=True)
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, item: str) -> dict[str, Any] | None:
        path = self.folder / f"{item}.json"
        if not path.is_file():
            return None
        entry = read_record(
            path, what="causal figures cache entry", recover="delete it to recompute that item (or use a new --out)"
        )
        if entry.get("fingerprint") != self.fingerprint:
            return None  # figures of other weights (a continued run): recomputed
        figures: dict[str, Any] = entry["figures"]
        return figures

    def put(self, item: str, figures: dict[str, Any]) -> None:
        write_record(self.folder / f"{item}.json", {"fingerprint": self.fingerprint, "figures": figures})


def _common_record(protocol: CausalProtocol, command: str, dev: torch.device) -> dict[str, Any]:
    return {"command": command, "seed": protocol.seed, "device": str(dev), "torch": torch.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "data": f"digit world, {protocol.train_size} labelled images from the MNIST train split "
                    f"(DigitWorld.sample(n, seed={protocol.seed}))"}  # fmt: skip


def _train_controller(
    protocol: CausalProtocol, out: Path, dev: torch.device, command: str
) -> CausalController:
    """Fit (or reuse from ``out/models``) the controller on the world's labels (seconds)."""
    models = out / "models"
    if "causal-digit-controller" in zoo.available(models):
        return zoo.load("causal-digit-controller", "cpu", weights_dir=models)  # type: ignore[return-value]
    controller = zoo.build("causal-digit-controller")
    if not isinstance(controller, CausalController):
        raise TypeError(
            f"zoo entry causal-digit-controller: expected a CausalController, got {type(controller)}"
        )
    labels = DigitWorld.sample_labels(
        protocol.train_size, protocol.seed
    )  # the labels of world.sample(n, seed)
    fit = train_controller(controller, labels, steps=protocol.controller_steps, seed=protocol.seed)
    zoo.save(controller, "causal-digit-controller", models, {"training": {
        **_common_record(protocol, command, dev),
        "data": f"the (D, T, S) labels of DigitWorld.sample({protocol.train_size}, seed={protocol.seed}) "
                "(DigitWorld.sample_labels: no images needed)",
        "method": "maximum likelihood per node (full-batch Adam, lr 0.01, over the distinct label rows weighted "
                  "by their counts)",
        "steps": protocol.controller_steps, "nll": fit["nll"], "seconds": fit["seconds"]}})  # fmt: skip
    return controller


def _train_gan(
    protocol: CausalProtocol, world: DigitWorld, out: Path, dev: torch.device, classifier: nn.Module,
    command: str, progress: bool,
) -> ConditionalGenerator:  # fmt: skip
    """Train (or resume, or reuse from ``out/models``) the label-conditioned image GAN."""
    models = out / "models"
    if (
        "causal-digit-gan" in zoo.available(models)
        and zoo.record("causal-digit-gan", models)["training"]["config"]["steps"] == protocol.steps
    ):
        return zoo.load("causal-digit-gan", dev, weights_dir=models)  # type: ignore[return-value]
    data = world.sample(protocol.train_size, protocol.seed)
    with torch.random.fork_rng():
        torch.manual_seed(protocol.seed)  # the initial weights
        gen = zoo.build("causal-digit-gan")
        disc = ProjectionCritic(label_dim=9, width=32)
    if not isinstance(gen, ConditionalGenerator):
        raise TypeError(f"zoo entry causal-digit-gan: expected a ConditionalGenerator, got {type(gen)}")
    val_labels = DigitWorld.sample_labels(500, protocol.seed + 7)

    def validate(sample_gen: nn.Module, step: int) -> dict[str, float]:
        with torch.no_grad():
            z = torch.randn(500, gen.latent_dim, generator=torch.Generator().manual_seed(step))
            images = sample_gen(z.to(dev), one_hot_labels(DigitWorld.graph, val_labels).to(dev)).cpu()
        read = read_attributes(images, classifier)
        return {f"val_{n}_read_ok": float((read[n] == val_labels[:, i]).double().mean())
                for i, n in enumerate(DigitWorld.graph.order)}  # fmt: skip

    start = time.perf_counter()
    config = protocol.gan_config()
    hist = train_causal_gan(gen, disc, data.images, data.labels, DigitWorld.graph, config, device=dev,
                            checkpoint_dir=out / "checkpoints" / "gan", progress=progress,
                            validate=validate, validate_every=min(1000, config.steps))  # fmt: skip
    seconds = round(time.perf_counter() - start, 1)
    zoo.save(gen, "causal-digit-gan", models, {"training": {
        **_common_record(protocol, command, dev), "config": dataclasses.asdict(config),
        "discriminator": "ProjectionCritic(label_dim=9, width=32)",
        "conditional": "train_causal_gan (train_gan(conditional=True)): one-hot (D, T, S) of the batch's real images",
        "seconds": seconds, "seconds_note": "wall time of the last invocation (a resumed run counts its part)",
        "final_metrics": hist[-1] if hist else {}}})  # fmt: skip
    (models / "history.json").write_text(json.dumps(hist, indent=1) + "\n")
    return gen


def _label_figures(ctrl: CausalController) -> dict[str, Any]:
    """Per setting and free node: the controller's exact distribution and its TVD to the exact truth."""
    out: dict[str, Any] = {}
    for setting, kind, assignment in SETTINGS:
        joint = ctrl.joint(assignment if kind == "do" else None)
        cond = assignment if kind == "condition" else None
        out[setting] = {}
        for node in DigitWorld.graph.order:
            if node in assignment:
                continue
            dist = marginal(ctrl.graph, joint, node, cond)
            out[setting][node] = {"controller": [round(float(v), 4) for v in dist],
                                  "tvd": round(tvd(dist, _exact(kind, assignment, node)), 4)}  # fmt: skip
    return out


@run_folder_session()  # --out stays locked against other writers until the call returns
def run(
    protocol: CausalProtocol, out: Path, device: str | torch.device = "cpu", *, data_dir: Path | None = None,
    command: str = "", progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run the protocol into ``out``; return the results (the dict of ``results.json``)."""
    dev = resolve_device(device)
    claim_run_folder(out, "causal", {k: v for k, v in dataclasses.asdict(protocol).items() if k != "steps"})
    mnist = load_mnist("train", data_dir)
    world = DigitWorld(mnist.images, mnist.labels)
    classifier = zoo.load("mnist-classifier", dev)
    names = (
        ("causal-digit-controller", "causal-digit-gan") if protocol.images else ("causal-digit-controller",)
    )
    gen: nn.Module | None = None
    if protocol.train:
        controller = _train_controller(protocol, out, dev, command)
        if protocol.images:
            gen = _train_gan(protocol, world, out, dev, classifier, command, progress)
        source = str(out / "models")
    else:
        missing = set(names) - set(zoo.available())
        if missing:
            raise FileNotFoundError(
                f"zoo models {sorted(missing)} are not shipped: pass --train (or --labels-only for the controller)"
            )
        controller = zoo.load("causal-digit-controller", "cpu")  # type: ignore[assignment]
        gen = zoo.load("causal-digit-gan", dev) if protocol.images else None
        source = "zoo"
    folder = out / "models" if protocol.train else zoo.WEIGHTS_DIR
    shas = {n: zoo.record(n, folder)["sha256"] for n in names}
    labels = DigitWorld.sample_labels(protocol.train_size, protocol.seed)
    controllers: dict[str, CausalController] = {"causal": controller}
    fits: dict[str, Any] = {}
    for name, graph in baseline_graphs().items():
        ctrl = CausalController(graph, hidden=32)
        fits[name] = train_controller(ctrl, labels[:, _columns(graph)], steps=protocol.controller_steps,
                                      seed=protocol.seed)  # fmt: skip
        controllers[name] = ctrl
    gan = CausalGAN(controller, gen) if gen is not None else None
    cache = _Cache(out / "cache", {"protocol": dataclasses.asdict(protocol), "models": shas})
    models: dict[str, Any] = {}
    shown: dict[str, torch.Tensor] = {}
    for name, ctrl in controllers.items():
        per: dict[str, Any] = {"graph": ctrl.graph.spec(),
                               "controller_joint_tvd": round(tvd(_world_joint(ctrl), DigitWorld.joint()), 4),
                               "labels": _label_figures(ctrl), "settings": {}}  # fmt: skip
        models[name] = per
        if gan is None:
            continue
        for i, (setting, kind, assignment) in enumerate(SETTINGS):
            item = f"{name}-{i}"
            figures = cache.get(item)
            if figures is None or (name == "causal" and setting in ("do(T=thick)", "T=thick")):
                start = time.perf_counter()
                rows = ctrl.sample(protocol.n_samples, seed=protocol.seed + 100 + i,
                                   intervene=assignment if kind == "do" else None,
                                   condition=assignment if kind == "condition" else None)  # fmt: skip
                rows = _to_world(ctrl.graph, rows)
                images = gan.images_for(rows, seed=protocol.seed + 200 + i)
                if name == "causal" and setting in ("do(T=thick)", "T=thick"):
                    shown[setting] = images[:SHOWN][rows[:SHOWN, 0].argsort(stable=True)]
                if figures is None:
                    figures = _figures(read_attributes(images, classifier), rows, kind, assignment)
                    figures["seconds"] = round(time.perf_counter() - start, 1)
                    cache.put(item, figures)
            per["settings"][setting] = figures
        log.info("%s: controller joint TVD %.4f", name, per["controller_joint_tvd"])
    floor: dict[str, Any] = {}
    for i, (setting, kind, assignment) in enumerate(SETTINGS if gan is not None else ()):
        item = f"real-{i}"
        figures = cache.get(item)
        if figures is None:
            real = world.sample(protocol.n_samples, protocol.seed + 300 + i,
                                intervene=assignment if kind == "do" else None,
                                condition=assignment if kind == "condition" else None)  # fmt: skip
            figures = _figures(read_attributes(real.images, classifier), real.labels, kind, assignment)
            cache.put(item, figures)
        floor[setting] = figures
    exact = {
        setting: {
            n: [round(float(v), 4) for v in _exact(kind, a, n)] for n in DigitWorld.graph.order if n not in a
        }
        for setting, kind, a in SETTINGS
    }
    results = {
        "command": command,
        "paper": "CausalGAN (Kocaoglu, Snyder, Dimakis, Vishwanath, ICLR 2018)",
        "protocol": dataclasses.asdict(protocol),
        "models_from": source,
        "device": str(dev),
        "models_sha256": shas,
        "world": {
            "graph": DigitWorld.graph.spec(),
            "exact": exact,
            "exact_joint": [round(float(v), 5) for v in DigitWorld.joint().flatten()],
        },
        "models": models,
        "baseline_controller_fits": fits,
        "real_floor": floor,
        "checks": figure_checks(models),
    }
    write_record(out / "results.json", results)
    write_markdown(results, out / "results.md")
    plot_do_vs_condition(shown, out / "do_vs_condition.png")
    return results


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "causal",
        help="CausalGAN on the digit world: conditioning versus intervention against the exact distributions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (results, figures, checkpoints, cache)"
    )
    p.add_argument(
        "--quick", action="store_true", help="reduced smoke-test protocol (about a minute on a CPU)"
    )
    p.add_argument("--train", action="store_true", help="train the controller and the image GAN (default: load "
                   "the shipped zoo models)")  # fmt: skip
    p.add_argument("--labels-only", action="store_true", help="the controllers only (label-level figures, no "
                   "image GAN): seconds")  # fmt: skip
    p.add_argument("--steps", type=positive_int_arg, default=None, help="GAN steps (with --train)")
    p.add_argument(
        "--train-size", type=positive_int_arg, default=None, help="labelled world images to train on"
    )
    p.add_argument("--samples", type=positive_int_arg, default=None, help="generated images per setting")
    p.add_argument("--write", action="store_true", help="after a full --train run: copy its models into the "
                   "package zoo with this run's figures in their records")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=positive_int_arg, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-dir", type=Path, default=None, help="torchvision MNIST folder (default: offline bundle)"
    )
    p.add_argument("--progress", action="store_true", help="show the training progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval causal``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"seed": args.seed, "images": not args.labels_only}
    if args.train or args.quick:
        overrides["train"] = True
    for key, value in (("steps", args.steps), ("train_size", args.train_size), ("n_samples", args.samples)):
        if value is not None:
            overrides[key] = value
    if args.write and (args.quick or not overrides.get("train")):
        raise ValueError("--write: expected a full --train run (not --quick)")
    if args.steps is not None and not overrides.get("train"):
        raise ValueError("--steps trains the GAN: pass --train with it")
    protocol = (
        quick_protocol(**overrides) if args.quick else dataclasses.replace(CausalProtocol(), **overrides)
    )
    if protocol.quick:
        print(f"QUICK protocol (a smoke test): {protocol.train_size} training images, {protocol.steps} GAN steps, "
              f"{protocol.n_samples} samples per setting", flush=True)  # fmt: skip
    start = time.perf_counter()
    results = run(protocol, args.out, args.device, data_dir=args.data_dir, command=command_line(args),
                  progress=args.progress)  # fmt: skip
    for name, c in results["checks"].items():
        print(f"{name}: {json.dumps(c)}")
    if args.write:
        print(f"wrote {write_zoo(results, args.out, zoo.WEIGHTS_DIR)} into {zoo.WEIGHTS_DIR}")
    print(
        f"causal finished in {time.perf_counter() - start:.1f} s; results: {args.out}/results.md", flush=True
    )
    return 0
