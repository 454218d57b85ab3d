"""Any purifier is a defense: :class:`manifold_defense.purification.PurifiedClassifier` (forward, checks, seeding,
gradient variants), the harness's ``purifier_defense`` (the projection defense as one case of it, results
unchanged), one call from Python (:func:`eval.harness.evaluate_robustness`) and one command
(``python -m eval robustness --purifier FILE.py:factory``), on two purifiers the tests write themselves: a 3x3
smoothing filter (deterministic, differentiable) and dithered quantization (randomized, zero gradient) with a
soft quantizer as its surrogate, in front of a tiny linear classifier of 8x8 images."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from eval.cli import main, run
from eval.harness import (
    Defense,
    RobustnessReport,
    RobustnessSettings,
    evaluate_robustness,
    fingerprint,
    projection_defense,
    purifier_defense,
    run_robustness,
)
from eval.harness.models import load_factory
from manifold_defense.defense import LatentProjector, ProjectedClassifier
from manifold_defense.presets import projection_classifier, projection_purifier, schedule_config
from manifold_defense.purification import FixedSeed, PurifiedClassifier, detect_randomized
from tests.test_eval_robustness import TINY_INVERSION, _strip_times, tiny_settings, tiny_setup

#: The user's file: two purifiers, a surrogate, a classifier and data (written into tmp_path by the tests).
USER_FILE = textwrap.dedent(
    '''
    import math

    import torch
    from torch import nn

    LEVELS = 4


    class Smooth(nn.Module):
        """3x3 mean filter: deterministic, differentiable."""

        def forward(self, x):
            return nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


    class Dither(nn.Module):
        """round((x + u) * k) / k, u ~ U(-1/2k, 1/2k): randomized, zero gradient almost everywhere."""

        def forward(self, x):
            u = (torch.rand_like(x) - 0.5) / LEVELS
            return (torch.round((x + u) * LEVELS) / LEVELS).clamp(0, 1)


    class SoftQuantizer(nn.Module):
        """x - sin(2 pi k x) / (2 pi k): flat at the levels, steep between them, [0, 1] onto [0, 1]."""

        def forward(self, x):
            return x - torch.sin(2 * math.pi * LEVELS * x) / (2 * math.pi * LEVELS)


    class Blobs(nn.Module):
        """Linear classifier of 8x8 images: -||x - p_c||^2 up to a constant, p_c a bright 3x3 blob on gray."""

        def __init__(self):
            super().__init__()
            protos = torch.full((3, 1, 8, 8), 0.5)
            for c, (i, j) in enumerate([(1, 1), (1, 4), (4, 2)]):
                protos[c, 0, i : i + 3, j : j + 3] = 1.0
            self.register_buffer("protos", protos)

        def forward(self, x):
            p = self.protos.flatten(1)
            return 2 * x.flatten(1) @ p.T - (p * p).sum(1)


    def smooth():
        return Smooth()


    def dither():
        return Dither()


    def soft():
        return SoftQuantizer()


    def classifier():
        return Blobs()


    def data():
        g = torch.Generator().manual_seed(1)
        y = torch.arange(6) % 3
        x = (Blobs().protos[y] + 0.05 * torch.randn(6, 1, 8, 8, generator=g)).clamp(0, 1)
        return x, y


    def not_a_module():
        return "smooth"


    class Bright(nn.Module):
        def forward(self, x):
            return x + 1.0


    def bright():
        return Bright()
    '''
)

THREAT = "linf-0.2"
QUICK = {"n": 6, "threats": (THREAT,)}


@pytest.fixture()
def user(tmp_path: Path) -> dict[str, Any]:
    """The user's file and what it defines."""
    path = tmp_path / "my_purifiers.py"
    path.write_text(USER_FILE)
    made = {
        name: load_factory(f"{path}:{name}")() for name in ("smooth", "dither", "soft", "classifier", "data")
    }
    x, y = made.pop("data")
    return {"path": path, "x": x, "y": y, **made}


class InPlace(nn.Module):
    """A careless purifier: halves its input in place."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(0.5)


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 64 * 3).reshape(3, 64))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w.T


def _grad(model: nn.Module, x: Tensor) -> Tensor:
    x = x.clone().requires_grad_(True)
    model(x)[:, 0].sum().backward()
    assert x.grad is not None
    return x.grad


# ------------------------------------------------------------------------------------------ PurifiedClassifier
def test_forward_is_the_classifier_behind_the_purifier_and_the_input_is_never_modified(
    user: dict[str, Any],
) -> None:
    clf, x = user["classifier"], user["x"]
    defended = PurifiedClassifier(clf, user["smooth"], randomized=False)
    assert torch.equal(defended(x), clf(user["smooth"](x)))
    keep = x.clone()
    careless = PurifiedClassifier(clf, InPlace(), randomized=False)
    assert torch.allclose(careless(x), clf(keep * 0.5)) and torch.equal(x, keep)
    x_req = x.clone().requires_grad_(True)
    careless.variant("bpda")(x_req).sum().backward()
    assert torch.equal(x_req.detach(), keep)


def test_a_purifier_output_that_breaks_the_contract_is_refused_naming_it(user: dict[str, Any]) -> None:
    clf, x = user["classifier"], user["x"]
    cases: list[tuple[nn.Module, type[Exception], str]] = [
        (
            load_factory(f"{user['path']}:bright")(),
            ValueError,
            r"purifier 'Bright': expected images in \[0, 1\], got range",
        ),
        (
            nn.AvgPool2d(2),
            ValueError,
            r"purifier 'AvgPool2d': expected images of the input's shape \(6, 1, 8, 8\)",
        ),
        (nn.Flatten(), ValueError, r"purifier 'Flatten': expected images of the input's shape"),
    ]
    for purifier, error, message in cases:
        with pytest.raises(error, match=message):
            PurifiedClassifier(clf, purifier, randomized=False)(x)

    class NaNs(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * float("nan")

    class Labels(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.round().long()

    with pytest.raises(ValueError, match="purifier 'mine': expected finite images, got NaN or inf"):
        PurifiedClassifier(clf, NaNs(), randomized=False, name="mine")(x)
    with pytest.raises(
        TypeError, match=r"purifier 'Labels': expected a float tensor of images, got torch\.int64"
    ):
        PurifiedClassifier(clf, Labels(), randomized=False)(x)
    with pytest.raises(ValueError, match=r"input of purifier 'Smooth': expected values in \[0, 1\]"):
        PurifiedClassifier(clf, user["smooth"], randomized=False)(x + 2)


def test_gradient_variants_bpda_exact_and_surrogate() -> None:
    clf = Linear()
    smooth = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    defended = PurifiedClassifier(clf, smooth, randomized=False, exact=True, surrogates={"id": nn.Identity()})
    assert defended.gradients == ("bpda", "exact", "surrogate:id")
    w0 = clf.w[0].detach().reshape(1, 1, 8, 8).expand(2, 1, 8, 8)
    assert torch.allclose(_grad(defended, x), w0)  # BPDA: identity backward through the purifier
    assert torch.allclose(_grad(defended.variant("surrogate:id"), x), w0)
    exact = _grad(defended.variant("exact"), x)
    assert torch.allclose(exact, _grad(nn.Sequential(smooth, clf), x)) and not torch.allclose(exact, w0)
    for mode in ("bpda", "exact", "surrogate:id"):  # every variant computes the same function
        assert torch.allclose(defended.variant(mode)(x), clf(smooth(x)))
    with pytest.raises(
        ValueError, match=r"expected gradient to be one of \['bpda'\] \(the purifier declares no exact"
    ):
        PurifiedClassifier(clf, smooth, randomized=False).variant("exact")
    with pytest.raises(ValueError, match="surrogate:soft"):
        defended.variant("surrogate:soft")


def test_a_randomized_purifier_runs_each_call_under_its_own_seed(user: dict[str, Any]) -> None:
    clf, x = user["classifier"], user["x"]
    dither = PurifiedClassifier(clf, user["dither"], randomized=True, seed=3)
    state = torch.get_rng_state()
    first = [dither.purify(x) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert not torch.equal(first[0], first[1])  # fresh noise per call
    dither.reseed(3)
    assert all(torch.equal(a, dither.purify(x)) for a in first)  # the stream restarts
    assert detect_randomized(user["dither"], x) and not detect_randomized(user["smooth"], x)
    fixed = FixedSeed(user["dither"], seed=5)
    assert torch.equal(fixed(x), fixed(x))
    with pytest.raises(TypeError, match="expected randomized as a bool"):
        PurifiedClassifier(clf, user["dither"], randomized=None)  # type: ignore[arg-type]


def test_the_latent_projection_is_a_purifier() -> None:
    setup = tiny_setup(4)
    clf, gen, x = setup["classifier"], setup["generator"], setup["x"]
    projector = projection_purifier(gen, TINY_INVERSION, randomize=False)
    assert (
        isinstance(projector, LatentProjector) and projector.with_gradient("unrolled").gradient == "unrolled"
    )
    with pytest.raises(ValueError, match="has randomize=False but was declared randomized=True"):
        PurifiedClassifier(clf, projector, randomized=True)
    defended = projection_classifier(clf, gen, TINY_INVERSION, randomized=False)
    old = ProjectedClassifier(clf, projector)
    assert torch.equal(defended(x), old(x)) and torch.equal(defended.variant("exact")(x), old(x))
    bpda, exact = _grad(defended, x), _grad(defended.variant("exact"), x)
    assert torch.isfinite(exact).all() and not torch.allclose(bpda, exact)  # unrolled: another gradient
    with pytest.raises(ValueError, match="expected an encoder, got None"):
        projection_purifier(gen, schedule_config("fast"))


# ------------------------------------------------------------------------------------------------- harness
def test_projection_defense_is_a_purifier_defense_with_unchanged_results(tmp_path: Path) -> None:
    """Same fingerprint and same record as the projection defense built from its parts as before."""
    setup = tiny_setup()
    clf, gen = setup["classifier"], setup["generator"]

    def projector(gradient: str, randomize: bool) -> LatentProjector:
        return LatentProjector(gen, TINY_INVERSION, gradient, seed=0, randomize=randomize)  # type: ignore[arg-type]

    bpda = ProjectedClassifier(clf, projector("bpda", True)).eval()
    legacy = Defense(
        name="proj", model=bpda, classifier=clf, preprocess=projector("bpda", False).eval(), bpda_model=bpda,
        unrolled_model=ProjectedClassifier(clf, projector("unrolled", True)).eval(), randomized=True,
    )  # fmt: skip
    new = projection_defense("proj", clf, gen, TINY_INVERSION, seed=0)
    assert isinstance(new.model, PurifiedClassifier) and new.unrolled_model is not None
    settings = tiny_settings(
        attacks=("clean", "pgd", "bpda-pgd", "bpda-eot-pgd", "unrolled-pgd"), threats=("l2-1",)
    )
    x, y = setup["x"], setup["y"]
    assert fingerprint(settings, [new], x, y, {}) == fingerprint(settings, [legacy], x, y, {})
    records = [
        _strip_times(run_robustness(settings, [d], x, y, tmp_path / str(i), generator=gen, progress=False))
        for i, d in enumerate((legacy, new))
    ]
    for r in records:
        del r["defenses"]["proj"]["cost"]  # seconds per stage
    assert records[0] == records[1]
    assert records[1]["defenses"]["proj"]["attacks"]["unrolled-pgd"]["l2-1"]["status"] == "ran"


def test_purifier_defense_holds_each_variant(user: dict[str, Any]) -> None:
    clf, x = user["classifier"], user["x"]
    d = purifier_defense("smooth", clf, user["smooth"], randomized=False, exact=True)
    assert (
        d.model is d.bpda_model
        and d.unrolled_model is not None
        and not d.surrogates
        and d.randomized is False
    )
    assert torch.equal(d.unrolled_model(x), d.model(x))
    d = purifier_defense("dither", clf, user["dither"], randomized=True, surrogates={"soft": user["soft"]})
    assert d.unrolled_model is None and list(d.surrogates) == ["soft"] and d.randomized is True
    assert d.preprocess is not None and torch.equal(d.preprocess(x), d.preprocess(x))  # fixed seed
    assert torch.allclose(d.surrogates["soft"](x), clf(user["soft"](x)))
    with pytest.raises(
        ValueError, match=r"distinct surrogate names for defense 'dither', got \['soft'\] twice"
    ):
        purifier_defense("dither", clf, user["dither"], randomized=True, surrogates={"soft": user["soft"]},
                         stand_ins={"soft": clf})  # fmt: skip


# --------------------------------------------------------------------------------------- Python and command line
def _check_consistent(report: RobustnessReport) -> None:
    """Verdicts that hang together: worst case <= every stage's accuracy <= clean, accuracies non-increasing along
    the cascade, the worst case the last stage's, transfer counts that add up."""
    for d in report.defenses.values():
        for tk in report.threats:
            ran = [s for s in d.stages if s.threat == tk and s.ran]
            accs = [float(s.accuracy) for s in ran if s.accuracy is not None]
            assert len(accs) == len(ran) and accs[0] == d.clean
            assert all(a >= b for a, b in itertools.pairwise(accs))
            assert d.worst_case[tk] == accs[-1] <= d.clean
            for s in ran:
                if s.transfer is not None:
                    t = s.transfer
                    assert (
                        t.attacked == s.attacked and t.surrogate_broken == t.transferred + t.not_transferred
                    )
                    assert t.broken == t.transferred + (t.broken_without_surrogate or 0)
                for c in s.by_surrogate.values():
                    assert (
                        c.surrogate_broken == c.transferred + c.not_transferred and c.attacked <= s.attacked
                    )


def _defended(user: dict[str, Any], which: str) -> PurifiedClassifier:
    clf = user["classifier"]
    if which == "smooth":
        return PurifiedClassifier(clf, user["smooth"], randomized=False, exact=True)
    return PurifiedClassifier(clf, user["dither"], randomized=True, surrogates={"soft": user["soft"]})


def _python_report(
    user: dict[str, Any], defenses: dict[str, nn.Module], out: Path | None = None
) -> RobustnessReport:
    return evaluate_robustness(
        defenses,
        user["x"],
        user["y"],
        threats=[THREAT],
        settings=RobustnessSettings.quick_preset(n=6),
        out=out,
    )


def test_the_majority_vote_counts_every_draw_and_is_never_below_the_worst_case(user: dict[str, Any]) -> None:
    dither = _defended(user, "dither")
    base = RobustnessSettings.quick_preset(n=6)
    worst = evaluate_robustness({"dither": dither}, user["x"], user["y"], threats=[THREAT], settings=base)
    report = evaluate_robustness(
        {"dither": dither}, user["x"], user["y"], threats=[THREAT], settings=base.updated({"majority": True})
    )
    d = report["dither"]
    assert worst["dither"].majority_vote is None and d.majority_vote is not None
    # the votes change no worst-case verdict (the same seeds draw the same purifications) ...
    assert d.worst_case == worst["dither"].worst_case and d.clean == worst["dither"].clean
    # ... and a point a majority of draws gets right includes every point all draws get right
    assert d.majority_vote[THREAT] >= d.worst_case[THREAT]
    points = report.record["defenses"]["dither"]["robust_points"][THREAT]
    assert len(points) == round(d.worst_case[THREAT] * d.n) and all(0 <= i < d.n for i in points)
    from eval.robustness_report import write_markdown

    assert "Majority vote" in write_markdown(report.record) and "Majority vote" not in write_markdown(worst.record)


def test_one_python_call_evaluates_both_purifiers(user: dict[str, Any]) -> None:
    clf = user["classifier"]
    report = _python_report(
        user, {"undefended": clf, "smooth": _defended(user, "smooth"), "dither": _defended(user, "dither")}
    )
    assert (
        report.out is None
        and report.threats == (THREAT,)
        and list(report.defenses) == ["undefended", "smooth", "dither"]
    )
    _check_consistent(report)
    smooth, dither = report["smooth"], report["dither"]
    assert not smooth.randomized and not smooth.flagged("randomized-defense")
    exact = smooth.stage("unrolled-pgd", THREAT)
    assert exact.ran and exact.attacked > 0 and "PurifiedClassifier" in str(exact.through)
    assert exact.transfer is not None  # the exact variant is a stand-in: its verdicts are the real model's
    assert smooth.stage("bpda-eot-pgd", THREAT).reason == "deterministic defense: EOT equals bpda-pgd"
    assert dither.randomized and dither.draws == 2 and dither.flagged("randomized-defense")
    sur = dither.stage("surrogate-pgd", THREAT)
    assert (
        sur.ran
        and list(sur.by_surrogate) == ["soft"]
        and sur.by_surrogate["soft"].attacked == sur.attacked > 0
    )
    assert dither.stage("bpda-eot-pgd", THREAT).ran and dither.stage("real-bpda-eot", THREAT).ran
    assert not dither.stage("unrolled-pgd", THREAT).ran  # no exact gradient declared
    assert report["undefended"].stage("bpda-pgd", THREAT).status == "skipped"
    # at this budget the bare classifier holds and both purifiers lose points: a blurred or dithered blob is
    # easier to push across the boundary (the unrolled gradient finds it for the filter)
    assert report["undefended"].worst_case[THREAT] == report["undefended"].clean == 1.0
    assert smooth.worst_case[THREAT] < smooth.clean and exact.broken > 0
    assert dither.worst_case[THREAT] < dither.clean
    assert "smooth: clean" in report.summary()
    with pytest.raises(KeyError, match="no defense 'jpeg'"):
        report["jpeg"]


def test_one_command_evaluates_each_purifier_as_the_python_call_does(
    user: dict[str, Any], tmp_path: Path
) -> None:
    path = user["path"]
    base = ["robustness", "--quick", "--n", "6", "--threats", THREAT, "--classifier", f"{path}:classifier",
            "--data", f"{path}:data", "--device", "cpu", "--threads", "1", "--no-progress"]  # fmt: skip
    runs = {
        "smooth": ["--purifier", f"{path}:smooth", "--purifier-exact", "--purifier-deterministic"],
        "dither": [
            "--purifier",
            f"{path}:dither",
            "--purifier-surrogate",
            f"soft={path}:soft",
        ],  # randomness detected
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert main([*base, *extra, "--out", str(out)]) == 0
        record = json.loads((out / "results.json").read_text())
        assert list(record["defenses"]) == ["undefended", "purified"]
        cli = RobustnessReport.from_record(record, out)
        _check_consistent(cli)
        defenses = {
            "undefended": user["classifier"],
            "purified": _defended(user, name),
        }  # same names: same seeds
        python = _python_report(user, defenses, tmp_path / f"python-{name}")
        assert python.out == tmp_path / f"python-{name}" and (python.out / "report.md").exists()
        mine, theirs = cli["purified"], python["purified"]
        assert mine.randomized == theirs.randomized == (name == "dither")
        assert mine.worst_case == theirs.worst_case and mine.clean == theirs.clean
        assert [(s.attack, s.status, s.accuracy, s.transfer) for s in mine.stages] == [
            (s.attack, s.status, s.accuracy, s.transfer) for s in theirs.stages
        ]
        assert cli["undefended"].worst_case == python["undefended"].worst_case
    assert "--purifier" in json.loads((tmp_path / "dither" / "results.json").read_text())["command"]


def test_purifier_options_on_the_command_line_refuse_clearly(
    user: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = user["path"]
    base = ["robustness", "--quick", "--n", "4", "--threats", THREAT, "--classifier", f"{path}:classifier",
            "--data", f"{path}:data", "--device", "cpu", "--no-progress"]  # fmt: skip
    cases = [
        (["--purifier-exact"], "describe a purifier: expected --purifier FILE.py:factory too"),
        (["--purifier", f"{path}:not_a_module"], "expected --purifier"),
        (
            ["--purifier", f"{path}:bright", "--purifier-deterministic"],
            "purifier 'Bright of defense purified': expected images in [0, 1]",
        ),
        (["--purifier", "mnist-gan"], "got the zoo name 'mnist-gan'"),
        (
            [
                "--purifier",
                f"{path}:smooth",
                "--purifier-surrogate",
                f"a={path}:soft",
                "--purifier-surrogate",
                f"a={path}:soft",
            ],
            "expected distinct --purifier-surrogate names, got ['a', 'a']",
        ),
    ]
    for i, (extra, message) in enumerate(cases):
        code = run([*base, *extra, "--out", str(tmp_path / f"r{i}")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, (extra, err)
        assert message in err, (extra, err)
    with pytest.raises(SystemExit):  # argparse: one of the two randomness options
        main([*base, "--purifier", f"{path}:smooth", "--purifier-randomized", "--purifier-deterministic"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--purifier", f"{path}:dither", "--purifier-surrogate", "soft"])
    assert "expected --purifier-surrogate NAME=package.module:factory" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_randomized_purifier_on_cuda_is_seeded_per_call_and_leaves_the_rng_alone(
    user: dict[str, Any],
) -> None:
    device = torch.device("cuda")
    clf, x = user["classifier"].to(device), user["x"].to(device)
    dither = PurifiedClassifier(clf, user["dither"], randomized=True, seed=1).to(device)
    cpu, gpu = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    first = [dither.purify(x) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(device), gpu)
    assert first[0].device == x.device and not torch.equal(first[0], first[1])
    dither.reseed(1)
    assert all(torch.equal(a, dither.purify(x)) for a in first)
