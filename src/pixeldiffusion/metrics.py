"""Sample-quality metrics over any feature matrix: Fréchet distance, KID, precision/recall, IS.

Everything here works on features, not images: ``features`` is a float array [N, D] from some
extractor (Inception-v3 pool features, or the digit classifier's penultimate layer, see
``digit_classifier.py``); which extractor made them is the caller's business and is recorded by
``evaluate.py``. The math runs in float64 with numpy.

- ``frechet_distance``: Heusel et al. 2017 (FID), eq. 6, with a symmetric matrix square root.
- ``kid``: Bińkowski et al. 2018 (KID), the unbiased MMD^2 estimator (Gretton et al. 2012,
  Lemma 6) with the cubic polynomial kernel, averaged over random subsets.
- ``precision_recall``: Kynkäänniemi et al. 2019, k-NN manifold estimate (Sec. 3, eq. 1-2).
- ``inception_score``: Salimans et al. 2016, exp(E_x KL(p(y|x) || p(y))) over splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

FloatArray = np.ndarray


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. The metrics' matrices are small (a few hundred
    to a few thousand rows): when every core is busy, torch's thread pool waits on them far
    longer than one thread takes to compute them, and one thread costs little when the cores
    are idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set: mu float64 [D], sigma float64 [D, D], n samples."""

    mu: FloatArray
    sigma: FloatArray
    n: int

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def as_float64(features: np.ndarray | torch.Tensor) -> FloatArray:
    """A [N, D] feature matrix (numpy or torch, any float type) as a float64 numpy array."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be a matrix [N, D]; got shape {features.shape}")
    return features


def gaussian_stats(features: np.ndarray | torch.Tensor) -> GaussianStats:
    """Sample mean and unbiased sample covariance (divisor N - 1) of features [N, D], N >= 2."""
    x = as_float64(features)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance; got {x.shape[0]}")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return GaussianStats(mu, sigma, x.shape[0])


def min_samples_for_fid(dim: int) -> int:
    """Fewest samples whose covariance can be full rank in ``dim`` dimensions: dim + 1."""
    return dim + 1


def sqrtm_psd(matrix: FloatArray) -> FloatArray:
    """Square root of a symmetric positive semi-definite matrix [D, D] via its eigendecomposition.

    Round-off can leave eigenvalues slightly below zero; they are clipped to 0, so the result is
    real and symmetric (unlike ``scipy.linalg.sqrtm`` of a non-symmetric product).
    """
    sym = (matrix + matrix.T) / 2
    eigvals, eigvecs = np.linalg.eigh(sym)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: FloatArray, sigma2: FloatArray) -> float:
    """Tr((sigma1 sigma2)^(1/2)) for symmetric PSD sigma1, sigma2, computed stably as
    Tr((sigma1^(1/2) sigma2 sigma1^(1/2))^(1/2)): the inner matrix is symmetric PSD and has the
    same eigenvalues as sigma1 sigma2, so only a symmetric eigensolver is needed."""
    root1 = sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def frechet_distance(stats1: GaussianStats, stats2: GaussianStats) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6;
    Dowson & Landau 1982):

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Returns d^2 (what papers report as FID), clipped at 0 against round-off.
    """
    if stats1.mu.shape != stats2.mu.shape or stats1.sigma.shape != stats2.sigma.shape:
        raise ValueError(f"feature dimensions differ: {stats1.dim} vs {stats2.dim}")
    diff = stats1.mu - stats2.mu
    value = diff @ diff + np.trace(stats1.sigma) + np.trace(stats2.sigma) \
        - 2.0 * trace_sqrt_product(stats1.sigma, stats2.sigma)
    return max(float(value), 0.0)


def frechet_distance_infinity(features: np.ndarray | torch.Tensor, reference: GaussianStats, *,
                              points: int = 15, smallest: float = 0.2, seed: int = 0) -> float:
    """FID_inf (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to
    find them", Sec. 3): the Fréchet distance of N samples overshoots the true distance by a
    bias that falls like 1/N, so fit

        FID_N = FID_inf + k / N

    by least squares over ``points`` subset sizes N linearly spaced from ``smallest`` * n to n
    (random subsets of ``features`` [n, D] without replacement, drawn with ``seed``; the last is
    all n) and return the intercept. Scores from different n become comparable, and a ratio of
    two no longer shrinks towards 1 as the bias of small n swamps both. It is an extrapolation:
    two samples of one distribution give about 0, possibly a little below.

    Needs a full-rank covariance in the smallest subset: ``smallest`` * n >= 2 (D + 1)
    (``min_samples_for_infinity``); a ValueError otherwise.
    """
    x = as_float64(features)
    n, dim = x.shape
    if n < min_samples_for_infinity(dim, smallest) or points < 2:
        raise ValueError(f"FID_inf of {dim}-d features needs at least "
                         f"{min_samples_for_infinity(dim, smallest)} samples and 2 points; got "
                         f"{n} samples and {points} points")
    rng = np.random.default_rng(seed)
    sizes = np.unique(np.linspace(smallest * n, n, points).round().astype(int))
    fids = [frechet_distance(gaussian_stats(x[rng.choice(n, size, replace=False)]), reference)
            for size in sizes]
    design = np.stack([np.ones(len(sizes)), 1.0 / sizes], axis=1)
    intercept, _ = np.linalg.lstsq(design, np.asarray(fids), rcond=None)[0]
    return float(intercept)


def min_samples_for_infinity(dim: int, smallest: float = 0.2) -> int:
    """Fewest samples for ``frechet_distance_infinity`` in ``dim`` dimensions: its smallest
    subset (``smallest`` of them) must hold 2 (dim + 1), twice what a full-rank covariance needs."""
    return int(np.ceil(2 * min_samples_for_fid(dim) / smallest))


def polynomial_kernel(x: FloatArray | torch.Tensor, y: FloatArray | torch.Tensor, *,
                      degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> FloatArray | torch.Tensor:
    """k(x, y) = (gamma x.y + coef0)^degree for rows of x [M, D] and y [N, D] -> [M, N];
    gamma defaults to 1/D (KID's kernel, Bińkowski et al. 2018, Sec. 3)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(k_xx: FloatArray, k_yy: FloatArray, k_xy: FloatArray) -> float:
    """The unbiased estimator of MMD^2 (Gretton et al. 2012, Lemma 6) from kernel matrices
    k_xx [M, M], k_yy [N, N], k_xy [M, N] of two independent samples:

        1/(M(M-1)) sum_{i!=j} k(x_i, x_j) + 1/(N(N-1)) sum_{i!=j} k(y_i, y_j)
        - 2/(MN) sum_{i,j} k(x_i, y_j).

    Its expectation is exactly MMD^2, so it can be negative when the distributions agree.
    """
    m, n = k_xx.shape[0], k_yy.shape[0]
    if m < 2 or n < 2:
        raise ValueError("the unbiased MMD estimator needs at least 2 samples on each side")
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


@single_thread()
def kid(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor, *,
        subsets: int = 100, subset_size: int = 1000, degree: int = 3, gamma: float | None = None,
        coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD^2 with the kernel
    (x.y/D + 1)^3, averaged over ``subsets`` random subsets of ``subset_size`` rows of each side
    (drawn without replacement; the size shrinks to the smaller set if needed).
    Returns (mean, standard deviation over subsets)."""
    x, y = as_float64(features1), as_float64(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    size = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        xs = x[rng.choice(x.shape[0], size, replace=False)]
        ys = y[rng.choice(y.shape[0], size, replace=False)]
        # one kernel matrix of [xs; ys] holds k_xx, k_xy and k_yy (one matmul, not three)
        both = torch.from_numpy(np.concatenate([xs, ys]))
        k = polynomial_kernel(both, both, degree=degree, gamma=gamma, coef0=coef0).numpy()
        values[s] = mmd2_unbiased(k[:size, :size], k[size:, size:], k[:size, size:])
    return float(values.mean()), float(values.std())


@single_thread()
def knn_radii(features: np.ndarray | torch.Tensor, k: int = 3, batch: int = 4096) -> np.ndarray:
    """Distance from each row of features [N, D] to its k-th nearest other row: float64 [N]
    (the ball radii of Kynkäänniemi et al. 2019, eq. 1; reusable for a fixed reference set)."""
    x = torch.from_numpy(as_float64(features))
    radii = [torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values for chunk in x.split(batch)]
    return torch.cat(radii).numpy()


def _inside_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                     batch: int) -> torch.Tensor:
    """For each row of query [M, D]: is it within radii[j] of some support row j? -> bool [M]."""
    return torch.cat([(torch.cdist(chunk, support) <= radii).any(dim=1)
                      for chunk in query.split(batch)])


@single_thread()
def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, *,
                     k: int = 3, batch: int = 4096,
                     real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-2).

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision = share of fake points inside the
    real manifold; recall = share of real points inside the fake manifold. Both in [0, 1].
    ``real_radii``: ``knn_radii(real, k)`` when already known (a fixed reference set).
    """
    r = torch.from_numpy(as_float64(real))
    f = torch.from_numpy(as_float64(fake))
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    if min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples on each side")
    if real_radii is None:
        real_radii = knn_radii(r, k, batch)
    precision = _inside_manifold(f, r, torch.from_numpy(real_radii), batch)
    recall = _inside_manifold(r, f, torch.from_numpy(knn_radii(f, k, batch)), batch)
    return float(precision.double().mean()), float(recall.double().mean())


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016, Sec. 4): exp(E_x KL(p(y|x) || p(y))) on each of
    ``splits`` consecutive chunks of logits [N, K], p(y) being the chunk's mean prediction.
    Returns (mean, standard deviation over chunks); 1 <= IS <= K."""
    z = torch.from_numpy(as_float64(logits))
    splits = max(1, min(splits, z.shape[0]))
    scores = []
    for chunk in z.tensor_split(splits):
        log_p = chunk.log_softmax(dim=1)
        log_marginal = log_p.exp().mean(dim=0).log()
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def class_entropy(predicted: np.ndarray | torch.Tensor, num_classes: int) -> float:
    """Entropy (nats) of the histogram of predicted classes [N]; log(num_classes) = balanced."""
    counts = np.bincount(np.asarray(predicted, dtype=np.int64).ravel(), minlength=num_classes)
    p = counts[counts > 0] / counts.sum()
    return max(0.0, float(-(p * np.log(p)).sum()))  # max: never print -0
