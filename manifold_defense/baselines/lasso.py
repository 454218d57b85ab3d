"""Lasso compressed-sensing baselines in the pixel, DCT and wavelet bases.

Papers: Tibshirani 1996 (Lasso); as a compressed-sensing baseline in Bora et al. 2017 ("Compressed Sensing
using Generative Models", CSGM: pixel basis on MNIST, DCT and wavelet on CelebA) and Van Veen et al. 2018
(CS-DIP: DCT and db4 wavelet).

Purpose: recover images ``x`` from linear measurements ``y = A x + noise`` by solving, for each image,

    min_w  1/(2m) ||y - A Psi w||_2^2 + alpha ||w||_1,      x_hat = clip(Psi w, 0, 1)

with ``Psi`` an orthonormal synthesis basis (:mod:`manifold_defense.baselines.bases`) and scikit-learn's
coordinate descent (:class:`sklearn.linear_model.Lasso`, no intercept: the measurement model has none).
``A`` is a plain dense ``m x n`` numpy matrix with ``n = prod(image_shape)`` acting on C-order flattened
images; any ``m >= 1`` is accepted, including ``m > n`` (an over-determined, still l1-regularized,
least-squares problem).

Fair comparison with generative priors: choose ``alpha`` per basis and per ``m`` with :func:`select_alpha` on
VALIDATION images (held out from the test images; the function only ever receives the arrays it is given, so
the caller is responsible for passing validation data), then call :func:`lasso_recover` on the test
measurements.

Speed: the design matrix ``A Psi`` is formed once per call (one ``m x n x n`` product), all images of a batch
are fitted by one estimator (multi-target fit sharing the Fortran-ordered design), the solver reaches each
alpha along a warm-started continuation path (:func:`continuation_path`, shared with :func:`select_alpha` so
that all candidate alphas come out of one sweep), and ``n_jobs`` splits the images over threads.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

from manifold_defense.baselines.bases import make_basis, synthesis_matrix

__all__ = [
    "DEFAULT_ALPHAS",
    "AlphaSelection",
    "continuation_path",
    "lasso_design",
    "lasso_recover",
    "select_alpha",
]

DEFAULT_ALPHAS: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Default grid for :func:`select_alpha`. It spans CS-DIP's 1e-5 (DCT/wavelet) to CSGM's 0.1 (pixel) and
beyond; with an unscaled N(0, 1) matrix and MNIST-like images the best value is typically in [1e-4, 1]."""


@dataclass(frozen=True)
class AlphaSelection:
    """Result of :func:`select_alpha`.

    Attributes:
        alpha: the alpha with the lowest validation MSE (the larger alpha wins ties).
        alphas: the candidate alphas, in the order given.
        mse_per_alpha: mean per-pixel MSE of the clipped reconstructions of the validation images, one
            per alpha.
        basis: the basis the selection is for.
        num_measurements: ``m``, the number of rows of ``A`` the selection is for.
    """

    alpha: float
    alphas: tuple[float, ...]
    mse_per_alpha: tuple[float, ...]
    basis: str
    num_measurements: int


def _as_matrix(A: object) -> np.ndarray:
    if isinstance(A, (str, bytes)) or A is None:
        raise TypeError(f"expected A as a 2-D numeric array (m, n), got {type(A).__name__}")
    try:
        mat = np.asarray(A, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"expected A as a 2-D numeric array (m, n), got {type(A).__name__}") from exc
    if mat.ndim != 2 or 0 in mat.shape:
        raise ValueError(f"expected A of shape (m, n) with m, n >= 1, got shape {mat.shape}")
    if not np.all(np.isfinite(mat)):
        raise ValueError("expected a finite A, got NaN or inf entries")
    return mat


def _as_measurements(y: object, m: int, name: str) -> np.ndarray:
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"expected {name} as a numeric array of shape (B, {m}), got {type(y).__name__}"
        ) from exc
    if arr.ndim != 2 or arr.shape[1] != m or arr.shape[0] < 1:
        raise ValueError(
            f"expected {name} of shape (B, m) = (B, {m}) with B >= 1 to match A with m = {m} rows, "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"expected finite {name}, got NaN or inf entries")
    return arr


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"expected alpha as a positive float, got {type(alpha).__name__}")
    value = float(alpha)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected alpha > 0 (use least squares for alpha = 0), got {alpha!r}")
    return value


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"expected {name} a positive int, got {value!r}")
    return int(value)


def _check_tol(tol: object) -> float:
    if (
        isinstance(tol, bool)
        or not isinstance(tol, (int, float, np.floating))
        or not 0 < float(tol) < math.inf
    ):
        raise ValueError(f"expected tol a positive float, got {tol!r}")
    return float(tol)


def lasso_design(
    A: np.ndarray,
    image_shape: Sequence[int],
    basis: str = "dct",
    *,
    wavelet: str = "db4",
    level: int | None = None,
) -> np.ndarray:
    """The Lasso design matrix ``A @ Psi`` (m x n, float64, Fortran order, ready for scikit-learn).

    Args:
        A: measurement matrix (m, n) acting on C-order flattened images of ``image_shape``.
        image_shape: ``(H, W)`` or ``(C, H, W)`` with ``prod(image_shape) == n``.
        basis: ``"pixel"``, ``"dct"`` or ``"wavelet"``.
        wavelet, level: wavelet options, see :func:`manifold_defense.baselines.bases.make_basis`.
    """
    mat = _as_matrix(A)
    spec = make_basis(basis, image_shape, wavelet=wavelet, level=level)
    if mat.shape[1] != spec.size:
        raise ValueError(
            f"expected A with n = prod(image_shape) = {spec.size} columns for image_shape "
            f"{spec.image_shape}, "
            f"got A of shape {mat.shape}"
        )
    if spec.name == "pixel":
        return np.asfortranarray(mat)
    return np.asfortranarray(
        mat @ synthesis_matrix(basis, spec.image_shape, wavelet=wavelet, level=spec.level)
    )


#: Continuation grid: points per decade and decades above the target alpha (see :func:`continuation_path`).
_PATH_POINTS_PER_DECADE = 4
_PATH_DECADES = 2


def continuation_path(alphas: Sequence[float]) -> tuple[float, ...]:
    """The decreasing sequence of alphas that the solver visits (warm-started) to reach ``alphas``.

    It is the union of ``alphas`` and the data-independent grid ``10**(k/4)`` between ``min(alphas)`` and
    ``100 * max(alphas)``. Both :func:`lasso_recover` and :func:`select_alpha` use it, so the validation error
    of an alpha is measured with the same solver path as the test run; being data-independent, it keeps every
    image's fit independent of the other images in the batch.
    """
    lo, hi = min(alphas), max(alphas) * 10.0**_PATH_DECADES
    k_lo = math.ceil(math.log10(lo) * _PATH_POINTS_PER_DECADE - 1e-9)
    k_hi = math.floor(math.log10(hi) * _PATH_POINTS_PER_DECADE + 1e-9)
    grid = {10.0 ** (k / _PATH_POINTS_PER_DECADE) for k in range(k_lo, k_hi + 1)}
    merged = sorted(grid | {float(a) for a in alphas}, reverse=True)
    # Drop grid points within 1e-9 relative of a requested alpha (floating-point duplicates).
    out: list[float] = []
    for a in merged:
        if out and abs(out[-1] - a) <= 1e-9 * a:
            if a in alphas:
                out[-1] = a
            continue
        out.append(a)
    return tuple(out)


def _fit_coefficients(
    design: np.ndarray,
    targets: np.ndarray,
    alphas: Sequence[float],
    *,
    max_iter: int,
    tol: float,
    positive: bool,
    n_jobs: int,
) -> dict[float, np.ndarray]:
    """Coefficients (B, n) for each alpha of ``alphas``, keyed by alpha.

    The solver walks :func:`continuation_path` with warm starts. ``targets`` is (m, B). Images are split into
    ``n_jobs`` contiguous groups fitted in threads; scikit-learn fits each target separately, so grouping does
    not change any image's result.
    """
    num_targets = targets.shape[1]
    path = continuation_path(alphas)
    wanted = set(alphas)
    groups = [g for g in np.array_split(np.arange(num_targets), min(n_jobs, num_targets)) if g.size]

    def run(group: np.ndarray) -> tuple[dict[float, np.ndarray], int]:
        est = Lasso(
            alpha=path[0],
            fit_intercept=False,
            max_iter=max_iter,
            tol=tol,
            positive=positive,
            warm_start=True,
            copy_X=False,
        )
        out: dict[float, np.ndarray] = {}
        unconverged = 0
        y = targets[:, group] if group.size > 1 else targets[:, group[0]]
        for alpha in path:
            est.set_params(alpha=alpha)
            est.fit(design, y)
            if alpha in wanted:
                out[alpha] = np.atleast_2d(est.coef_).copy()
                unconverged += int(np.sum(np.atleast_1d(est.n_iter_) >= max_iter))
        return out, unconverged

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        if len(groups) == 1:
            results = [run(groups[0])]
        else:
            with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                results = list(pool.map(run, groups))
    unconverged = sum(r[1] for r in results)
    if unconverged:
        warnings.warn(
            f"Lasso did not converge within max_iter={max_iter} for {unconverged} of "
            f"{num_targets * len(wanted)} (image, alpha) fits; increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=3,
        )
    return {a: np.concatenate([r[0][a] for r in results], axis=0) for a in wanted}


def _to_images(
    coefficients: np.ndarray, image_shape: tuple[int, ...], basis: str, wavelet: str, level: int | None
) -> np.ndarray:
    spec = make_basis(basis, image_shape, wavelet=wavelet, level=level)
    x = spec.synthesis(coefficients.reshape(-1, *spec.image_shape))
    return np.clip(x, 0.0, 1.0)


def lasso_recover(
    A: np.ndarray,
    y: np.ndarray,
    image_shape: Sequence[int],
    basis: str = "dct",
    alpha: float = 0.1,
    *,
    max_iter: int = 1000,
    tol: float = 1e-4,
    positive: bool = False,
    wavelet: str = "db4",
    level: int | None = None,
    n_jobs: int = 1,
) -> np.ndarray:
    """Recover images from linear measurements with a Lasso in a sparsifying basis.

    Solves ``min_w 1/(2m) ||y_b - A Psi w||^2 + alpha ||w||_1`` for each row ``y_b`` of ``y`` and returns
    ``clip(Psi w, 0, 1)`` reshaped to images. Defaults follow CSGM (alpha 0.1, pixel basis on MNIST); pick
    alpha per basis and ``m`` with :func:`select_alpha` on validation images for a fair baseline.

    Args:
        A: measurement matrix, numpy (m, n) with ``n = prod(image_shape)``; any ``m >= 1`` (also ``m > n``).
        y: measurements (B, m), one row per image, ``y_b = A x_b.ravel() + noise``.
        image_shape: ``(H, W)`` or ``(C, H, W)``.
        basis: ``"pixel"``, ``"dct"`` or ``"wavelet"``.
        alpha: l1 weight (> 0), in scikit-learn's scaling (squared loss divided by ``2m``).
        max_iter, tol: coordinate-descent limits (scikit-learn's meaning). A single warning reports fits that
            hit ``max_iter``.
        positive: constrain coefficients to be >= 0 (sensible in the pixel basis for nonnegative images).
        wavelet, level: wavelet options (default db4, deepest orthonormal level).
        n_jobs: number of threads the images are split over.

    Returns:
        float64 array (B, *image_shape) in [0, 1].

    Raises:
        ValueError/TypeError: A not (m, n) or not matching ``image_shape``; y not (B, m); non-finite A or y;
            unknown basis; alpha <= 0.
    """
    design = lasso_design(A, image_shape, basis, wavelet=wavelet, level=level)
    targets = _as_measurements(y, design.shape[0], "y")
    value = _check_alpha(alpha)
    max_iter = _check_positive_int(max_iter, "max_iter")
    n_jobs = _check_positive_int(n_jobs, "n_jobs")
    shape = make_basis(basis, image_shape, wavelet=wavelet, level=level).image_shape
    tol = _check_tol(tol)
    coefs = _fit_coefficients(
        design,
        np.asfortranarray(targets.T),
        [value],
        max_iter=max_iter,
        tol=tol,
        positive=positive,
        n_jobs=n_jobs,
    )
    return _to_images(coefs[value], shape, basis, wavelet, level)


def select_alpha(
    A: np.ndarray,
    y_val: np.ndarray,
    x_val: np.ndarray,
    image_shape: Sequence[int],
    basis: str = "dct",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    max_iter: int = 1000,
    tol: float = 1e-4,
    positive: bool = False,
    wavelet: str = "db4",
    level: int | None = None,
    n_jobs: int = 1,
) -> AlphaSelection:
    """Choose the Lasso weight ``alpha`` for one basis and one ``A`` on validation images.

    Every candidate is fitted to ``y_val`` (alphas swept from large to small with warm starts) and scored by
    the mean per-pixel squared error of the clipped reconstruction against ``x_val``. Call it once per basis
    and per number of measurements ``m``, with the same ``A`` (or an ``A`` of the same distribution) and noise
    level as the test run.

    Data hygiene: pass VALIDATION images only (for example a held-out slice of the training set), never the
    test images the baseline will be scored on; this function sees nothing but its arguments.

    Args:
        A: measurement matrix (m, n).
        y_val: validation measurements (B, m).
        x_val: the validation images (B, *image_shape) or (B, n), values in [0, 1].
        image_shape: ``(H, W)`` or ``(C, H, W)``.
        basis: ``"pixel"``, ``"dct"`` or ``"wavelet"``.
        alphas: candidate alphas (> 0, at least one), default :data:`DEFAULT_ALPHAS`.
        max_iter, tol, positive, wavelet, level, n_jobs: as in :func:`lasso_recover`.

    Returns:
        :class:`AlphaSelection` with the best alpha and the validation MSE of every candidate.
    """
    design = lasso_design(A, image_shape, basis, wavelet=wavelet, level=level)
    m = design.shape[0]
    targets = _as_measurements(y_val, m, "y_val")
    spec = make_basis(basis, image_shape, wavelet=wavelet, level=level)
    try:
        truth = np.asarray(x_val, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"expected x_val as a numeric array, got {type(x_val).__name__}") from exc
    batch = targets.shape[0]
    if truth.shape not in ((batch, *spec.image_shape), (batch, spec.size)):
        raise ValueError(
            f"expected x_val of shape {(batch, *spec.image_shape)} or {(batch, spec.size)} to match y_val, "
            f"got {truth.shape}"
        )
    if not np.all(np.isfinite(truth)):
        raise ValueError("expected finite x_val, got NaN or inf entries")
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence) or len(alphas) == 0:
        raise ValueError(f"expected alphas as a non-empty sequence of positive floats, got {alphas!r}")
    candidates = tuple(_check_alpha(a) for a in alphas)
    max_iter = _check_positive_int(max_iter, "max_iter")
    n_jobs = _check_positive_int(n_jobs, "n_jobs")

    tol = _check_tol(tol)
    coefs = _fit_coefficients(
        design,
        np.asfortranarray(targets.T),
        candidates,
        max_iter=max_iter,
        tol=tol,
        positive=positive,
        n_jobs=n_jobs,
    )
    truth = truth.reshape(batch, -1)
    mse = []
    for a in candidates:
        x_hat = _to_images(
            coefs[a], spec.image_shape, basis, wavelet, spec.level if basis == "wavelet" else None
        )
        mse.append(float(np.mean((x_hat.reshape(batch, -1) - truth) ** 2)))
    # Lowest MSE; ties go to the larger alpha (the sparser, more conservative model).
    best = min(range(len(candidates)), key=lambda i: (mse[i], -candidates[i]))
    if len(candidates) > 1 and candidates[best] in (min(candidates), max(candidates)):
        warnings.warn(
            f"select_alpha: the best alpha {candidates[best]:g} ({basis}, m={m}) is at the edge of the grid "
            f"[{min(candidates):g}, {max(candidates):g}]; consider extending the grid",
            UserWarning,
            stacklevel=2,
        )
    return AlphaSelection(
        alpha=candidates[best],
        alphas=candidates,
        mse_per_alpha=tuple(mse),
        basis=basis,
        num_measurements=m,
    )
