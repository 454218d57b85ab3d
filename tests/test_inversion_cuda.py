"""The inversion core on a CUDA device (skipped without one): device handling and CPU/GPU agreement."""

from __future__ import annotations

import pytest
import torch
from test_inversion import TinyGenerator, _latents

from manifold_defense.inversion import GaussianMatrix, InversionConfig, invert, measure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_matches_cpu_and_is_batch_independent() -> None:
    cpu_gen = TinyGenerator(dtype=torch.float64)
    cuda_gen = TinyGenerator(dtype=torch.float64).cuda()
    with torch.no_grad():
        x = cpu_gen(_latents(6, dtype=torch.float64))
    op = GaussianMatrix(12, (1, 4, 4), scaling="normalized", dtype=torch.float64)
    y = measure(op, x)
    config = InversionConfig(
        lr=0.05, steps=200, restarts=4, prune_after=20, prune_keep=2, early_stop_tol=1e-12
    )
    seeds = list(range(6))
    on_cpu = invert(cpu_gen, y, op, config, seeds=seeds)
    on_cuda = invert(cuda_gen, y.cuda(), op.cuda(), config, seeds=seeds)
    assert on_cuda.x_hat.device.type == "cuda" and on_cuda.generator_evals.device.type == "cuda"
    torch.testing.assert_close(on_cuda.x_hat.cpu(), on_cpu.x_hat, rtol=1e-6, atol=1e-8)
    alone = invert(cuda_gen, y[3:4].cuda(), op, config, seeds=[3])
    torch.testing.assert_close(alone.z[0], on_cuda.z[3], rtol=1e-5, atol=1e-7)


def test_cuda_device_mismatch_is_reported() -> None:
    gen = TinyGenerator()
    with pytest.raises(ValueError, match="generator on y's device cuda:0"):
        invert(gen, torch.rand(2, 1, 4, 4, device="cuda"), config=InversionConfig(steps=1))
