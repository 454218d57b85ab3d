"""A denoising diffusion prior (DDPM) for images in [0, 1]: the forward process, the training loss, and samplers.

Paper: Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models" (NeurIPS 2020): the forward process
``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with a linear beta schedule from 1e-4 to 0.02 over
``T = 1000`` steps, a network trained to predict the noise; Song, Meng, Ermon, "Denoising Diffusion Implicit Models"
(ICLR 2021) for sampling with fewer steps (``eta = 0``: deterministic given the starting noise; ``eta = 1``: as
random as DDPM's ancestral sampler).

Images are in [0, 1] at the interface and in [-1, 1] inside (``x = 2 * image - 1``). A :class:`DiffusionModel` is an
``nn.Module`` holding the noise network and the schedule's buffers; :func:`ddim_reverse` runs the reverse process
from any time ``t`` to 0 (sampling starts at ``t = T - 1`` from pure noise; diffusion purification starts at a
chosen ``t*`` from a noised input: :mod:`manifold_defense.diffpure`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from manifold_defense.models.unet import UNet

__all__ = ["DiffusionModel", "ddim_reverse", "ddim_timesteps", "sample"]


class DiffusionModel(nn.Module):
    """A noise-prediction network with its diffusion schedule (DDPM, linear betas).

    Args:
        network: ``eps(x_t, t)``, ``(B, C, H, W), (B,) -> (B, C, H, W)``; default: a :class:`UNet` for
            ``image_shape`` with ``channels`` and ``blocks``.
        timesteps: ``T``, the number of diffusion steps.
        beta_start, beta_end: the linear beta schedule's ends.

    Attributes:
        image_shape: ``(C, H, W)`` of the images it models.
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        channels: tuple[int, int, int] = (32, 64, 128),
        blocks: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
            raise ValueError(f"expected an int number of diffusion timesteps >= 2, got {timesteps!r}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"expected 0 < beta_start < beta_end < 1, got {beta_start!r} and {beta_end!r}")
        self.network = network if network is not None else UNet(image_shape[0], tuple(channels), blocks)  # type: ignore[arg-type]
        self.timesteps = timesteps
        self.image_shape = tuple(image_shape)
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.alpha_bar: Tensor
        self.register_buffer("alpha_bar", abar.float(), persistent=False)
        self.beta_start, self.beta_end = beta_start, beta_end

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted noise of ``x_t`` (in [-1, 1] scale) at integer timesteps ``t`` ``(B,)``."""
        return self.network(x_t, t)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.eps(x_t, t)

    def noised(self, images: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) (2 images - 1) + sqrt(1 - abar_t) noise``: ``images`` in [0, 1], ``t`` ``(B,)``."""
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        return a.sqrt() * (2.0 * images - 1.0) + (1.0 - a).sqrt() * noise

    def loss(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """DDPM's simple loss: mean squared error of the predicted noise at uniform random timesteps.

        Args:
            images: ``(B, C, H, W)`` in [0, 1].
            generator: the random source of timesteps and noise (``None``: the global one).
        """
        b = images.shape[0]
        t = torch.randint(0, self.timesteps, (b,), device=images.device, generator=generator)
        noise = torch.randn(images.shape, device=images.device, generator=generator)
        return (self.eps(self.noised(images, t, noise), t) - noise).pow(2).mean()


def ddim_timesteps(start: int, steps: int) -> list[int]:
    """The ``steps`` decreasing integer timesteps a reverse process of ``steps`` network passes visits.

    Evenly spaced from ``start`` to 0, both included (one step: ``[start]``, predicting the clean image at once);
    never more than ``start + 1`` steps. After the last one the process returns its prediction of the clean image.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"expected a positive int number of reverse steps, got {steps!r}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"expected a non-negative int start timestep, got {start!r}")
    steps = min(steps, start + 1)
    ts = torch.linspace(start, 0, steps).round().long().tolist() if steps > 1 else [start]
    return sorted(set(ts), reverse=True)


def ddim_reverse(
    model: DiffusionModel,
    x_t: Tensor,
    start: int,
    steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    shared_noise: bool = False,
    grad_checkpoint: bool = False,
) -> Tensor:
    """Run the reverse process from ``x_t`` at timestep ``start`` to a clean image in [0, 1] (DDIM update).

    Args:
        model: the diffusion prior.
        x_t: ``(B, C, H, W)`` in [-1, 1] scale, distributed as ``q(x_start | x_0)``.
        start: its integer timestep (``T - 1`` to sample from pure noise).
        steps: number of reverse steps (network passes), evenly spaced from ``start`` to 0.
        eta: DDIM's noise scale (0: deterministic; 1: DDPM-like ancestral noise).
        generator: random source of the ancestral noise when ``eta > 0``.
        shared_noise: one ancestral noise image for the whole batch (a fixed-noise purifier: each image's result
            then does not depend on its position in the batch).
        grad_checkpoint: recompute each network pass in the backward pass (memory bounded by one step's
            activations when differentiating through the whole reverse process).

    Returns:
        ``(B, C, H, W)`` images clamped to [0, 1]. Differentiable with respect to ``x_t`` (and so to the input of a
        purification) when autograd is on.
    """
    x = x_t
    ts = ddim_timesteps(start, steps)
    abar = model.alpha_bar
    for i, t in enumerate(ts):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if grad_checkpoint and torch.is_grad_enabled():
            eps = checkpoint(model.eps, x, t_batch, use_reentrant=False)
        else:
            eps = model.eps(x, t_batch)
        a_t = abar[t]
        x0 = ((x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1.0, 1.0)
        if i + 1 == len(ts):
            x = x0
            break
        a_prev = abar[ts[i + 1]]
        sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).clamp(min=0.0).sqrt()
        direction = (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt() * eps
        x = a_prev.sqrt() * x0 + direction
        if eta > 0:
            shape = (1, *x.shape[1:]) if shared_noise else x.shape
            x = x + sigma * torch.randn(shape, device=x.device, generator=generator).expand_as(x)
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def sample(
    model: DiffusionModel,
    n: int,
    *,
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 250,
    device: str | torch.device | None = None,
) -> Tensor:
    """``n`` samples ``(n, C, H, W)`` in [0, 1] by DDIM with ``steps`` network passes each, seeded.

    Args:
        model: the diffusion prior (eval mode is set for the call and restored).
        n: number of samples; steps: reverse steps; eta: DDIM noise scale; seed: seeds the noise.
        batch_size: samples per network batch; device: where to run (default: the model's device).
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"expected a positive int number of samples, got {n!r}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, n, batch_size):
            b = min(batch_size, n - lo)
            x = torch.randn((b, *model.image_shape), device=dev, generator=gen)
            out.append(ddim_reverse(model, x, model.timesteps - 1, steps, eta=eta, generator=gen).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
