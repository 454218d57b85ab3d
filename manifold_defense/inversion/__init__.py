"""The latent-optimization core: measurement operators, ``InversionConfig`` and ``invert``.

One z-optimization loop serves the projection defense (Defense-GAN), compressed sensing with generative priors
(CSGM), sparse-deviation recovery, non-linear and 1-bit measurements, and robust manifold training.
"""

from .config import InversionConfig
from .core import Inversion, invert
from .dct import dct2, dct_matrix, idct2
from .nonlinear import Mixture, Nonlinear, SignMeasurements
from .operators import (
    BlurDownsample,
    GaussianMatrix,
    Identity,
    LinearOperator,
    Mask,
    MeasurementOperator,
    Measurements,
    measure,
)

__all__ = [
    "BlurDownsample",
    "GaussianMatrix",
    "Identity",
    "Inversion",
    "InversionConfig",
    "LinearOperator",
    "Mask",
    "MeasurementOperator",
    "Measurements",
    "Mixture",
    "Nonlinear",
    "SignMeasurements",
    "dct2",
    "dct_matrix",
    "idct2",
    "invert",
    "measure",
]
