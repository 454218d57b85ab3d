"""The harness's surrogate path (verdicts by the real defense, transfer counts, resume), the one-attack-loop rule of
eval/, and own models on the command line (zoo names, ``path.py:factory``, safetensors weights, other image shapes),
on tiny stand-in models (64-pixel images, a 2-d latent generator)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from eval.cli import main, run
from eval.harness import (
    Defense,
    projection_defense,
    projection_surrogates,
    run_robustness,
)
from eval.harness.models import load_model, parse_spec
from manifold_defense.integrity import load_checked
from manifold_defense.inversion import InversionConfig
from tests.test_eval_robustness import TINY_INVERSION, _strip_times, tiny_settings, tiny_setup

REPO = Path(__file__).resolve().parents[1]


class TinyEncoder(nn.Module):
    """The exact inverse of :class:`tests.test_eval_robustness.TinyGenerator` on its range (least squares on the
    logits), differentiable."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        w, b = generator.lin.weight.detach(), generator.lin.bias.detach()  # type: ignore[union-attr]
        self.register_buffer("pinv", torch.linalg.pinv(w))
        self.register_buffer("bias", b.clone())

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.logit(x.reshape(x.shape[0], -1).clamp(1e-4, 1 - 1e-4))
        return (logits - self.bias) @ self.pinv.T


class Permuted(nn.Module):
    """A lying surrogate: the classifier's logits rolled by one class (it misclassifies every clean point)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).roll(1, dims=1)


FAST = InversionConfig(optimizer="adam", lr=0.1, steps=6, restarts=2, init="encoder", init_std=None)
SURROGATE_ATTACKS = ("clean", "pgd", "bpda-pgd", "surrogate-pgd", "apgd", "square", "real-bpda-eot")


def surrogate_defense(setup: dict[str, Any], randomized: bool = False) -> Defense:
    clf, gen = setup["classifier"], setup["generator"]
    enc = TinyEncoder(gen).eval()
    sur = projection_surrogates(clf, gen, enc, FAST, seed=0, randomized=randomized)
    return projection_defense(
        "proj-sur", clf, gen, TINY_INVERSION, seed=0, randomized=randomized, surrogates=sur, surrogate="fast"
    )


def _run(
    setup: dict[str, Any],
    defenses: list[Defense],
    out: Path,
    changes: dict[str, Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    return run_robustness(
        tiny_settings(changes, **kw), defenses, setup["x"], setup["y"], out, generator=setup["generator"],
        latent_config=TINY_INVERSION, progress=False,
    )  # fmt: skip


def test_surrogate_path_breaks_a_point_only_where_the_real_defense_is_wrong(tmp_path: Path) -> None:
    setup = tiny_setup()
    d = surrogate_defense(setup)
    kw = {"attacks": SURROGATE_ATTACKS, "threats": ("linf-0.3", "l2-1")}
    record = _run(setup, [d], tmp_path, {"final.steps": 3, "square.queries": 30}, **kw)
    state = load_checked(tmp_path / "state.pt")
    checked = 0
    for key, rec in state["stages"].items():
        if not key.startswith("proj-sur|") or not isinstance(rec, dict) or "broken_x_adv" not in rec:
            continue
        broken = rec["indices"][~rec["robust"]]
        if len(broken):
            with torch.no_grad():
                pred = d.model(rec["broken_x_adv"]).argmax(1)  # deterministic defense: one draw decides
            assert bool((pred != setup["y"][broken]).all()), key
            checked += len(broken)
    assert checked > 0  # the attacks did break points, and every one of them on the real defense
    entry = record["defenses"]["proj-sur"]
    counted = 0
    for attack in ("bpda-pgd", "surrogate-pgd", "apgd", "square"):
        for tk in ("linf-0.3", "l2-1"):
            e = entry["attacks"][attack][tk]
            if e["attacked"] == 0:  # every point already broken before this stage
                continue
            counted += 1
            t = e["transfer"]
            assert t["attacked"] == e["attacked"]
            assert t["surrogate_broken"] == t["transferred"] + t["not_transferred"]
            assert e["broken_alone"] == t["broken"] == t["transferred"] + t["broken_without_surrogate"]
    assert counted >= 3
    for tk in ("linf-0.3", "l2-1"):
        e = entry["attacks"]["surrogate-pgd"][tk]
        if e["attacked"]:
            by = e["transfer"]["by_surrogate"]
            assert list(by) == ["fast", "encoder"] and by["fast"]["attacked"] == e["attacked"]
            for c in by.values():
                assert c["surrogate_broken"] == c["transferred"] + c["not_transferred"]
            assert by["encoder"]["attacked"] <= by["fast"]["attacked"]  # the encoder attacks what fast left
    assert entry["attacks"]["bpda-pgd"]["l2-1"]["settings"]["through"] == "surrogate 'fast'"
    assert entry["attacks"]["real-bpda-eot"]["l2-1"]["status"] == "ran"
    assert entry["surrogates"]["names"] == ["fast", "encoder"] and entry["surrogates"]["inner"] == "fast"
    assert "## Surrogate transfer" in (tmp_path / "report.md").read_text()
    # cost: rows through the real defense, per stage (deterministic defense: one verdict draw per point)
    cost = entry["cost"]
    assert cost["stages"]["clean"]["real_passes"] == 12 and cost["stages"]["projection"]["real_passes"] == 12
    e = entry["attacks"]["bpda-pgd"]["l2-1"]
    assert cost["stages"]["l2-1|bpda-pgd"]["real_passes"] == e["attacked"] > 0  # inner loop on the surrogate
    e = entry["attacks"]["real-bpda-eot"]["l2-1"]
    assert (
        cost["stages"]["l2-1|real-bpda-eot"]["real_passes"] > 3 * e["attacked"] > 0
    )  # 3 real steps per point
    assert cost["total"]["real_passes"] == sum(r["real_passes"] for r in cost["stages"].values())
    assert "## Cost: proj-sur" in (tmp_path / "report.md").read_text()


def test_a_lying_surrogate_breaks_nothing_and_is_flagged(tmp_path: Path) -> None:
    """Every surrogate success of a surrogate that misclassifies everything fails to transfer: no point is broken
    by it, and the transfer gap is flagged."""
    setup = tiny_setup()
    clf = setup["classifier"]
    liar = Permuted(clf).eval()
    d = Defense("liar", clf.eval(), surrogates={"liar": liar}, surrogate="liar")
    x_before = setup["x"].clone()
    record = _run(setup, [d], tmp_path, attacks=("clean", "bpda-pgd", "surrogate-pgd"), threats=("l2-0.05",))
    assert torch.equal(setup["x"], x_before)  # the caller's tensors are untouched
    e = record["defenses"]["liar"]
    for attack in ("bpda-pgd", "surrogate-pgd"):
        t = e["attacks"][attack]["l2-0.05"]["transfer"]
        assert t["surrogate_broken"] == t["attacked"] == 12 and t["transferred"] == 0
    assert e["worst_case"]["l2-0.05"] == e["clean"] == 1.0
    assert "surrogate-transfer-gap" in {f["flag"] for f in e["flags"]}


def test_interrupted_surrogate_stage_resumes_to_the_same_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import eval.harness.state as state_module

    setup = tiny_setup()
    kw: dict[str, Any] = {"attacks": ("clean", "bpda-eot-pgd", "surrogate-pgd", "real-bpda-eot"),
                          "threats": ("l2-1",), "batch_size": 4}  # fmt: skip
    full = _run(setup, [surrogate_defense(setup, randomized=True)], tmp_path / "a", {"final.steps": 2}, **kw)

    class Stop(Exception):
        pass

    original = state_module.chunk_seed
    calls: list[str] = []

    def interrupting(seed: int, stage: str, first: int) -> int:
        calls.append(stage)
        if stage.endswith("surrogate-pgd") and calls.count(stage) == 2:
            raise Stop(stage)
        return original(seed, stage, first)

    monkeypatch.setattr(state_module, "chunk_seed", interrupting)
    with pytest.raises(Stop):
        _run(setup, [surrogate_defense(setup, randomized=True)], tmp_path / "b", {"final.steps": 2}, **kw)
    monkeypatch.setattr(state_module, "chunk_seed", original)
    saved = load_checked(tmp_path / "b" / "state.pt")
    assert list(saved["partial"]["proj-sur|l2-1|surrogate-pgd"]) == [0]  # one chunk done when interrupted
    resumed = _run(
        setup, [surrogate_defense(setup, randomized=True)], tmp_path / "b", {"final.steps": 2}, **kw
    )
    assert resumed["resumed_stages"] > 0
    assert _strip_times(resumed["defenses"]) == _strip_times(full["defenses"])


# --------------------------------------------------------------------------------------- one attack loop
GRADIENT_CALLS = {"grad", "backward"}
#: The only functions of eval/ allowed to compute a gradient themselves (neither is an attack).
ALLOWED = {("eval/harness/sections.py", "input_gradient"), ("eval/bench_core.py", "_inner_step"),
           ("eval/bench_core.py", "count_step_flops")}  # fmt: skip


def test_one_attack_loop_no_second_loop_in_eval() -> None:
    """Every attack of the evaluation code runs through :mod:`attacks`: no function of eval/ computes an input
    gradient (``torch.autograd.grad`` / ``.backward``) except the red-flag gradient check and the FLOP counter of
    the benchmark, no ``optimizer.step()`` appears in eval/, and one runner class executes attack stages."""
    found: set[tuple[str, str]] = set()
    runners: list[str] = []
    for path in sorted((REPO / "eval").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and "runner" in node.name.lower():
                runners.append(f"{rel}:{node.name}")
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                    if call.func.attr in GRADIENT_CALLS:
                        found.add((rel, node.name))
                    assert call.func.attr != "step", f"{rel}:{node.name} steps an optimizer"
    assert found <= ALLOWED, found - ALLOWED
    assert runners == ["eval/harness/runner.py:Runner"], runners
    assert "import attacks" not in (REPO / "eval" / "defense_eval.py").read_text()
    assert "from attacks" not in (REPO / "eval" / "defense_eval.py").read_text()


# ------------------------------------------------------------------------------------ own models (CLI)
USER_MODELS = """
import torch
from torch import nn


class Decoder(nn.Module):
    latent_dim = 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 64)

    def forward(self, z):
        return torch.sigmoid(self.lin(z)).reshape(-1, 1, 8, 8)


def decoder():
    torch.manual_seed(1)
    d = Decoder()
    with torch.no_grad():
        d.lin.weight.mul_(6.0)
    return d


def classifier():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def data():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(12) % 3
    centers = torch.tensor([[1.0, 0.0], [-0.5, 0.85], [-0.5, -0.85]])
    with torch.no_grad():
        x = decoder()(centers[y] + 0.15 * torch.randn(12, 2, generator=g))
    return x, y
"""


def _user_files(tmp_path: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    path = tmp_path / "my_models.py"
    path.write_text(USER_MODELS)
    # a classifier that labels the user's data correctly: nearest class mean, written as safetensors
    ns: dict[str, Any] = {}
    exec(compile(USER_MODELS, str(path), "exec"), ns)
    x, y = ns["data"]()
    flat = x.reshape(12, -1)
    mu = torch.stack([flat[y == k].mean(0) for k in range(3)])
    weights = {"1.weight": 40 * mu, "1.bias": -20 * mu.pow(2).sum(1)}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "clf.safetensors"))
    return path, tmp_path / "clf.safetensors"


def test_own_models_get_a_robustness_report_with_one_command(tmp_path: Path) -> None:
    path, weights = _user_files(tmp_path)
    out = tmp_path / "report"
    code = main([
        "robustness", "--quick", "--n", "6", "--threats", "l2-1", "--classifier", f"{path}:classifier",
        "--classifier-weights", str(weights), "--generator", f"{path}:decoder", "--data", f"{path}:data",
        "--attacks", "clean,pgd,bpda-pgd,onmanifold", "--out", str(out), "--device", "cpu", "--threads", "1",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    assert record["image_shape"] == [1, 8, 8] and record["threat_models"] == ["l2-1"]
    assert set(record["defenses"]) == {"undefended", "projection-defense-gan"}
    und = record["defenses"]["undefended"]
    assert und["clean"] == 1.0 and und["attacks"]["pgd"]["l2-1"]["status"] == "ran"
    assert record["settings"]["curve_eps_l2"] == [0.5, 1.0, 2.0, 8.0]  # derived: 8 = sqrt(64) is unbounded
    assert "report.md" in {p.name for p in out.iterdir()}


def test_other_image_shapes_need_threats_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, weights = _user_files(tmp_path)
    code = run([
        "robustness", "--quick", "--n", "4", "--classifier", f"{path}:classifier", "--classifier-weights",
        str(weights), "--data", f"{path}:data", "--out", str(tmp_path / "r"), "--device", "cpu",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "shape (1, 8, 8), not MNIST's (1, 28, 28)" in err and "--threats" in err


def test_model_specs_and_weights_are_checked(tmp_path: Path) -> None:
    path, weights = _user_files(tmp_path)
    assert parse_spec("mnist-gan").kind == "zoo"
    assert parse_spec("pkg.mod:make") == ("module", "pkg.mod", "make")
    assert parse_spec(f"{path}:decoder").kind == "file"
    with pytest.raises(ValueError, match="expected a model as a zoo name"):
        parse_spec("resnet")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="pickled checkpoints are not loaded"):
        load_model(f"{path}:classifier", "classifier", cpu, weights=tmp_path / "clf.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(f"{path}:classifier", "classifier", cpu, weights=tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="to be a safetensors file holding the weights of the classifier"):
        load_model(f"{path}:classifier", "classifier", cpu, weights=tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="positive int latent_dim"):
        load_model(f"{path}:classifier", "generator", cpu)
    with pytest.raises(ValueError, match="to define a callable nothing"):
        load_model(f"{path}:nothing", "classifier", cpu)
    clf = load_model(f"{path}:classifier", "classifier", cpu, weights=weights)
    assert not clf.training and clf(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def test_surrogate_settings_and_curve_budgets_are_checked() -> None:
    from eval.harness import RobustnessSettings
    from eval.harness.settings import default_curve_eps

    lin = nn.Linear(2, 2)
    with pytest.raises(
        ValueError, match=r"expected surrogate of defense 'x' to be one of its surrogates \['a'\]"
    ):
        Defense("x", lin, surrogates={"a": lin}, surrogate="b")
    with pytest.raises(
        TypeError, match=r"expected surrogates of defense .x. as non-empty names -> nn\.Module"
    ):
        Defense("x", lin, surrogates={"a": "not a module"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="expected unrolled_n to be an int >= 1 or None, got 0"):
        RobustnessSettings(unrolled_n=0)
    assert RobustnessSettings().unrolled_n is None and RobustnessSettings.quick_preset().unrolled_n == 3
    assert default_curve_eps(("l2-1", "linf-0.1"), (1, 8, 8)) == {
        "curve_eps_linf": (0.05, 0.1, 0.2, 1.0),
        "curve_eps_l2": (0.5, 1.0, 2.0, 8.0),
    }
    assert default_curve_eps(("l2-2",), (3, 32, 32)) == {"curve_eps_l2": (1.0, 2.0, 4.0, 56.0)}
