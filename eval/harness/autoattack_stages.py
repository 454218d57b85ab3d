"""The torchattacks stages of the cascade that AutoAttack standard (Croce & Hein, ICML 2020) is made of: ``apgd-t``
(APGD on the targeted DLR loss toward each of the ``n_classes - 1`` most likely other classes in turn) and ``fab``
(FAB-T, the targeted minimum-norm boundary attack), with the chunk runner every torchattacks stage shares
(``apgd``, ``square`` in :mod:`eval.harness.cascade` use it too).

Why they are in the cascade: a classifier trained against one norm masks the gradient of the cross-entropy at
another (a Linf-trained classifier at l2); the targeted DLR loss and FAB's linearization of one decision boundary
at a time still find its adversarial examples. With ``apgd`` (CE) before them and ``square`` after them, the
cascade holds every attack of AutoAttack standard, at AutoAttack's budgets on a *plain* model (:func:`plain`:
100 iterations per target class, 5000 Square queries) and at torchattacks' AutoAttack's smaller ones (10
iterations) on a defense whose every pass runs its preprocessing (:mod:`eval.harness.configs`). Like every
stage they attack only the points still robust, through the same inner model as ``apgd`` (the BPDA model or the
defense's named surrogate, whose successes are checked for transfer), and the verdict is the real defense's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from attacks import Norm, TorchattacksAttack
from eval.harness.configs import APGDTConfig, FABConfig
from eval.harness.registry import ChunkFn, Stage, StageEnv

__all__ = ["APGDT", "FAB", "adapter_chunks", "n_classes", "norm_name", "plain", "real_model", "through"]


def real_model(env: StageEnv, model: nn.Module) -> bool:
    """Whether ``model`` is the real defense (its final forward pass then counts as one verdict draw)."""
    return model is env.defense.model or model is env.defense.bpda_model


def plain(env: StageEnv) -> bool:
    """Whether the defense is a plain model: no preprocessing (no bare classifier behind it, no BPDA model) and
    no surrogate, so one pass of it is one classifier pass and the AutoAttack components run at AutoAttack's
    budgets (``plain_steps``, ``plain_queries``)."""
    d = env.defense
    return d.classifier is None and d.bpda_model is None and not d.surrogates


def n_classes(env: StageEnv) -> int:
    """The number of classes of the defense: the output size of its bare classifier (of the model when plain) on
    one point, with torch's global RNG left as it was."""
    d = env.defense
    model = d.classifier if d.classifier is not None else d.model
    x = env.x[:1]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        return int(model(x).shape[1])


def through(env: StageEnv) -> str:
    """What the inner loop of a BPDA-family stage runs on, in words."""
    d = env.defense
    if d.surrogate is not None:
        return f"surrogate {d.surrogate!r}"
    return "BPDA model" if d.bpda_model is not None else "model"


def norm_name(env: StageEnv) -> str:
    """The threat's norm as recorded (``"linf"``, ``"l2"``)."""
    return "l2" if env.threat.norm is Norm.L2 else "linf"


def adapter_chunks(env: StageEnv, name: str, model: nn.Module, kwargs: dict[str, Any]) -> ChunkFn:
    """The torchattacks attack ``name`` (:class:`attacks.TorchattacksAttack`, ``kwargs`` its constructor's) through
    ``model`` on a chunk, seeded by the chunk's seed; the verdict is the real defense's, and when ``model`` is a
    stand-in the record says per point whether the stand-in itself was fooled (``surrogate_broken``)."""
    real = real_model(env, model)

    def fn(chunk: Tensor) -> dict[str, Tensor]:
        xb, yb = env.x[chunk], env.y[chunk]
        seed = int(torch.initial_seed() % (2**31))
        # (torchattacks' APGD, APGDT, FAB and Square reseed torch with their own `seed` argument: the adapter passes
        # them this chunk's seed)
        res = TorchattacksAttack(name, env.threat, seed=seed, **kwargs)(model, xb, yb)
        out = env.judge(chunk, res.x_adv, ~res.success if real else None)
        if not real:
            out["surrogate_broken"] = res.success.cpu()
        return out

    return fn


def _budget(env: StageEnv) -> str:
    return (
        "plain model: AutoAttack's" if plain(env) else "preprocessing or surrogate: torchattacks AutoAttack's"
    )


class APGDT(Stage):
    name = "apgd-t"
    doc = (
        "torchattacks APGD-T (AutoAttack's): APGD on the targeted DLR loss toward each of the n_classes - 1 most "
        "likely other classes in turn, EOT iterations on randomized defenses, through the BPDA model (or surrogate)"
    )
    gradient = True

    def config(self, env: StageEnv) -> APGDTConfig:
        c = env.settings.apgd_t
        steps = c.plain_steps if plain(env) else c.steps
        eot = c.eot_samples if env.randomized else 1
        targets = None if c.targets is None or c.targets >= n_classes(env) - 1 else c.targets
        return dataclasses.replace(c, steps=steps, plain_steps=steps, eot_samples=eot, targets=targets)

    def skip_reason(self, env: StageEnv) -> str | None:
        classes = n_classes(env)
        if classes < 4:
            return f"{classes} classes: the targeted DLR loss reads the 3rd and 4th largest logits (4 classes or more)"
        return None

    def chunk_fn(self, env: StageEnv, config: APGDTConfig) -> ChunkFn:
        return adapter_chunks(env, "APGDT", env.defense.inner_model(), config.kwargs())

    def describe(self, env: StageEnv, config: APGDTConfig) -> dict[str, Any]:
        kwargs = {k: v for k, v in config.kwargs().items() if k != "n_classes"}
        targets = "n_classes - 1" if config.targets is None else f"the {config.targets}"
        return {**kwargs, "targets": f"{targets} most likely other classes", "loss": "targeted dlr",
                "budget": _budget(env), "through": through(env), "norm": norm_name(env)}  # fmt: skip

    def on_surrogate(self, env: StageEnv) -> bool:
        return env.defense.surrogate is not None


class FAB(Stage):
    name = "fab"
    doc = (
        "torchattacks FAB-T (AutoAttack's): minimum-norm steps to the decision boundary of each of the n_classes - 1 "
        "most likely other classes in turn, a success counting within eps; deterministic defenses only; through "
        "the BPDA model (or surrogate)"
    )
    gradient = True

    def config(self, env: StageEnv) -> FABConfig:
        c = env.settings.fab
        steps = c.plain_steps if plain(env) else c.steps
        return dataclasses.replace(c, steps=steps, plain_steps=steps)

    def skip_reason(self, env: StageEnv) -> str | None:
        d = env.defense
        if n_classes(env) < 2:
            return "one class: no other class to target"
        if env.randomized:
            return "randomized defense: FAB linearizes one fixed decision boundary (AutoAttack's rand version has no FAB)"
        if d.surrogate is not None and env.surrogate_randomized.get(d.surrogate, False):
            return f"randomized surrogate {d.surrogate!r}: FAB linearizes one fixed decision boundary"
        return None

    def chunk_fn(self, env: StageEnv, config: FABConfig) -> ChunkFn:
        return adapter_chunks(env, "FAB", env.defense.inner_model(), config.kwargs())

    def describe(self, env: StageEnv, config: FABConfig) -> dict[str, Any]:
        return {**config.kwargs(), "targets": "n_classes - 1, most likely first", "budget": _budget(env),
                "through": through(env), "norm": norm_name(env)}  # fmt: skip

    def on_surrogate(self, env: StageEnv) -> bool:
        return env.defense.surrogate is not None
