"""CausalGAN on the digit world: graphs, exact distributions, the data generator, the controller, sampling, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from manifold_defense import zoo
from manifold_defense.causal import (
    CausalController,
    CausalGAN,
    CausalGraph,
    ConditionalGenerator,
    DigitWorld,
    Node,
    ProjectionCritic,
    one_hot_labels,
    read_attributes,
    train_controller,
    tvd,
)
from manifold_defense.causal.world import DIGIT_PRIOR, RIGHT_GIVEN_DIGIT_THICKNESS, THICK_GIVEN_DIGIT
from manifold_defense.data import load_mnist
from manifold_defense.training import GANTrainConfig, train_gan

W = DigitWorld


@pytest.fixture(scope="module")
def world() -> DigitWorld:
    mnist = load_mnist("train", limit=6000)
    return DigitWorld(mnist.images, mnist.labels)


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return W.sample_labels(20000, seed=0)


@pytest.fixture(scope="module")
def controller(labels: torch.Tensor) -> CausalController:
    ctrl = CausalController(W.graph, hidden=16)
    train_controller(ctrl, labels, steps=300, seed=0)
    return ctrl


def _within(p_hat: float, p: float, n: int, sigmas: float = 4.5) -> bool:
    return abs(p_hat - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


# graphs and exact distributions


def test_graph_order_parents_and_spec_round_trip() -> None:
    g = CausalGraph(
        [Node("S", ("a", "b"), ("D", "T")), Node("T", ("a", "b"), ("D",)), Node("D", ("0", "1", "2"))]
    )
    assert g.order == ("D", "T", "S") and g.parents("S") == ("D", "T") and g.shape == (3, 2, 2)
    assert CausalGraph.from_spec(g.spec()).spec() == g.spec()


@pytest.mark.parametrize(
    ("nodes", "match"),
    [
        (
            [Node("A", ("0", "1"), ("B",)), Node("B", ("0", "1"), ("A",))],
            r"expected a DAG, got a cycle among \['A', 'B'\]",
        ),
        ([Node("A", ("0", "1"), ("A",))], "its own parent"),
        ([Node("A", ("0", "1"), ("Z",))], r"unknown parent 'Z'"),
        ([Node("A", ("0", "1")), Node("A", ("0", "1"))], "duplicate node 'A'"),
        ([Node("A", ("0",))], "at least two distinct values"),
        ([], "at least one node"),
    ],
)
def test_bad_graphs_are_refused(nodes: list[Node], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CausalGraph(nodes)


def test_exact_conditional_and_interventional_distributions() -> None:
    prior = torch.tensor(DIGIT_PRIOR, dtype=torch.float64)
    thick = torch.tensor(THICK_GIVEN_DIGIT, dtype=torch.float64)
    assert torch.allclose(W.joint().sum(), torch.tensor(1.0, dtype=torch.float64))
    # do(T) leaves T's parent alone; conditioning on T is Bayes' rule
    torch.testing.assert_close(W.distribution("D", intervene={"T": "thick"}), prior)
    torch.testing.assert_close(
        W.distribution("D", condition={"T": "thick"}), prior * thick / (prior * thick).sum()
    )
    # S under do(T = thick): sum_d P(d) P(S = right | d, thick)
    right = torch.tensor(RIGHT_GIVEN_DIGIT_THICKNESS, dtype=torch.float64)[1]
    assert math.isclose(float(W.distribution("S", intervene={"T": 1})[1]), float((prior * right).sum()))
    # the requirement: the two exact distributions differ by >= 0.2
    for t in ("thick", "thin"):
        assert tvd(W.distribution("D", intervene={"T": t}), W.distribution("D", condition={"T": t})) >= 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"intervene": {"X": 0}}, r"unknown node 'X': expected one of \['D', 'T', 'S'\]"),
        ({"intervene": {"T": 2}}, r"node 'T': value index 2 out of range, expected 0..1"),
        ({"condition": {"T": "fat"}}, r"node 'T': unknown value 'fat'"),
        ({"condition": {"D": 1.5}}, "expected a value name or an int index"),
    ],
)
def test_bad_assignments_are_refused(controller: CausalController, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        W.distribution("D", **kwargs)
    with pytest.raises(ValueError, match=match):
        controller.sample(10, **kwargs)


def test_bad_sample_sizes_and_labels_are_refused(controller: CausalController, world: DigitWorld) -> None:
    with pytest.raises(ValueError, match="positive int"):
        controller.sample(0)
    with pytest.raises(ValueError, match="positive int"):
        W.sample_labels(-1, seed=0)
    with pytest.raises(ValueError, match=r"labels of node 'D': expected value indices in 0\.\.4, got 5 at row 0"):
        world.render_labels(torch.tensor([[5, 0, 0]]), seed=0)
    with pytest.raises(ValueError, match=r"expected label rows \(N, 3\)"):
        train_controller(CausalController(W.graph), torch.zeros(4, 2, dtype=torch.long))


# the data generator


def test_world_labels_reproduce_the_stated_tables(labels: torch.Tensor) -> None:
    d, t, s = labels.unbind(1)
    for i, p in enumerate(DIGIT_PRIOR):
        assert _within(float((d == i).double().mean()), p, len(d))
    for i, p in enumerate(THICK_GIVEN_DIGIT):
        rows = d == i
        assert _within(float(t[rows].double().mean()), p, int(rows.sum()))
    for ti in (0, 1):
        for i in range(len(DIGIT_PRIOR)):
            rows = (d == i) & (t == ti)
            p = RIGHT_GIVEN_DIGIT_THICKNESS[ti][i]
            assert _within(float(s[rows].double().mean()), p, int(rows.sum()))


def test_world_images_carry_their_attributes(world: DigitWorld) -> None:
    """The attributes are read back from the pixels (zoo classifier and morphometrics), not trusted."""
    data = world.sample(300, seed=1)
    assert (
        data.images.shape == (300, 1, 28, 28)
        and 0 <= float(data.images.min()) <= float(data.images.max()) <= 1
    )
    read = read_attributes(data.images, zoo.load("mnist-classifier"))
    agree = {n: float((read[n] == data.labels[:, i]).double().mean()) for i, n in enumerate("DTS")}
    assert agree["T"] >= 0.98 and agree["S"] >= 0.98 and agree["D"] >= 0.95, agree


def test_world_interventional_sampling_follows_the_truncated_factorization() -> None:
    rows = W.sample_labels(20000, seed=2, intervene={"T": "thick"})
    assert bool((rows[:, 1] == 1).all())
    hist = torch.bincount(rows[:, 0], minlength=5).double() / len(rows)
    assert tvd(hist, W.distribution("D")) < 0.02
    cond = W.sample_labels(20000, seed=2, condition={"T": "thick"})
    hist = torch.bincount(cond[:, 0], minlength=5).double() / len(cond)
    assert tvd(hist, W.distribution("D", condition={"T": "thick"})) < 0.02


# the controller


def test_controller_learns_the_joint(controller: CausalController) -> None:
    assert tvd(controller.joint(), W.joint()) < 0.03


def test_intervened_node_parents_keep_their_marginal(controller: CausalController) -> None:
    n = 20000
    do = controller.sample(n, intervene={"T": "thick"}, seed=5)
    assert bool((do[:, 1] == 1).all())
    d_do = torch.bincount(do[:, 0], minlength=5).double() / n
    p_d = controller.joint().sum(dim=(1, 2))
    for i in range(5):
        assert _within(float(d_do[i]), float(p_d[i]), n)
    # the child S follows its mechanism under the set value
    s_do = float(do[:, 2].double().mean())
    assert _within(s_do, float(controller.joint({"T": 1}).sum(dim=(0, 1))[1]), n)
    # conditioning on T moves D instead
    cond = controller.sample(n, condition={"T": "thick"}, seed=5)
    d_cond = torch.bincount(cond[:, 0], minlength=5).double() / n
    assert tvd(d_cond, W.distribution("D", condition={"T": "thick"})) < 0.03
    assert tvd(d_cond, d_do) > 0.25


def test_controller_sampling_is_seeded_and_leaves_the_global_rng(controller: CausalController) -> None:
    state = torch.get_rng_state()
    a = controller.sample(500, condition={"S": "right"}, seed=3)
    b = controller.sample(500, condition={"S": "right"}, seed=3)
    c = controller.sample(500, condition={"S": "right"}, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and bool((a[:, 2] == 1).all())
    assert torch.equal(torch.get_rng_state(), state)


def test_rejection_sampling_gives_up_with_a_clear_error() -> None:
    g = CausalGraph([Node("A", ("0", "1"))])
    ctrl = CausalController(g)
    with torch.no_grad():
        ctrl.roots["A"].copy_(torch.tensor([30.0, -30.0]))
    with pytest.raises(ValueError, match="probability too small for rejection sampling"):
        ctrl.sample(10, condition={"A": 1}, max_draws=5000)


# the image side


def test_causal_gan_sampling_is_seeded(controller: CausalController) -> None:
    torch.manual_seed(0)
    gan = CausalGAN(controller, ConditionalGenerator(latent_dim=8, label_dim=9, width=4).eval())
    a = gan.sample(6, intervene={"T": "thick"}, seed=1)
    b = gan.sample(6, intervene={"T": "thick"}, seed=1)
    c = gan.sample(6, intervene={"T": "thick"}, seed=2)
    assert (
        a.images.shape == (6, 1, 28, 28)
        and torch.equal(a.images, b.images)
        and torch.equal(a.labels, b.labels)
    )
    assert not torch.equal(a.images, c.images)
    assert bool((a.label(W.graph, "T") == 1).all())
    with pytest.raises(ValueError, match="label_dim 9"):
        CausalGAN(controller, ConditionalGenerator(latent_dim=8, label_dim=4, width=4))


def test_conditional_gan_training_resumes_exactly(tmp_path: Path, world: DigitWorld) -> None:
    data = world.sample(64, seed=3)
    ds = TensorDataset(data.images, one_hot_labels(W.graph, data.labels))
    config = GANTrainConfig(steps=4, batch_size=16, bn_batches=1, checkpoint_every=2)

    def trained(folder: Path, steps: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        gen, disc = ConditionalGenerator(latent_dim=8, width=4), ProjectionCritic(width=4)
        cfg = GANTrainConfig(**{**config.__dict__, "steps": steps})
        train_gan(gen, disc, ds, cfg, checkpoint_dir=folder, progress=False, conditional=True)
        return gen.state_dict()

    whole = trained(tmp_path / "a", 4)
    trained(tmp_path / "b", 2)
    resumed = trained(tmp_path / "b", 4)
    for k in whole:
        torch.testing.assert_close(whole[k], resumed[k], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"expected a dataset of \(image, condition\) pairs"):
        train_gan(ConditionalGenerator(latent_dim=8, width=4), ProjectionCritic(width=4), TensorDataset(data.images),
                  config, progress=False, conditional=True)  # fmt: skip


# the command


def test_eval_causal_end_to_end_and_resume(tmp_path: Path) -> None:
    from eval.causal import quick_protocol, run

    protocol = quick_protocol(train_size=400, steps=4, batch_size=16, controller_steps=50, n_samples=60)
    out = tmp_path / "causal"
    first = run(protocol, out, command="test")
    assert (out / "results.md").is_file() and (out / "do_vs_condition.png").is_file()
    assert set(first["models"]) == {"causal", "independent", "reversed"}
    d = first["models"]["causal"]["settings"]["do(T=thick)"]["D"]
    assert d["exact_do_vs_condition"] >= 0.2 and 0 <= d["tvd"] <= 1
    assert first["checks"]["independent"]["controller_joint_tvd"] > 0.2  # the graph matters
    assert set(zoo.available(out / "models")) == {"causal-digit-gan", "causal-digit-controller"}
    again = run(protocol, out, command="test")
    assert json.dumps(again["models"], sort_keys=True) == json.dumps(first["models"], sort_keys=True)
    from eval.run_folder import RunFolderError

    with pytest.raises(RunFolderError, match="another protocol"):
        run(quick_protocol(n_samples=61), out, command="test")


@pytest.mark.skipif("causal-digit-controller" not in zoo.available(), reason="not shipped")
def test_shipped_controller_reaches_the_figure() -> None:
    ctrl = zoo.load("causal-digit-controller")
    assert isinstance(ctrl, CausalController) and ctrl.graph.spec() == W.graph.spec()
    assert tvd(ctrl.joint(), W.joint()) <= 0.05


def test_eval_causal_labels_only_shows_the_graph_matters(tmp_path: Path) -> None:
    """Label level, exact: the true graph matches both do() and conditioning; the independent controller fails
    conditioning, the reversed one fails intervention."""
    from eval.causal import CausalProtocol, run

    res = run(
        CausalProtocol(train=True, images=False, train_size=20000, controller_steps=400), tmp_path / "c"
    )
    checks = res["checks"]
    assert checks["causal"]["labels_all_ok"] and checks["causal"]["all_ok"] is None
    assert (
        checks["independent"]["labels: T=thick D tvd"] > 0.25
        and checks["independent"]["labels: do(T=thick) D tvd"] < 0.03
    )
    assert (
        checks["reversed"]["labels: do(T=thick) D tvd"] > 0.25
        and checks["reversed"]["labels: T=thick D tvd"] < 0.03
    )
    assert res["real_floor"] == {} and zoo.available(tmp_path / "c" / "models") == ["causal-digit-controller"]
    from eval.causal import write_zoo

    assert write_zoo(res, tmp_path / "c", tmp_path / "zoo") == ["causal-digit-controller"]
    rec = zoo.record("causal-digit-controller", tmp_path / "zoo")
    assert rec["figures"]["controller_joint_tvd"] == checks["causal"]["controller_joint_tvd"]
    zoo.load("causal-digit-controller", weights_dir=tmp_path / "zoo")
    with pytest.raises(ValueError, match="expected a full run, got the --quick"):
        write_zoo({**res, "protocol": {**res["protocol"], "quick": True}}, tmp_path / "c", tmp_path / "zoo")


@pytest.mark.skipif("causal-digit-gan" not in zoo.available(), reason="not shipped")
def test_shipped_gan_draws_the_attributes_it_is_given() -> None:
    """The shipped image generator's samples read back as the labels they were drawn for (digit by the zoo
    classifier, thickness and slant by morphometrics): the precondition of every image-level figure."""
    gan = CausalGAN(zoo.load("causal-digit-controller"), zoo.load("causal-digit-gan"))
    sample = gan.sample(300, seed=11)
    read = read_attributes(sample.images, zoo.load("mnist-classifier"))
    agree = {n: float((read[n] == sample.labels[:, i]).double().mean()) for i, n in enumerate("DTS")}
    assert min(agree.values()) >= 0.9, agree
