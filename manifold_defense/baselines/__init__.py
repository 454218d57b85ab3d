"""Compressed-sensing baselines: Lasso in pixel/DCT/wavelet bases and Deep Image Prior (CS-DIP).

See :mod:`manifold_defense.baselines.lasso`, :mod:`manifold_defense.baselines.bases`,
:mod:`manifold_defense.baselines.dip` and :mod:`manifold_defense.baselines.dip_network`. These baselines take
plain matrices (Lasso) or any differentiable operator (DIP) and do not depend on the latent-optimization core.
"""

from manifold_defense.baselines.bases import BASES, Basis, analysis, make_basis, synthesis, synthesis_matrix
from manifold_defense.baselines.dip import (
    DIPConfig,
    DIPGenerator,
    DIPResult,
    LayerGaussianPrior,
    dip_recover,
    fit_learned_regularizer,
    init_dip_parameters,
)
from manifold_defense.baselines.lasso import (
    DEFAULT_ALPHAS,
    AlphaSelection,
    continuation_path,
    lasso_design,
    lasso_recover,
    select_alpha,
)

__all__ = [
    "BASES",
    "DEFAULT_ALPHAS",
    "AlphaSelection",
    "Basis",
    "DIPConfig",
    "DIPGenerator",
    "DIPResult",
    "LayerGaussianPrior",
    "analysis",
    "continuation_path",
    "dip_recover",
    "fit_learned_regularizer",
    "init_dip_parameters",
    "lasso_design",
    "lasso_recover",
    "make_basis",
    "select_alpha",
    "synthesis",
    "synthesis_matrix",
]
