"""A user's purifier on the command line: ``python -m eval robustness --purifier FILE.py:factory ...`` evaluates
``classifier(purifier(x))`` (defense ``purified``, next to ``undefended``) with every stage that applies.

Options (:func:`add_purifier_args`):

- ``--purifier SPEC``: ``package.module:factory`` or ``path.py:factory`` returning the purifier, an ``nn.Module``
  from images ``(B, C, H, W)`` in [0, 1] to images of the same shape in [0, 1] (loaded as ``--classifier`` is:
  :func:`eval.harness.models.load_factory`);
- ``--purifier-surrogate NAME=SPEC`` (repeatable): a differentiable approximation of the purifier (images ->
  images), attacked by ``surrogate-pgd``; every verdict stays the real defense's, then ``real-bpda-eot`` runs on
  the survivors;
- ``--purifier-randomized`` / ``--purifier-deterministic``: whether it draws fresh noise on every call (default:
  detected by two calls on the first evaluation images);
- ``--purifier-exact``: its own autograd gradient is exact: ``unrolled-pgd`` attacks through it.

Its BPDA variant (identity backward) drives ``bpda-pgd``, ``bpda-eot-pgd`` (randomized), ``apgd`` and the
curves; the bare classifier ``pgd`` and the latent attacks (:func:`eval.harness.purifier_defense`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eval.harness.defenses import Defense, purifier_defense
from eval.harness.models import load_factory, parse_spec
from manifold_defense.purification import detect_randomized

__all__ = [
    "PURIFIED",
    "PurifierSpec",
    "add_purifier_args",
    "load_purifier",
    "purifier_defense_from_spec",
    "surrogate_arg",
]

#: The name of the purifier defense in the report.
PURIFIED = "purified"


def surrogate_arg(text: str) -> tuple[str, str]:
    """``argparse`` type of ``--purifier-surrogate``: ``NAME=SPEC`` -> ``(NAME, SPEC)``."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name or "|" in name or not spec.strip():
        raise argparse.ArgumentTypeError(
            f"expected --purifier-surrogate NAME=package.module:factory or NAME=path.py:factory, got {text!r}"
        )
    return name, spec.strip()


def add_purifier_args(p: argparse.ArgumentParser) -> None:
    """Register ``--purifier``, ``--purifier-surrogate``, ``--purifier-randomized`` / ``--purifier-deterministic``
    and ``--purifier-exact`` (module docs)."""
    p.add_argument(
        "--purifier",
        default=None,
        metavar="SPEC",
        help="package.module:factory or path.py:factory returning your purifier (images in [0, 1] -> images of "
        "the same shape in [0, 1]): evaluates defense 'purified' = classifier(purifier(x)) next to 'undefended'",
    )
    p.add_argument(
        "--purifier-surrogate",
        action="append",
        type=surrogate_arg,
        default=[],
        metavar="NAME=SPEC",
        help="a differentiable approximation of the purifier (repeatable), attacked by surrogate-pgd; verdicts "
        "stay the real defense's",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--purifier-randomized",
        dest="purifier_randomized",
        action="store_const",
        const=True,
        default=None,
        help="the purifier draws fresh noise on every call: verdicts are worst case over --draws, EOT attacks "
        "run (default: detected by two calls)",
    )
    group.add_argument(
        "--purifier-deterministic",
        dest="purifier_randomized",
        action="store_const",
        const=False,
        help="the purifier is a deterministic function of its input",
    )
    p.add_argument(
        "--purifier-exact",
        action="store_true",
        help="the purifier's autograd gradient is exact: unrolled-pgd attacks through it",
    )


def load_purifier(text: str, device: torch.device, role: str = "--purifier") -> nn.Module:
    """The purifier (or surrogate) a ``package.module:factory`` / ``path.py:factory`` names, in eval mode on
    ``device``; ``TypeError`` unless the factory returns an ``nn.Module``, ``ValueError`` for a zoo name."""
    if parse_spec(text).kind == "zoo":
        raise ValueError(
            f"expected {role} as package.module:factory or path.py:factory, got the zoo name {text!r}"
        )
    module = load_factory(text)()
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected {role} {text} to return an nn.Module, got {type(module).__name__}")
    return module.to(device).eval()


@dataclass(frozen=True)
class PurifierSpec:
    """A user's purifier by name (the ``--purifier`` options).

    Args:
        spec: ``package.module:factory`` or ``path.py:factory`` returning the purifier (images in [0, 1] ->
            images of the same shape in [0, 1]).
        surrogates: ``(NAME, SPEC)`` pairs of differentiable approximations of the purifier (distinct names).
        randomized: whether it draws fresh noise on every call; ``None``: detected by two calls on the first two
            evaluation images.
        exact: its own autograd gradient is exact (``unrolled-pgd`` attacks through it).
    """

    spec: str
    surrogates: tuple[tuple[str, str], ...] = ()
    randomized: bool | None = None
    exact: bool = False

    def __post_init__(self) -> None:
        names = [name for name, _ in self.surrogates]
        if len(set(names)) != len(names):
            raise ValueError(f"expected distinct --purifier-surrogate names, got {names}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PurifierSpec | None:
        """The purifier the parsed options name (:func:`add_purifier_args`), ``None`` without ``--purifier``.

        Raises:
            ValueError: purifier options without ``--purifier``, a surrogate name given twice.
        """
        text = getattr(args, "purifier", None)
        pairs = tuple(getattr(args, "purifier_surrogate", None) or ())
        randomized = getattr(args, "purifier_randomized", None)
        exact = bool(getattr(args, "purifier_exact", False))
        if text is None:
            if pairs or randomized is not None or exact:
                raise ValueError("--purifier-surrogate, --purifier-randomized/-deterministic and --purifier-exact "
                                 "describe a purifier: expected --purifier FILE.py:factory too, got none")  # fmt: skip
            return None
        return cls(text, pairs, randomized, exact)


def purifier_defense_from_spec(
    spec: PurifierSpec, classifier: nn.Module, x: Tensor, seed: int = 0, verbatim: bool = False
) -> Defense:
    """The ``purified`` defense: ``classifier`` behind the purifier ``spec`` names.

    Args:
        spec: :class:`PurifierSpec`; classifier: the loaded classifier.
        x: the evaluation images (the first two decide randomness when ``spec.randomized`` is ``None``).
        seed: the run's seed (the purifier's per-call seed stream).
        verbatim: every attack on the real defense (refused with surrogates).

    Raises:
        ValueError: surrogates with ``verbatim``; TypeError: a factory that returns no ``nn.Module``.
    """
    if spec.surrogates and verbatim:
        raise ValueError("--verbatim attacks the real defense only: expected no --purifier-surrogate, got "
                         f"{[name for name, _ in spec.surrogates]}")  # fmt: skip
    purifier = load_purifier(spec.spec, x.device)
    surrogates = {
        name: load_purifier(text, x.device, f"--purifier-surrogate {name}") for name, text in spec.surrogates
    }
    randomized = spec.randomized if spec.randomized is not None else detect_randomized(purifier, x[:2])
    return purifier_defense(
        PURIFIED, classifier, purifier, randomized=randomized, surrogates=surrogates, exact=spec.exact or None,
        seed=seed,
    )  # fmt: skip
