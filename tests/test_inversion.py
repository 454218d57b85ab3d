"""The latent-optimization core: recovery, restarts, batch independence, early stopping, pruning, unrolled
gradients, non-linear operators, sparse deviations, state restoration and input validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from manifold_defense.inversion import (
    GaussianMatrix,
    Identity,
    InversionConfig,
    Mixture,
    Nonlinear,
    SignMeasurements,
    invert,
    measure,
)

K = 4


class TinyGenerator(nn.Module):
    """A fixed random MLP k=4 -> 16 -> 1x4x4 with a sigmoid output (values in (0, 1)); the second layer is
    scaled down so the sigmoid rarely saturates (a well-conditioned inverse problem)."""

    def __init__(self, seed: int = 1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.latent_dim = K
        second = nn.Linear(16, 16)
        self.net = nn.Sequential(nn.Linear(K, 16), nn.Tanh(), second, nn.Sigmoid())
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            second.weight.mul_(0.35)
        self.to(dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(-1, 1, 4, 4)


class Unbounded(TinyGenerator):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 3.0 * super().forward(z) - 1.0


@pytest.fixture(scope="module")
def gen() -> TinyGenerator:
    return TinyGenerator()


def _latents(n: int, seed: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _images(generator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return generator(z)


FAST = InversionConfig(lr=0.05, steps=400, restarts=4)


def test_recovers_range_point_from_identity(gen: TinyGenerator) -> None:
    x = _images(gen, _latents(4))
    result = invert(gen, x, config=FAST)
    assert result.x_hat.shape == x.shape and result.z.shape == (4, K)
    assert float((result.x_hat - x).abs().max()) < 1e-4
    torch.testing.assert_close(result.x_hat, _images(gen, result.z))
    assert result.restart_losses.shape == (4, 4)
    torch.testing.assert_close(result.loss, result.restart_losses.min(dim=1).values)
    assert result.steps_run == 400
    assert result.generator_evals.tolist() == [4 * 401] * 4
    assert not result.x_hat.requires_grad


@pytest.mark.parametrize("scaling", ["csgm", "normalized"])
def test_recovers_range_point_from_gaussian_measurements(gen: TinyGenerator, scaling: str) -> None:
    x = _images(gen, _latents(3))
    op = GaussianMatrix(12, (1, 4, 4), scaling=scaling, seed=0)  # type: ignore[arg-type]
    result = invert(gen, measure(op, x), op, FAST.replace(steps=500))
    assert float((result.x_hat - x).abs().max()) < 1e-4


def test_defense_gan_preset_projects_close(gen: TinyGenerator) -> None:
    x = _images(gen, _latents(2))
    start = invert(gen, x, config=InversionConfig.defense_gan(steps=0, restarts=3))
    result = invert(gen, x, config=InversionConfig.defense_gan(steps=60, restarts=3))
    assert (result.loss < 0.05 * start.loss).all()
    assert result.generator_evals.tolist() == [3 * 61] * 2


def test_restarts_keep_the_best(gen: TinyGenerator) -> None:
    z_star = _latents(1)
    x = _images(gen, z_star)
    far = torch.full((1, K), 4.0)
    starts = torch.stack([far, -far, z_star + 1e-3, far * 0.5], dim=1)  # restart 2 starts at the answer
    result = invert(gen, x, config=InversionConfig(lr=0.01, steps=5, restarts=4), z_init=starts)
    assert int(result.best_restart) == 2
    assert float(result.restart_losses[0, 2]) == float(result.restart_losses.min())
    assert float(result.restart_losses[0, 2]) < 0.1 * float(result.restart_losses[0, [0, 1, 3]].min())
    torch.testing.assert_close(result.loss, result.restart_losses[:, 2])


@pytest.mark.parametrize(
    "config",
    [
        FAST.replace(steps=60),
        InversionConfig.defense_gan(steps=40, restarts=3, prune_after=10, prune_keep=2),
        FAST.replace(steps=80, early_stop_tol=1e-7, early_stop_patience=3, z_prior_weight=0.01, z_radius=2.0),
        FAST.replace(steps=30, deviation="dct", deviation_weight=1e-3),
    ],
    ids=["adam", "sgd-pruned", "early-stop", "deviation"],
)
def test_sample_result_is_independent_of_its_batch(gen: TinyGenerator, config: InversionConfig) -> None:
    x = _images(gen, _latents(5)) * 0.9 + 0.05
    seeds = [10, 11, 12, 13, 14]
    batch = invert(gen, x, config=config, seeds=seeds)
    alone = invert(gen, x[2:3], config=config, seeds=[12])
    pair = invert(gen, torch.cat([x[4:5], x[2:3]]), config=config, seeds=[14, 12])
    for other in (alone, pair):
        row = 0 if other is alone else 1
        torch.testing.assert_close(other.z[row], batch.z[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.x_hat[row], batch.x_hat[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.restart_losses[row], batch.restart_losses[2], rtol=1e-4, atol=1e-9)
        assert int(other.generator_evals[row]) == int(batch.generator_evals[2])


def test_default_seed_gives_identical_samples_identical_results(gen: TinyGenerator) -> None:
    x = _images(gen, _latents(1)).repeat(3, 1, 1, 1)
    result = invert(gen, x, config=FAST.replace(steps=20))
    torch.testing.assert_close(result.z[0], result.z[2])
    other_seed = invert(gen, x[:1], config=FAST.replace(steps=20, seed=1))
    assert not torch.equal(result.restart_losses[0], other_seed.restart_losses[0])


def test_early_stopping_freezes_converged_samples_only(gen: TinyGenerator) -> None:
    z_star = _latents(2)
    x = _images(gen, z_star)
    # Sample 0 starts at its exact answer (nothing to improve); sample 1 starts far away and keeps improving.
    z_init = torch.stack([z_star[0], z_star[1] + 2.0])
    base = InversionConfig(lr=0.002, steps=40, restarts=1)
    stopped = invert(gen, x, config=base.replace(early_stop_tol=1e-9, early_stop_patience=5), z_init=z_init)
    full = invert(gen, x, config=base, z_init=z_init)
    assert int(stopped.generator_evals[0]) < 10  # frozen after patience steps
    assert int(stopped.generator_evals[1]) == 41
    assert stopped.steps_run == 40
    torch.testing.assert_close(stopped.z[1], full.z[1])  # the running sample is untouched by its neighbour
    torch.testing.assert_close(stopped.z[0], z_star[0], atol=1e-6, rtol=0)
    assert float(stopped.loss[0]) < 1e-10


def test_early_stopping_ends_the_loop_when_all_converged(gen: TinyGenerator) -> None:
    z_star = _latents(2)
    x = _images(gen, z_star)
    config = InversionConfig(lr=0.01, steps=500, restarts=2, early_stop_tol=0.0, early_stop_patience=4)
    result = invert(gen, x, config=config, z_init=z_star, seeds=[0, 1])
    assert result.steps_run < 500
    assert int(result.generator_evals.max()) < 2 * 501


def test_pruning_keeps_the_restart_that_ends_best(gen: TinyGenerator) -> None:
    z_star = _latents(1)
    x = _images(gen, z_star)
    starts = torch.stack(
        [z_star + 3.0, z_star - 3.0, z_star + torch.tensor([3.0, -3, 3, -3]), z_star + 0.3], dim=1
    )
    config = InversionConfig(lr=0.05, steps=100, restarts=4, prune_after=3, prune_keep=1)
    pruned = invert(gen, x, config=config, z_init=starts)
    assert int(pruned.best_restart) == 3
    assert torch.isinf(pruned.restart_losses[0, :3]).all() and torch.isfinite(pruned.restart_losses[0, 3])
    assert int(pruned.generator_evals) == 3 * 4 + 101
    alone = invert(gen, x, config=config.replace(restarts=1, prune_after=None), z_init=starts[:, 3:])
    torch.testing.assert_close(pruned.z, alone.z)
    unpruned = invert(gen, x, config=config.replace(prune_after=None), z_init=starts)
    assert int(unpruned.best_restart) == 3


def _unrolled_value(
    y: torch.Tensor, gen64: TinyGenerator, config: InversionConfig, w: torch.Tensor
) -> torch.Tensor:
    result = invert(gen64, y, config=config, differentiable=True, seeds=[5, 6])
    return (result.x_hat * w).sum() + (result.z**2).sum()


@pytest.mark.parametrize(
    "config",
    [
        InversionConfig(
            optimizer="sgd", lr=0.5, momentum=0.7, steps=6, restarts=2, schedule="step", decay_at=0.5
        ),
        InversionConfig(optimizer="adam", lr=0.05, steps=6, restarts=2, z_prior_weight=0.01, z_radius=1.5),
    ],
    ids=["sgd", "adam"],
)
def test_unrolled_gradient_matches_finite_differences(config: InversionConfig) -> None:
    gen64 = TinyGenerator(dtype=torch.float64)
    y = _images(gen64, _latents(2, dtype=torch.float64)) * 0.8 + 0.1
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y_var = y.clone().requires_grad_(True)
    value = _unrolled_value(y_var, gen64, config, w)
    (grad,) = torch.autograd.grad(value, y_var)
    assert grad.abs().max() > 0
    for seed in range(2):
        direction = torch.randn(
            y.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64
        )
        eps = 1e-6
        plus = _unrolled_value(y + eps * direction, gen64, config, w)
        minus = _unrolled_value(y - eps * direction, gen64, config, w)
        numeric = (plus - minus) / (2 * eps)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-8)
    # the unrolled and fast paths compute the same iterates
    fast = invert(gen64, y, config=config, seeds=[5, 6])
    slow = invert(gen64, y, config=config, seeds=[5, 6], differentiable=True)
    torch.testing.assert_close(fast.x_hat, slow.x_hat.detach())


def test_unrolled_deviation_and_pruning_keep_finite_gradients() -> None:
    gen64 = TinyGenerator(dtype=torch.float64)
    y = (_images(gen64, _latents(2, dtype=torch.float64)) * 0.8 + 0.1).requires_grad_(True)
    config = InversionConfig(
        lr=0.05, steps=5, restarts=3, prune_after=2, prune_keep=1, deviation="pixel", deviation_weight=1e-3
    )
    result = invert(gen64, y, config=config, differentiable=True)
    (grad,) = torch.autograd.grad(result.x_hat.sum(), y)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_nonlinear_operator_backpropagates(gen: TinyGenerator) -> None:
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    classifier.train()
    x = _images(gen, _latents(2))
    op = Nonlinear(classifier, loss="mse")
    with torch.no_grad():
        logits = classifier(x)
    start = invert(gen, logits, op, InversionConfig(steps=0, restarts=2))
    result = invert(gen, logits, op, InversionConfig(lr=0.05, steps=150, restarts=2))
    assert (result.loss < 0.05 * start.loss).all()
    assert classifier.training and all(p.requires_grad and p.grad is None for p in classifier.parameters())

    labels = logits.argmax(1)
    ce = Nonlinear(classifier, loss="cross_entropy")
    before = invert(gen, labels, ce, InversionConfig(steps=0))
    after = invert(gen, labels, ce, InversionConfig(lr=0.05, steps=100))
    assert (after.loss < before.loss).all()
    assert (classifier(after.x_hat).argmax(1) == labels).all()

    y = logits.clone().requires_grad_(True)
    unrolled = invert(gen, y, op, InversionConfig(lr=0.05, steps=5), differentiable=True)
    (grad,) = torch.autograd.grad(unrolled.x_hat.sum(), y)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_sparse_deviation_beats_plain_inversion(gen: TinyGenerator) -> None:
    x0 = _images(gen, _latents(3))
    v = torch.zeros_like(x0)
    v[:, 0, 1, 2] = 0.6
    v[:, 0, 3, 0] = -0.5
    x = x0 + v
    op = GaussianMatrix(14, (1, 4, 4), scaling="normalized", seed=0)
    y = measure(op, x)
    config = InversionConfig(optimizer="sgd", lr=2.0, momentum=0.9, steps=600, restarts=6)
    plain = invert(gen, y, op, config)
    # Weight 1e-3: at 1e-2 the l1 term of the true v (0.011) exceeds the objective of wrong (z, v) pairs that
    # FISTA finds (about 0.006), so the truth is not the minimiser there.
    sparse = invert(gen, y, op, config.replace(deviation="pixel", deviation_weight=1e-3))
    plain_err = (plain.x_hat - x).flatten(1).norm(dim=1)
    sparse_err = (sparse.x_hat - x).flatten(1).norm(dim=1)
    assert float(sparse_err.mean()) < 0.5 * float(plain_err.mean())
    assert sparse.deviation is not None and plain.deviation is None
    assert int((sparse.deviation != 0).sum()) < 3 * 16 // 2  # the proximal step keeps v sparse
    torch.testing.assert_close(sparse.x_hat, _images(gen, sparse.z) + sparse.deviation)


def test_mixture_and_one_bit_measurements(gen: TinyGenerator) -> None:
    x = _images(gen, _latents(2))
    mix = Mixture([(Identity((1, 4, 4)), 1.0), (GaussianMatrix(6, (1, 4, 4), scaling="normalized"), 0.5)])
    result = invert(gen, measure(mix, x), mix, FAST.replace(steps=300))
    assert float((result.x_hat - x).abs().max()) < 1e-3

    one_bit = SignMeasurements(GaussianMatrix(40, (1, 4, 4), seed=2))
    signs = measure(one_bit, x)
    start = invert(gen, signs, one_bit, FAST.replace(steps=0))
    fitted = invert(gen, signs, one_bit, FAST.replace(steps=200))
    agree_start = (one_bit.observe(one_bit(start.x_hat)) == signs).float().mean()
    agree = (one_bit.observe(one_bit(fitted.x_hat)) == signs).float().mean()
    assert float(agree) > 0.9 and float(agree) > float(agree_start)


def test_encoder_init_and_z_init(gen: TinyGenerator) -> None:
    z_star = _latents(2)
    x = _images(gen, z_star)

    class Oracle(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return z_star[: images.shape[0]].clone()

    config = InversionConfig(steps=0, restarts=3, init="encoder", init_std=0.5)
    result = invert(gen, x, config=config, encoder=Oracle())
    torch.testing.assert_close(result.z, z_star)
    assert result.best_restart.tolist() == [0, 0] and float(result.loss.max()) < 1e-12
    assert (result.restart_losses[:, 1:] > 0).all()
    from_init = invert(gen, x, config=config.replace(init="random"), z_init=z_star)
    torch.testing.assert_close(from_init.restart_losses, result.restart_losses)


def test_z_radius_and_prior_shrink_latents(gen: TinyGenerator) -> None:
    x = _images(gen, _latents(3) * 2.0)
    free = invert(gen, x, config=FAST.replace(steps=100))
    ball = invert(gen, x, config=FAST.replace(steps=100, z_radius=0.5))
    prior = invert(gen, x, config=FAST.replace(steps=100, z_prior_weight=0.1))
    assert float(ball.z.norm(dim=1).max()) <= 0.5 + 1e-6
    assert float(free.z.norm(dim=1).max()) > 1.0
    assert (prior.z.norm(dim=1) < free.z.norm(dim=1)).all()


def test_state_is_restored_and_inputs_untouched(gen: TinyGenerator) -> None:
    generator = TinyGenerator()
    generator.train()
    generator.net[0].weight.requires_grad_(False)
    x = _images(generator, _latents(2))
    x.requires_grad_(False)
    x_copy = x.clone()
    z_init = _latents(2, seed=8)
    z_copy = z_init.clone()
    with torch.no_grad():  # the defense may be called under no_grad: the core still optimises
        result = invert(generator, x, config=FAST.replace(steps=50), z_init=z_init)
    assert float(result.loss.max()) < float(((x - _images(generator, z_init)) ** 2).mean())
    assert generator.training and all(m.training for m in generator.modules())
    assert not generator.net[0].weight.requires_grad and generator.net[0].bias.requires_grad
    assert all(p.grad is None for p in generator.parameters())
    assert torch.equal(x, x_copy) and torch.equal(z_init, z_copy)


def test_config_presets_schedule_and_validation() -> None:
    dg = InversionConfig.defense_gan()
    assert (dg.optimizer, dg.lr, dg.momentum, dg.steps, dg.restarts) == ("sgd", 10.0, 0.7, 200, 10)
    assert (dg.schedule, dg.decay_at, dg.decay_factor, dg.init_std) == ("step", 0.8, 0.1, None)
    assert dg.lr_at(159) == 10.0 and dg.lr_at(160) == pytest.approx(1.0)
    cs = InversionConfig.csgm()
    assert (cs.optimizer, cs.lr, cs.steps, cs.restarts, cs.z_prior_weight) == ("adam", 0.01, 1000, 10, 0.1)
    cosine = InversionConfig(schedule="cosine", lr=1.0, steps=10)
    assert (
        cosine.lr_at(0) == 1.0
        and cosine.lr_at(5) == pytest.approx(0.5)
        and cosine.lr_at(10) == pytest.approx(0)
    )
    with pytest.raises(ValueError, match=r"InversionConfig\.lr: expected a finite float > 0, got -1"):
        InversionConfig(lr=-1)
    with pytest.raises(ValueError, match="momentum: expected 0 with optimizer='adam'"):
        InversionConfig(momentum=0.9)
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        InversionConfig(optimizer="lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prune_keep: expected an int in \\[1, restarts=2\\)"):
        InversionConfig(restarts=2, prune_after=5, prune_keep=2)
    with pytest.raises(ValueError, match="prune_after: expected None or an int in \\[0, steps=10\\)"):
        InversionConfig(steps=10, restarts=2, prune_after=10)
    with pytest.raises(ValueError, match="steps: expected an int >= 0, got True"):
        InversionConfig(steps=True)
    with pytest.raises(ValueError, match="deviation: expected one of"):
        InversionConfig(deviation="wavelet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="z_radius: expected None or a finite float > 0"):
        InversionConfig(z_radius=0.0)
    with pytest.raises(ValueError, match="restarts: expected an int >= 1"):
        InversionConfig.csgm(restarts=0)


def test_invert_rejects_bad_inputs(gen: TinyGenerator) -> None:
    x = _images(gen, _latents(2))
    op = GaussianMatrix(5, (1, 4, 4))
    cfg = InversionConfig(steps=1)
    with pytest.raises(ValueError, match=r"expected measurements y of shape \(B, \*\(5,\)\), got \(2, 6\)"):
        invert(gen, torch.zeros(2, 6), op, cfg)
    with pytest.raises(ValueError, match="finite measurements"):
        invert(gen, torch.full((2, 5), float("inf")), op, cfg)
    with pytest.raises(ValueError, match=r"z_init of shape \(2, 4\) or \(2, 1, 4\) \(latent_dim=4\), got"):
        invert(gen, x, config=cfg, z_init=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="generator outputs in \\[0, 1\\]"):
        invert(Unbounded(), x, config=cfg)
    with pytest.raises(TypeError, match="config as an InversionConfig, got dict"):
        invert(gen, x, config={"steps": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"operator as a MeasurementOperator \(wrap a callable"):
        invert(gen, x, lambda t: t, cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Identity operator for init='encoder'"):
        invert(gen, measure(op, x), op, cfg.replace(init="encoder"), encoder=nn.Flatten())
    with pytest.raises(ValueError, match="expected an encoder"):
        invert(gen, x, config=cfg.replace(init="encoder"))
    with pytest.raises(TypeError, match="latent_dim as a positive int"):
        invert(nn.Sigmoid(), x, config=cfg)
    with pytest.raises(ValueError, match="expected 2 seeds"):
        invert(gen, x, config=cfg, seeds=[1])
    with pytest.raises(ValueError, match=r"expected generator images of shape \(1, 2, 2\)"):
        invert(gen, torch.rand(2, 1, 2, 2), config=cfg)
    with pytest.raises(RuntimeError, match=r"outside torch\.inference_mode"), torch.inference_mode():
        invert(gen, x, config=cfg)


class ZeroGenerator(nn.Module):
    """G(z) = 0 for every z (the generator contributes nothing; z receives a zero gradient)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.latent_dim = K
        self.anchor = nn.Parameter(torch.zeros((), dtype=dtype))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (0.0 * z.sum(dim=1) + self.anchor).reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4)


@pytest.mark.parametrize("basis", ["pixel", "dct"])
def test_deviation_fista_reaches_the_lasso_optimum(basis: str) -> None:
    # With G = 0 the joint problem is the Lasso min_c mean((A Psi c - y)^2) + w ||c||_1, i.e. scikit-learn's
    # 1/(2m) ||y - A Psi c||^2 + (w/2) ||c||_1. FISTA with step 1/L must reach its optimum.
    from sklearn.linear_model import Lasso

    from manifold_defense.inversion.dct import dct2, idct2

    op = GaussianMatrix(10, (1, 4, 4), scaling="csgm", seed=3)
    coef = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    coef[0, 0, 0, 1], coef[0, 0, 2, 3], coef[1, 0, 1, 1], coef[1, 0, 3, 0] = 0.9, -0.6, 0.7, 0.4
    v_true = coef if basis == "pixel" else idct2(coef)
    y = measure(op, v_true, noise_std=0.05, generator=torch.Generator().manual_seed(0))
    assert isinstance(y, torch.Tensor)
    weight = 0.05
    config = InversionConfig(lr=0.01, steps=1000, deviation=basis, deviation_weight=weight)  # type: ignore[arg-type]
    result = invert(ZeroGenerator(), y, op, config, z_init=torch.zeros(2, K, dtype=torch.float64))
    assert result.deviation is not None
    design = op.matrix(torch.float64)
    if basis == "dct":  # columns: A applied to each DCT basis image
        design = op(idct2(torch.eye(16, dtype=torch.float64).reshape(16, 1, 4, 4))).T
    lasso = Lasso(alpha=weight / 2, fit_intercept=False, tol=1e-12, max_iter=100_000)
    expected = torch.from_numpy(lasso.fit(design.numpy(), y.T.numpy()).coef_).reshape(2, 1, 4, 4)
    got = result.deviation if basis == "pixel" else dct2(result.deviation)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert int((got.abs() > 1e-9).sum()) == int((expected != 0).sum())  # the same support, exactly sparse
    torch.testing.assert_close(result.x_hat, result.deviation)  # x = G(z) + v with G = 0


def test_deviation_range_keeps_the_output_in_range(gen: TinyGenerator) -> None:
    x = _images(gen, _latents(2)).clone()
    x[:, 0, 0, 0] = 1.5  # the measurements pull one pixel above the range
    op = GaussianMatrix(12, (1, 4, 4), scaling="csgm", seed=1)
    y = measure(op, x)
    config = InversionConfig(lr=0.05, steps=200, deviation="pixel", deviation_weight=1e-4)
    free = invert(gen, y, op, config)
    boxed = invert(gen, y, op, config.replace(deviation_range=(0.0, 1.0)))
    assert float(free.x_hat.max()) > 1.1  # unconstrained, the fit leaves [0, 1]
    # v is clipped against G(z) of the previous step, so the output may move by the last z step's change.
    assert float(boxed.x_hat.min()) >= -1e-3 and float(boxed.x_hat.max()) <= 1 + 1e-3
    with pytest.raises(ValueError, match="deviation_range"):
        InversionConfig(deviation="dct", deviation_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="deviation_range"):
        InversionConfig(deviation="pixel", deviation_range=(1.0, 0.0))


def test_without_deviation_the_loop_is_plain_adam() -> None:
    # deviation=None: the deviation settings are inert and z follows torch.optim.Adam on the summed loss.
    gen64 = TinyGenerator(dtype=torch.float64)
    op = GaussianMatrix(6, (1, 4, 4), scaling="normalized", seed=2)
    y = measure(op, _images(gen64, _latents(3, dtype=torch.float64)))
    z0 = _latents(3, seed=9, dtype=torch.float64)
    config = InversionConfig(lr=0.03, steps=40, z_prior_weight=0.1)
    plain = invert(gen64, y, op, config, z_init=z0)
    inert = invert(gen64, y, op, config.replace(deviation_weight=0.5, deviation_range=(0.0, 1.0)), z_init=z0)
    assert plain.deviation is None and inert.deviation is None
    torch.testing.assert_close(inert.z, plain.z, atol=0, rtol=0)
    z = z0.clone().requires_grad_(True)
    adam = torch.optim.Adam([z], lr=0.03)
    for _ in range(40):
        adam.zero_grad()
        (op.loss(op(gen64(z)), y) + 0.1 * z.pow(2).sum(1)).sum().backward()
        adam.step()
    torch.testing.assert_close(plain.z, z.detach(), atol=1e-10, rtol=0)
