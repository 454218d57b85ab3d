"""Compressed sensing with your own measurement operator and a generative prior (CSGM).

The operator is defined here: a single-pixel camera that measures a 28x28 image through ``m`` random +-1 patterns
(``m = 100`` numbers for 784 pixels), with Gaussian noise. The library's one inversion core,
``invert(generator, y, operator, config)``, finds ``z`` with ``A(G(z)) ~ y`` for the zoo's digit generator
``mnist-gan``; the baseline is the minimum-norm least-squares image (pseudo-inverse), clipped to [0, 1].

Your own operator: subclass ``LinearOperator`` (a linear map, with its ``adjoint``) or ``MeasurementOperator``
(any differentiable map; override ``loss`` for a loss other than the mean squared error), pass the image shape
``(C, H, W)`` and the per-sample measurement shape to ``__init__``, and implement ``forward``.

Run: ``python examples/compressed_sensing_your_operator.py`` (35 s on one thread of a shared CPU) or ``--tiny``
(seconds). Measured once with the full settings (16 digits): per-pixel MSE 0.0143 for CSGM, 0.0792 for least squares.
"""

from __future__ import annotations

import argparse
import time

import torch

from manifold_defense import InversionConfig, invert, load_mnist, zoo
from manifold_defense.inversion import LinearOperator


class SinglePixelCamera(LinearOperator):
    """``(B, C, H, W) -> (B, m)``: ``m`` inner products with fixed random +-1 patterns (a single-pixel camera whose
    mirrors show a pattern and its complement; the difference of the two readings is one measurement)."""

    patterns: torch.Tensor

    def __init__(self, num_measurements: int, input_shape: tuple[int, int, int], seed: int = 0) -> None:
        super().__init__(input_shape, (num_measurements,))
        signs = torch.randint(
            0, 2, (num_measurements, *input_shape), generator=torch.Generator().manual_seed(seed)
        )
        self.register_buffer("patterns", (2 * signs - 1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.patterns.flatten(1).to(x.dtype).T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y @ self.patterns.flatten(1).to(y.dtype)).reshape(-1, *self.patterns.shape[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="a few images and steps: seconds (the tests run this)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n, steps, restarts = (4, 60, 2) if args.tiny else (16, 300, 5)
    start = time.perf_counter()

    x = load_mnist("test", limit=n).images  # (n, 1, 28, 28) in [0, 1]
    generator = zoo.load("mnist-gan")  # or your own: an nn.Module with an int latent_dim, z -> [0, 1] images
    A = SinglePixelCamera(100, tuple(x.shape[1:]))
    noise = 0.1 * torch.randn(n, A.num_measurements, generator=torch.Generator().manual_seed(0))
    y = A(x) + noise

    # CSGM: Adam on z from several random restarts, the best restart kept per image; a small z-prior term.
    config = InversionConfig(optimizer="adam", lr=0.03, steps=steps, restarts=restarts, z_prior_weight=0.01)
    result = invert(generator, y, A, config)

    # Baseline: the minimum-norm least-squares image A^+ y (A's dense matrix from the operator itself).
    x_ls = (torch.linalg.pinv(A.matrix(torch.float64)) @ y.double().T).T.reshape(x.shape).float().clamp(0, 1)

    def mse(x_hat: torch.Tensor) -> float:
        return float(((x_hat - x) ** 2).mean())

    print(f"{A.num_measurements} single-pixel measurements (noise 0.1) of {n} test digits, 784 pixels each")
    print(
        f"  per-pixel MSE, CSGM with mnist-gan ({steps} steps, {restarts} restarts): {mse(result.x_hat):.4f}"
    )
    print(f"  per-pixel MSE, least squares (pseudo-inverse, clipped):          {mse(x_ls):.4f}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
