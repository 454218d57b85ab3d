"""AmbientGAN: learn a generator from lossy measurements only (Bora, Price, Dimakis, ICLR 2018).

Threat / measurement model: the clean images ``x`` are never observed. Each training example is a measurement
``y = f_theta(x)`` with a random ``theta`` drawn independently per example (pixels dropped, a blur plus noise, a patch
removed or kept, a random projection). AmbientGAN puts the same random measurement between the generator and the
discriminator: the discriminator compares ``f_theta'(G(z))`` (a fresh ``theta'`` per sample and call) with the
measured data, so the generator is pushed towards a distribution whose *measurements* match; for these models the
measurement distribution determines the image distribution, so ``G`` can recover clean digits.

Measurement models (``nn.Module``; images ``(B, C, H, W)`` in, measurements out):

- :class:`BlockPixels`: each pixel dropped independently with probability ``p``, the kept ones rescaled by
  ``1 / (1 - p)`` (as in the authors' code), so measurements may exceed 1 (up to ``1 / (1 - p)``: 10 at p = 0.9).
  The discriminator sees them unclipped, real and generated alike.
- :class:`ConvolveNoise`: a 5x5 Gaussian blur (std 1 pixel, zero padding) plus i.i.d. Gaussian noise of std
  ``sigma``; values leave [0, 1] and are left so.
- :class:`BlockPatch` / :class:`KeepPatch`: a uniformly placed ``size x size`` patch (14 on MNIST) zeroed / kept
  (everything else zeroed).
- :class:`GaussianProjection`: the paper's projection on a random Gaussian vector that is part of the measurement,
  ``f_theta(x) = (theta, <theta, x>)`` with ``theta ~ N(0, I_n)`` fresh per sample; ``m`` such projections per
  sample give measurements ``(B, m, n + 1)`` (row ``i``: ``theta_i`` then ``<theta_i, x>``). It is in the paper,
  not their code; the discriminator is :class:`MeasurementDiscriminator` (an MLP on the flattened measurement).

Each model draws ``theta`` per sample from the ``torch.Generator`` passed to ``forward`` /
:meth:`~RandomMeasurement.measure` (its device decides where the draws happen: a CPU generator gives the same ``theta`` on CPU and CUDA), or
from the global torch RNG on the input's device when none is passed (what :func:`~manifold_defense.training.train_gan`
does: the training loop forks, seeds and checkpoints that RNG, so resume is exact). Results follow the input's device.
The inversion core's operators (:mod:`manifold_defense.inversion.operators`) hold one fixed ``A`` for a whole batch
(:class:`~manifold_defense.inversion.operators.Mask`, :class:`~manifold_defense.inversion.operators.GaussianMatrix`)
and their blur subsamples, so they do not fit a ``theta`` drawn per sample; these modules are separate.

Baselines of the paper (:func:`training_data`): ``"ignore"`` trains the same GAN on the measurements as if they were
clean images (:meth:`~RandomMeasurement.as_image`: block-pixels' rescale undone, values clipped to [0, 1]);
``"unmeasure"`` restores each measurement first (:meth:`~RandomMeasurement.unmeasure`): biharmonic inpainting of the
dropped pixels or patch (scikit-image ``inpaint_biharmonic``, about 20 ms per MNIST image; ``"normalized-convolution"``
is a vectorized cheaper alternative), Wiener deconvolution of blur + noise (scikit-image ``wiener``), the minimum-norm
solution for projections.

Example:
    >>> from manifold_defense import ambient, zoo
    >>> from manifold_defense.models import Critic
    >>> f = ambient.BlockPixels(0.9)
    >>> y = ambient.measure_dataset(train_images, f, seed=0)          # doctest: +SKIP
    >>> ambient.train_ambient(zoo.build("mnist-gan"), Critic(32), train_images, f)  # doctest: +SKIP
"""

from manifold_defense.ambient.measurements import (
    MEASUREMENTS,
    METHODS,
    BlockPatch,
    BlockPixels,
    ConvolveNoise,
    GaussianProjection,
    InpaintMethod,
    KeepPatch,
    Method,
    RandomMeasurement,
    build_measurement,
)
from manifold_defense.ambient.training import (
    MeasurementDiscriminator,
    measure_dataset,
    train_ambient,
    training_data,
)

__all__ = [
    "MEASUREMENTS",
    "METHODS",
    "BlockPatch",
    "BlockPixels",
    "ConvolveNoise",
    "GaussianProjection",
    "InpaintMethod",
    "KeepPatch",
    "MeasurementDiscriminator",
    "Method",
    "RandomMeasurement",
    "build_measurement",
    "measure_dataset",
    "train_ambient",
    "training_data",
]
