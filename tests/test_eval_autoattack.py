"""``eval.autoattack``: torchattacks' AutoAttack through our adapter, its audit, checkpoints and the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_attacks_fixtures import make_data, train_classifier
from torch import nn

from attacks import PGD, Attack, Norm, PGDConfig, ThreatModel
from eval.autoattack import autoattack_accuracy, load_checkpoint_classifier, record_figure
from eval.cli import main
from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.integrity import IntegrityError, save_checked


@pytest.fixture(scope="module")
def linear_mnist(linear_mnist_model: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared softmax-regression MNIST classifier (conftest) and the first 40 test images."""
    test = load_mnist("test", limit=40)
    return linear_mnist_model, test.images, test.labels


def test_autoattack_at_least_as_strong_as_pgd_and_audited(
    linear_mnist: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = linear_mnist
    threat = ThreatModel(Norm.LINF, 0.05)
    result = autoattack_accuracy(model, x, y, threat, batch_size=16, progress=False)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    pgd = PGD(threat, PGDConfig(steps=40, step_size=0.005, seed=0))(model, x, y)
    pgd_acc = float((~pgd.success).float().mean())
    assert result.n == 40 and result.clean_accuracy == pytest.approx(clean) and clean > 0.75
    assert result.robust_accuracy <= pgd_acc + 1e-9 and result.robust_accuracy < clean - 0.2
    assert result.max_perturbation <= 0.05 + 1e-6 and result.nan_count == 0
    assert result.value_range[0] >= 0.0 and result.value_range[1] <= 1.0
    # A budget far too small to flip anything leaves the clean accuracy.
    tiny = autoattack_accuracy(model, x, y, ThreatModel(Norm.LINF, 1e-6), batch_size=40, progress=False)
    assert tiny.robust_accuracy == pytest.approx(clean)


def test_autoattack_rejects_bad_input(linear_mnist: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = linear_mnist
    threat = ThreatModel(Norm.L2, 1.0)
    with pytest.raises(ValueError, match="version"):
        autoattack_accuracy(model, x, y, threat, version="fast", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        autoattack_accuracy(model, x, y, threat, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="as many labels"):
        autoattack_accuracy(model, x, y[:3], threat, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        autoattack_accuracy(model, x * 2, y, threat, progress=False)
    with pytest.raises(TypeError, match="tensors"):
        autoattack_accuracy(model, x.numpy(), y, threat, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logits"):
        autoattack_accuracy(nn.Identity(), x, y, threat, progress=False)
    xs, ys = make_data(2, seed=1)
    with pytest.raises(ValueError, match="at least 4 classes"):
        autoattack_accuracy(train_classifier(xs, ys, steps=5), xs, ys, threat, progress=False)


def test_checkpoint_classifier_and_command(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = zoo.build("mnist-classifier")
    ckpt = tmp_path / "checkpoint.pt"
    save_checked({"step": 7, "config": {}, "trainer": "classifier", "state": {"model": net.state_dict()}}, ckpt)
    loaded = load_checkpoint_classifier(ckpt, "mnist-classifier", torch.device("cpu"))
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), net.eval()(x))
    save_checked({"step": 1, "config": {}, "trainer": "gan", "state": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="state\\['model'\\], got the gan trainer's"):
        load_checkpoint_classifier(tmp_path / "bad.pt", "mnist-classifier", torch.device("cpu"))
    torch.save({"step": 7, "state": {"model": net.state_dict()}}, tmp_path / "old.pt")  # the unchecked format
    with pytest.raises(IntegrityError, match=r"older format.*upgrade_checkpoint"):
        load_checkpoint_classifier(tmp_path / "old.pt", "mnist-classifier", torch.device("cpu"))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=r"cut\.pt does not match the SHA-256"):
        load_checkpoint_classifier(cut, "mnist-classifier", torch.device("cpu"))
    out = tmp_path / "aa"
    code = main(
        ["autoattack", "--model", "mnist-classifier", "--checkpoint", str(ckpt), "--n", "6", "--eps", "0.1",
         "--out", str(out), "--no-progress", "--threads", "1"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["n"] == 6 and report["source"] == str(ckpt) and report["version"] == "standard"
    assert 0 <= report["robust_accuracy"] <= report["clean_accuracy"] <= 1
    assert report["audit"]["max_perturbation"] <= 0.1 + 1e-6 and report["audit"]["nan_count"] == 0


def test_write_records_the_figure_in_the_zoo_record(tmp_path: Path) -> None:
    """``--write`` merges the AutoAttack result and the 10k clean accuracy into the record, keeping its other
    fields; the README table shows it; a modified weights file or ``--checkpoint`` is refused."""
    from eval.zoo_cli import markdown_table
    from manifold_defense.metrics import accuracy

    torch.manual_seed(0)
    net = zoo.build("mnist-pgd-at")
    zoo.save(net, "mnist-pgd-at", tmp_path, {"training": {"note": "test"}})
    args = ["autoattack", "--model", "mnist-pgd-at", "--weights-dir", str(tmp_path), "--n", "4", "--eps", "0.1",
            "--out", str(tmp_path / "aa"), "--no-progress", "--threads", "1", "--write"]  # fmt: skip
    assert main(args) == 0
    rec = zoo.record("mnist-pgd-at", tmp_path)
    fig = rec["figures"]["autoattack_linf_0.1"]
    report = json.loads((tmp_path / "aa" / "results.json").read_text())
    assert (
        fig["n"] == 4 and fig["robust_accuracy"] == report["robust_accuracy"] and fig["version"] == "standard"
    )
    test = load_mnist("test")
    assert rec["figures"]["clean_accuracy"] == accuracy(net.eval(), test.images, test.labels)
    assert rec["figures"]["n"] == 10_000 and rec["training"] == {"note": "test"}
    label = "AutoAttack (standard, torchattacks' 10-iteration wrapper) linf 0.1: clean / robust accuracy"
    assert fig["budget"] == "torchattacks" and f"| `mnist-pgd-at` | {label} |" in markdown_table(tmp_path)
    with pytest.raises(ValueError, match="cannot be used with --checkpoint"):
        main([*args, "--checkpoint", str(tmp_path / "x.pt")])
    (tmp_path / "mnist-pgd-at.safetensors").write_bytes(b"tampered")
    with pytest.raises(zoo.ZooIntegrityError):
        record_figure("mnist-pgd-at", report, tmp_path)


def test_pgd_steps_runs_pgd_and_records_its_own_key(tmp_path: Path) -> None:
    """``--pgd-steps`` (Jalal et al.'s l2 PGD-100 evaluation) runs the library's PGD, audits it in the threat model
    and records ``figures.pgd<steps>_<norm>_<eps>`` beside the AutoAttack figures; the zoo table shows it."""
    from eval.zoo_cli import markdown_table

    torch.manual_seed(0)
    net = zoo.build("mnist-l2-at")
    zoo.save(net, "mnist-l2-at", tmp_path, {"training": {"note": "test"}})
    args = ["autoattack", "--model", "mnist-l2-at", "--weights-dir", str(tmp_path), "--n", "5", "--norm", "l2",
            "--eps", "2.5", "--pgd-steps", "7", "--out", str(tmp_path / "pgd"), "--no-progress", "--threads", "1",
            "--write"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "pgd" / "results.json").read_text())
    assert report["attack"] == "pgd7" and report["version"] == "PGD 7 steps x 1 restarts"
    assert report["audit"]["max_perturbation"] <= 2.5 + 1e-4
    fig = zoo.record("mnist-l2-at", tmp_path)["figures"]["pgd7_l2_2.5"]
    assert fig["robust_accuracy"] == report["robust_accuracy"] <= report["clean_accuracy"]
    assert (
        "| `mnist-l2-at` | PGD-7 (PGD 7 steps x 1 restarts) l2 2.5: clean / robust accuracy |"
        in markdown_table(tmp_path)
    )


def test_attack_accuracy_refuses_bad_input(linear_mnist: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """The generic runner behind ``--pgd-steps`` checks its arguments like ``autoattack_accuracy`` and leaves the
    caller's images alone."""
    from attacks import PGD, Norm, PGDConfig, ThreatModel
    from eval.autoattack import attack_accuracy

    model, x, y = linear_mnist
    pgd = PGD(ThreatModel(Norm.L2, 1.0), PGDConfig(steps=3))
    before = x.clone()
    result = attack_accuracy(model, x, y, pgd, progress=False)
    assert torch.equal(x, before) and 0 <= result.robust_accuracy <= result.clean_accuracy <= 1
    assert result.max_perturbation <= 1.0 + 1e-5
    with pytest.raises(TypeError, match=r"expected attack as an attacks\.Attack"):
        attack_accuracy(model, x, y, "pgd", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="as many labels as images"):
        attack_accuracy(model, x, y[:-1], pgd, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        attack_accuracy(model, x, y, pgd, batch_size=0, progress=False)


class _BlackFirst(Attack):
    """A stub part: blacks out the first ``k`` images it is given and records the images it saw."""

    def __init__(self, threat: ThreatModel, k: int) -> None:
        super().__init__(threat)
        self.k, self.seen = k, list[torch.Tensor]()

    def run(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        x[: self.k] = 0.0
        return x


class _Brightness(nn.Module):
    """Class 1 for an image whose mean is above 0.5, else class 0 (4 classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-m, m, torch.full_like(m, -1.0), torch.full_like(m, -1.0)], 1)


def test_reference_budget_runs_the_reference_parts_in_order_first_success_kept() -> None:
    """``AutoAttackReference`` builds the reference implementation's parts (100 iterations, 5000 queries) and
    gives each part only the points the parts before it left; a point keeps the first image that fooled it."""
    from attacks import AUTOATTACK_REFERENCE, AutoAttackReference

    threat = ThreatModel(Norm.LINF, 1.0)
    aa = AutoAttackReference(threat)
    assert [p.name for p in aa.parts] == ["APGD", "APGDT", "FAB", "Square"]
    assert [p.kwargs.get("steps", p.kwargs.get("n_queries")) for p in aa.parts] == [100, 100, 100, 5000]
    assert aa.parts[2].kwargs["multi_targeted"] is True
    assert [p.kwargs["eot_iter"] for p in AutoAttackReference(threat, "rand").parts] == [20, 20]
    assert len(AUTOATTACK_REFERENCE["plus"]) == 6
    with pytest.raises(ValueError, match="version"):
        AutoAttackReference(threat, "fast")

    model = _Brightness().eval()
    x = (0.6 + 0.05 * torch.arange(6.0)).view(6, 1, 1, 1).expand(6, 1, 4, 4).clone()  # all class 1
    y = torch.ones(6, dtype=torch.int64)
    first, second = _BlackFirst(threat, k=2), _BlackFirst(threat, k=2)
    aa.parts = (first, second)  # type: ignore[assignment]
    before = x.clone()
    result = aa(model, x, y)
    assert torch.equal(x, before)
    assert torch.equal(first.seen[0], x)  # the first part attacks every point
    assert torch.equal(second.seen[0], x[2:])  # the second only the four the first left
    assert result.success.tolist() == [True, True, True, True, False, False]
    assert torch.equal(result.x_adv[:4], torch.zeros_like(x[:4])) and torch.equal(result.x_adv[4:], x[4:])


def test_reference_budget_at_least_as_strong_as_the_wrapper(
    linear_mnist: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    """On the same points the reference budget breaks at least what torchattacks' 10-iteration wrapper breaks
    here, and the command records the budget (and refuses an unknown one)."""
    model, x, y = linear_mnist
    threat = ThreatModel(Norm.L2, 0.6)
    wrapper = autoattack_accuracy(model, x[:16], y[:16], threat, batch_size=16, progress=False)
    ref = autoattack_accuracy(model, x[:16], y[:16], threat, batch_size=16, progress=False, budget="reference")
    assert ref.robust_accuracy <= wrapper.robust_accuracy < ref.clean_accuracy
    assert ref.max_perturbation <= 0.6 + 1e-5 and ref.nan_count == 0
    with pytest.raises(ValueError, match="budget"):
        autoattack_accuracy(model, x, y, threat, budget="huge", progress=False)
