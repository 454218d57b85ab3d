"""The robustness harness (eval.harness / eval.robustness): cascade, schema, red flags, resume,
torchrun sharding and bad input, on tiny stand-in models (64-pixel images, a 2-d latent generator)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from eval.cli import build_parser
from eval.harness import (
    ATTACKS,
    Defense,
    RobustnessSettings,
    StateMismatchError,
    check_monotone,
    parse_threat,
    projection_defense,
    run_robustness,
    undefended_defense,
)
from manifold_defense.integrity import load_checked, save_checked
from manifold_defense.inversion import InversionConfig

REPO = Path(__file__).resolve().parents[1]
K = 3  # classes


class TinyGenerator(nn.Module):
    """``z (B, 2) -> sigmoid(W z + b)`` reshaped to ``(B, 1, 8, 8)``."""

    latent_dim = 2

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.lin = nn.Linear(2, 64)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(64, 2, generator=g) * 1.5)
            self.lin.bias.copy_(torch.randn(64, generator=g) * 0.3)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.lin(z)).reshape(-1, 1, 8, 8)


CENTERS = 0.3 * torch.tensor([[1.5, 0.0], [-1.0, 1.2], [-0.6, -1.4]])


class PrototypeClassifier(nn.Module):
    """Linear nearest-prototype classifier: ``logits_k = scale (2 mu_k . x - ||mu_k||^2)``."""

    def __init__(self, prototypes: Tensor, scale: float = 4.0) -> None:
        super().__init__()
        mu = prototypes.reshape(K, -1)
        self.lin = nn.Linear(mu.shape[1], K)
        with torch.no_grad():
            self.lin.weight.copy_(2 * scale * mu)
            self.lin.bias.copy_(-scale * mu.pow(2).sum(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.reshape(x.shape[0], -1))


class MaskedGradient(nn.Module):
    """Gradient masking: the classifier's logits with an exactly zero input gradient."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.detach()) + 0.0 * x.sum(dim=(1, 2, 3))[:, None]


class NoisyInput(nn.Module):
    """A randomized model: the classifier on ``x + N(0, std^2)`` noise drawn from torch's global RNG."""

    def __init__(self, inner: nn.Module, std: float = 0.35) -> None:
        super().__init__()
        self.inner, self.std = inner, std

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x + self.std * torch.randn_like(x))


class Flip(nn.Module):
    """``x -> 1 - x``: a preprocessing whose BPDA (identity) gradient points the wrong way."""

    def forward(self, x: Tensor) -> Tensor:
        return 1 - x


class TrapModel(nn.Module):
    """Zero-gradient memorizer: right at distance < 0.05 or > 0.45 (Linf) from its nearest memorized point,
    wrong in between; PGD's random start at a large eps lands it back on "right" (non-monotone, not ~0)."""

    mem: Tensor
    labels: Tensor

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__()
        self.register_buffer("mem", x.reshape(x.shape[0], -1).clone())
        self.register_buffer("labels", y.clone())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().reshape(x.shape[0], -1)
        d = (flat[:, None, :] - self.mem[None]).abs().amax(-1)
        r, j = d.min(1)
        label = self.labels[j]
        wrong = (r >= 0.05) & (r <= 0.45)
        label = torch.where(wrong, (label + 1) % K, label)
        return 10 * nn.functional.one_hot(label, K).float() + 0.0 * x.sum(dim=(1, 2, 3))[:, None]


def tiny_setup(n: int = 12) -> dict[str, Any]:
    """Tiny generator, classifier and data near the generator's range (deterministic)."""
    torch.manual_seed(0)
    gen = TinyGenerator().eval()
    with torch.no_grad():
        protos = gen(CENTERS)
        g = torch.Generator().manual_seed(2)
        y = torch.arange(n) % K
        z = CENTERS[y] + 0.25 * torch.randn(n, 2, generator=g)
        x = gen(z)
    clf = PrototypeClassifier(protos).eval()
    assert bool((clf(x).argmax(1) == y).all())
    return {"generator": gen, "classifier": clf, "x": x, "y": y}


TINY_INVERSION = InversionConfig(optimizer="adam", lr=0.1, steps=10, restarts=2, init="random", init_std=1.0)


def tiny_settings(changes: dict[str, Any] | None = None, **fields: Any) -> RobustnessSettings:
    """Cheap settings of the tiny models; ``changes`` (dotted keys, ``"pgd.steps"``) and ``fields`` override them."""
    base: dict[str, Any] = {
        "n": 12,
        "n_per_defense": {},
        "threats": ("linf-0.3", "l2-1"),
        "batch_size": 5,
        "draws": 2,
        "pgd.steps": 12,
        "bpda.steps": 5,
        "bpda.eot_samples": 2,
        "unrolled.steps": 4,
        "unrolled_n": 4,
        "unrolled_batch": 2,
        "apgd.steps": 5,
        "apgd.eot_samples": 2,
        "apgd_t.steps": 2,
        "apgd_t.plain_steps": 3,
        "apgd_t.eot_samples": 2,
        "fab.steps": 2,
        "fab.plain_steps": 3,
        "square.queries": 20,
        "square.plain_queries": 20,
        "onmanifold.steps": 10,
        "overpowered.steps": 10,
        "final.eot_samples": 2,
        "curve_eps_linf": (0.1, 0.3, 1.0),
        "curve_eps_l2": (0.5, 1.0, 4.0),
        "curve.steps": 6,
        "grad_check_n": 4,
        "grid_examples": 3,
    }
    return RobustnessSettings().updated({**base, **(changes or {}), **fields})


def tiny_defenses(setup: dict[str, Any]) -> list[Defense]:
    clf, gen = setup["classifier"], setup["generator"]
    return [undefended_defense(clf), projection_defense("projection-tiny", clf, gen, TINY_INVERSION, seed=0)]


def _flags(record: dict[str, Any], defense: str) -> set[str]:
    return {f["flag"] for f in record["defenses"][defense]["flags"]}


def _strip_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_times(v)
            for k, v in value.items()
            if "seconds" not in k and k not in ("resumed_stages", "world_size", "command")
        }
    if isinstance(value, list):
        return [_strip_times(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------- tests
def test_cascade_end_to_end_and_schema(tmp_path: Path) -> None:
    setup = tiny_setup()
    record = run_robustness(
        tiny_settings(),
        tiny_defenses(setup),
        setup["x"],
        setup["y"],
        tmp_path,
        generator=setup["generator"],
        latent_config=TINY_INVERSION,
        progress=False,
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("threat_models", "n", "settings", "defenses"):
        assert key in saved
    assert saved["threat_models"] == ["linf-0.3", "l2-1"] and saved["n"] == 12
    assert saved["defenses"]["undefended"]["worst_case"] == record["defenses"]["undefended"]["worst_case"]
    und, proj = saved["defenses"]["undefended"], saved["defenses"]["projection-tiny"]
    for d in (und, proj):
        assert set(d) >= {"clean", "attacks", "worst_case", "flags"}
        assert list(d["attacks"]) == [*ATTACKS, "convergence"]
        assert d["clean"] >= 0.75
        for tk in saved["threat_models"]:
            ran = [d["attacks"][a][tk]["accuracy"] for a in ATTACKS if d["attacks"][a][tk]["status"] == "ran"]
            assert ran == sorted(ran, reverse=True)  # the cascade only removes points
            assert d["worst_case"][tk] == ran[-1]  # the convergence rerun's, last
            rerun = d["attacks"]["convergence"][tk]
            assert rerun["status"] == "ran" and rerun["accuracy"] <= rerun["figure_before"]
            audit = d["audit"][tk]
            assert audit["nan_count"] == 0 and audit["max_perturbation"] <= parse_threat(tk).eps * (1 + 1e-4)
    assert und["clean"] == 1.0
    # a linear classifier falls to PGD at Linf 0.3; BPDA does not apply to it and is marked so
    assert und["attacks"]["pgd"]["linf-0.3"]["accuracy"] < 0.1 and und["worst_case"]["l2-1"] < 0.5
    assert und["attacks"]["bpda-pgd"]["linf-0.3"]["status"] == "skipped"
    assert "no preprocessing" in und["attacks"]["bpda-pgd"]["linf-0.3"]["reason"]
    # the projection defense is randomized and attacked by every attack of the cascade
    assert proj["randomized"] and proj["draws"] == 2
    assert proj["attacks"]["bpda-eot-pgd"]["linf-0.3"]["status"] == "ran"
    assert proj["worst_case"]["linf-0.3"] <= proj["attacks"]["pgd"]["linf-0.3"]["accuracy"]
    # the unrolled stage runs after others in this process: its record names no leftover seed of theirs
    through = proj["attacks"]["unrolled-pgd"]["l2-1"]["settings"]["through"]
    assert "seed=per chunk" in through and "seed=0" not in through
    assert proj["curves"]["linf"]["eps"] == [0.0, 0.1, 0.3, 1.0]
    for name in ("report.md", "accuracy_vs_eps.png", "grid_projection-tiny_linf-0.3.png", "state.pt"):
        assert (tmp_path / name).is_file()
    report = (tmp_path / "report.md").read_text()
    assert "audit undefended" in report and "black-box-stronger" in report and "| projection-tiny |" in report


def _run(
    setup: dict[str, Any],
    defenses: list[Defense],
    out: Path,
    changes: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    return run_robustness(
        tiny_settings(changes, **fields),
        defenses,
        setup["x"],
        setup["y"],
        out,
        generator=setup["generator"],
        latent_config=TINY_INVERSION,
        progress=False,
    )


CHEAP = ("clean", "pgd", "bpda-pgd", "unrolled-pgd", "square")


def test_plain_model_raises_no_flag(tmp_path: Path) -> None:
    setup = tiny_setup()
    # budgets where PGD has converged (at l2 1 and 1.5 a point on the boundary falls only to the rerun with twice
    # the steps: not-converged, rightly)
    threats = ("linf-0.2", "l2-0.5")
    record = _run(setup, [undefended_defense(setup["classifier"])], tmp_path, attacks=CHEAP, threats=threats)
    d = record["defenses"]["undefended"]
    assert d["flags"] == [], d["flags"]
    statuses = {(c["flag"], c["status"]) for c in d["checks"]}
    assert ("unbounded-eps-not-zero", "ok") in statuses and ("black-box-stronger", "ok") in statuses
    assert ("zero-or-nan-gradients", "ok") in statuses and ("randomized-defense", "ok") in statuses
    assert ("not-converged", "ok") in statuses and 0 < d["worst_case"]["l2-0.5"] < 1
    assert d["curves"]["linf"]["accuracy"][-1] == 0.0  # Linf eps 1: every point falls


def test_gradient_masking_model_raises_its_flags(tmp_path: Path) -> None:
    setup = tiny_setup()
    masked = Defense("masked", MaskedGradient(setup["classifier"]).eval())
    record = _run(setup, [masked], tmp_path, {"square.queries": 200}, attacks=CHEAP)
    d = record["defenses"]["masked"]
    assert {"zero-or-nan-gradients", "black-box-stronger"} <= _flags(record, "masked")
    assert d["gradients"]["pgd"]["zero_fraction"] == 1.0
    sq = d["attacks"]["square"]["linf-0.3"]
    assert sq["broken"] > 0 and sq["accuracy"] < d["attacks"]["pgd"]["linf-0.3"]["accuracy"]


def test_trap_model_is_non_monotone_and_survives_unbounded_eps(tmp_path: Path) -> None:
    setup = tiny_setup()
    trap = Defense("trap", TrapModel(setup["x"], setup["y"]).eval())
    record = _run(setup, [trap], tmp_path, attacks=("clean", "pgd"), threats=("linf-0.3",))
    curve = record["defenses"]["trap"]["curves"]["linf"]
    assert curve["accuracy"][2] == 0.0 and curve["accuracy"][-1] >= 0.5  # wrong at eps 0.3, "right" at 1
    assert {"non-monotone-in-eps", "unbounded-eps-not-zero"} <= _flags(record, "trap")


def test_randomized_model_is_flagged_and_judged_worst_case(tmp_path: Path) -> None:
    setup = tiny_setup()
    noisy = Defense("noisy", NoisyInput(setup["classifier"]).eval())
    record = _run(setup, [noisy], tmp_path, attacks=("clean", "pgd"), threats=("l2-1",), draws=4)
    d = record["defenses"]["noisy"]
    assert d["randomized"] and d["draws"] == 4
    assert "randomized-defense" in _flags(record, "noisy")
    flag = next(f for f in d["flags"] if f["flag"] == "randomized-defense")
    assert "worst case over 4 draws" in flag["detail"]
    # worst case over draws can only lower accuracy: the clean accuracy is below the noiseless classifier's
    assert d["clean"] < 1.0


def test_bpda_vs_unrolled_gap_is_flagged(tmp_path: Path) -> None:
    from attacks import BPDA

    setup = tiny_setup()
    clf = setup["classifier"]

    class FlipThen(nn.Module):
        def __init__(self, pre: nn.Module) -> None:
            super().__init__()
            self.pre = pre

        def forward(self, x: Tensor) -> Tensor:
            return clf(1 - self.pre(x))  # = clf(x) in value

    flip_bpda = FlipThen(BPDA(Flip())).eval()
    flip_exact = FlipThen(Flip()).eval()
    ident_bpda = FlipThen(BPDA(lambda x: 1 - x, surrogate=lambda x: 1 - x)).eval()
    defenses = [
        Defense(
            "flip",
            flip_bpda,
            classifier=clf,
            preprocess=Flip(),
            bpda_model=flip_bpda,
            unrolled_model=flip_exact,
        ),
        Defense("exact", ident_bpda, classifier=clf, bpda_model=ident_bpda, unrolled_model=flip_exact),
    ]
    record = _run(
        setup, defenses, tmp_path, attacks=("clean", "bpda-pgd", "unrolled-pgd"), threats=("linf-0.3",)
    )
    cmp_flip = record["defenses"]["flip"]["attacks"]["unrolled-pgd"]["linf-0.3"]["compare"]
    assert cmp_flip["bpda_accuracy"] == 1.0 and cmp_flip["unrolled_accuracy"] == 0.0
    assert "bpda-unrolled-gap" in _flags(record, "flip")
    assert "bpda-unrolled-gap" not in _flags(record, "exact")


def test_resume_after_interruption_gives_the_same_result(tmp_path: Path) -> None:
    setup = tiny_setup()
    kw: dict[str, Any] = {"attacks": ("clean", "pgd", "bpda-pgd", "bpda-eot-pgd", "onmanifold")}
    full = _run(setup, tiny_defenses(setup), tmp_path / "a", **kw)

    class Stop(Exception):
        pass

    seen: list[str] = []

    def interrupt(key: str) -> None:
        seen.append(key)
        if len(seen) == 5:
            raise Stop(key)

    with pytest.raises(Stop):
        run_robustness(
            tiny_settings(**kw), tiny_defenses(setup), setup["x"], setup["y"], tmp_path / "b",
            generator=setup["generator"], latent_config=TINY_INVERSION, progress=False, on_stage=interrupt,
        )  # fmt: skip
    resumed = _run(setup, tiny_defenses(setup), tmp_path / "b", **kw)
    assert resumed["resumed_stages"] >= 5
    assert _strip_times(resumed["defenses"]) == _strip_times(full["defenses"])


def test_interruption_inside_a_stage_resumes_at_its_first_missing_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of an unfinished stage are saved as they finish; a resumed run reuses them (and the saved latents)
    and gives the uninterrupted run's result, and the finished stage leaves no partial results behind."""
    import eval.harness.state as core

    setup = tiny_setup()
    kw: dict[str, Any] = {"attacks": ("clean", "pgd", "bpda-pgd", "onmanifold"), "batch_size": 3}
    full = _run(setup, tiny_defenses(setup), tmp_path / "a", **kw)

    class Stop(Exception):
        pass

    original = core.chunk_seed
    computed: list[tuple[str, int]] = []

    def counting(seed: int, stage: str, first: int) -> int:
        computed.append((stage, first))
        if stop_at is not None and len(computed) == stop_at:
            raise Stop(stage)
        return original(seed, stage, first)

    monkeypatch.setattr(core, "chunk_seed", counting)
    # interrupt at the third chunk of the first multi-chunk stage of the projection defense
    stop_at: int | None = None
    _run(setup, tiny_defenses(setup), tmp_path / "count", **kw)
    total = len(computed)
    stages = [st for st, _ in computed]
    target = next(st for st in stages if st.startswith("projection-tiny|") and stages.count(st) >= 3)
    stop_at = [i for i, st in enumerate(stages) if st == target][2] + 1
    computed.clear()
    with pytest.raises(Stop):
        _run(setup, tiny_defenses(setup), tmp_path / "b", **kw)
    saved = load_checked(tmp_path / "b" / "state.pt")
    assert sorted(saved["partial"][target]) == [0, 1]  # the two chunks finished before the interruption
    computed.clear()
    stop_at = None
    resumed = _run(setup, tiny_defenses(setup), tmp_path / "b", **kw)
    assert (target, int(saved["partial"][target][0]["indices"][0])) not in computed  # reused, not redone
    assert len(computed) < total - 2
    assert _strip_times(resumed["defenses"]) == _strip_times(full["defenses"])
    final = load_checked(tmp_path / "b" / "state.pt")
    assert all(not chunks for chunks in final["partial"].values()) and len(final["latents"]) > 0


def test_output_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    setup = tiny_setup()
    kw: dict[str, Any] = {"attacks": ("clean", "pgd"), "threats": ("linf-0.3",)}
    _run(setup, [undefended_defense(setup["classifier"])], tmp_path, **kw)
    with pytest.raises(StateMismatchError, match=r"another run's state .*seed: saved 0, now 1"):
        _run(setup, [undefended_defense(setup["classifier"])], tmp_path, seed=1, **kw)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StateMismatchError, match="other files"):
        _run(setup, [undefended_defense(setup["classifier"])], tmp_path / "other", **kw)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (
            lambda fp: fp.pop("version"),
            r"a version of manifold-defense older than .* \(it records no version",
        ),
        (
            lambda fp: fp.update(version="0.0.9"),
            r"written by manifold-defense 0\.0\.9 \(manifold-defense robustness v2\)",
        ),
        (lambda fp: fp.update(schema="manifold-defense robustness v1"), r"robustness v1"),
    ],
    ids=["no-version", "older-version", "older-schema"],
)
def test_a_state_written_by_another_version_is_refused_naming_it(
    tmp_path: Path, edit: Any, named: str
) -> None:
    """A state whose fingerprint names another version of manifold-defense (or none: written before versions were
    recorded) is refused with one message naming that version, this one and ``--fresh``; ``fresh=True``
    recomputes it."""
    from manifold_defense import __version__

    setup = tiny_setup()
    kw: dict[str, Any] = {"attacks": ("clean", "pgd"), "threats": ("linf-0.3",)}
    first = _run(setup, [undefended_defense(setup["classifier"])], tmp_path, **kw)
    state = load_checked(tmp_path / "state.pt")
    assert state["fingerprint"]["version"] == first["version"] == __version__
    edit(state["fingerprint"])
    save_checked(state, tmp_path / "state.pt")
    with pytest.raises(StateMismatchError, match=named) as err:
        _run(setup, [undefended_defense(setup["classifier"])], tmp_path, **kw)
    assert f"this is manifold-defense {__version__}" in str(err.value) and "--fresh" in str(err.value)
    again = run_robustness(tiny_settings(**kw), [undefended_defense(setup["classifier"])], setup["x"], setup["y"],
                           tmp_path, progress=False, fresh=True)  # fmt: skip
    assert again["resumed_stages"] == 0 and _strip_times(again["defenses"]) == _strip_times(first["defenses"])


def test_overpowered_temperature_has_one_default() -> None:
    """The harness's overpowered attack divides the logits by 10 in every command (robustness, defense, demo)."""
    from eval.defense_eval import preset

    assert (
        tiny_settings().overpowered.temperature
        == RobustnessSettings.quick_preset().overpowered.temperature
        == 10.0
    )
    args = build_parser().parse_args(["defense", "--figures", "overpowered"])
    assert preset(args)[0].overpowered.temperature == 10.0
    assert (
        preset(build_parser().parse_args(["defense", "--op-temperature", "1"]))[0].overpowered.temperature
        == 1.0
    )
    with pytest.raises(ValueError, match=r"overpowered: expected temperature > 0, got 0\.0"):
        tiny_settings({"overpowered.temperature": 0.0})


def test_op_temperature_reaches_the_overpowered_attack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import manifold_defense.evaluation as core

    seen: list[float] = []
    original = core.evaluate_overpowered

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[4].temperature)
        return original(*args, **kwargs)

    monkeypatch.setattr(core, "evaluate_overpowered", spy)
    setup = tiny_setup()
    kw: dict[str, Any] = {"attacks": ("clean", "overpowered"), "threats": ("l2-2",)}
    _run(setup, [undefended_defense(setup["classifier"])], tmp_path, {"overpowered.temperature": 3.0}, **kw)
    assert seen and set(seen) == {3.0}


def test_bad_names_and_bad_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"unknown attack \['pgd2'\]: expected a non-empty subset of \['clean'"
    ):
        tiny_settings(attacks=("clean", "pgd2"))
    with pytest.raises(ValueError, match="NORM-EPS"):
        tiny_settings(threats=("linf0.3",))
    with pytest.raises(ValueError, match="NORM in"):
        parse_threat("l1-2")
    setup = tiny_setup()

    class Flat(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], -1).sum(1)

    class TwoClasses(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], -1)[:, :2]

    with pytest.raises(ValueError, match=r"float logits of shape \(2, num_classes\)"):
        _run(setup, [Defense("flat", Flat().eval())], tmp_path / "a", attacks=("clean",))
    with pytest.raises(ValueError, match=r"labels in \[0, 2\)"):
        _run(setup, [Defense("two", TwoClasses().eval())], tmp_path / "b", attacks=("clean",))


def test_monotone_rule() -> None:
    assert check_monotone([0, 0.1, 0.3], [1.0, 0.5, 0.2], 20, 0.02) == []
    assert check_monotone([0, 0.1, 0.3], [1.0, 0.5, 0.55], 20, 0.02) == []  # one point of 20: tolerated
    assert len(check_monotone([0, 0.1, 0.3], [1.0, 0.5, 0.6], 20, 0.02)) == 1
    assert not math.isnan(0.0)


WORKER = """
import sys, json, torch
torch.set_num_threads(1)
from pathlib import Path
from tests.test_eval_robustness import tiny_setup, tiny_defenses, tiny_settings, TINY_INVERSION
from eval.harness import run_robustness
from manifold_defense.training.distributed import setup_distributed
ctx = setup_distributed("cpu")
setup = tiny_setup()
run_robustness(tiny_settings(attacks=("clean", "pgd", "bpda-pgd", "bpda-eot-pgd", "apgd", "overpowered"),
               batch_size=3, threats=("l2-1",)), tiny_defenses(setup), setup["x"], setup["y"], Path(sys.argv[1]),
               generator=setup["generator"], latent_config=TINY_INVERSION, ctx=ctx, progress=False)
"""


def test_two_torchrun_processes_equal_one(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path / "two")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    assert _strip_times(r1["defenses"]) == _strip_times(r2["defenses"])


@pytest.mark.parametrize("command", ["robustness", "defense"])
def test_documented_torchrun_command_line_parses(command: str) -> None:
    """torchrun's own parser reads ``--n`` as an ambiguous abbreviation of its options and stops; ``--points``
    passes through it and reaches the command as ``n``."""
    from torch.distributed.run import get_args_parser

    from eval.cli import build_parser

    launcher = get_args_parser()
    with pytest.raises(SystemExit):
        launcher.parse_args(["--nproc_per_node=2", "-m", "eval", command, "--n", "7"])
    launched = launcher.parse_args(
        ["--nproc_per_node=2", "-m", "eval", command, "--out", "x", "--points", "7"]
    )
    assert launched.training_script == "eval"
    args = build_parser().parse_args(launched.training_script_args)
    assert args.n == 7
    assert build_parser().parse_args([command, "--n", "5"]).n == 5


def test_process_group_waits_longer_than_a_slow_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's 30-minute default killed a 2-process CPU run: one process waited in ``all_gather_object`` while the
    other attacked its second Square chunk. The group is created with a 24-hour timeout, settable, validated."""
    import datetime

    import torch.distributed as dist

    from manifold_defense.training import distributed

    seen: dict[str, Any] = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    for name, value in {
        "WORLD_SIZE": "2",
        "RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    ctx = distributed.setup_distributed("cpu")
    assert (ctx.rank, ctx.world_size) == (1, 2)
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(hours=24)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7200")
    assert distributed.collective_timeout() == datetime.timedelta(hours=2)
    for bad in ("soon", "0", "-5", "inf", "nan"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
            distributed.collective_timeout()
