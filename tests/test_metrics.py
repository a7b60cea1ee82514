"""metrics.py against closed forms, hand-computed cases and (where it imports) torch-fidelity."""

import math

import numpy as np
import pytest
import torch

from pixeldiffusion import metrics


def _random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1) * np.eye(d)


def test_frechet_distance_diagonal_gaussians_closed_form():
    # diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = metrics.frechet_distance(metrics.GaussianStats(mu1, np.diag(s1), 10),
                                   metrics.GaussianStats(mu2, np.diag(s2), 10))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(7.25 + 4.0 + 1.0)


def test_frechet_distance_non_commuting_2x2_closed_form():
    # for a 2x2 matrix M with non-negative eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M))
    rng = np.random.default_rng(0)
    for _ in range(20):
        s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        product = s1 @ s2
        tr_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        got = metrics.frechet_distance(metrics.GaussianStats(mu1, s1, 3),
                                       metrics.GaussianStats(mu2, s2, 3))
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_frechet_distance_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(1)
    d = 4
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    population = metrics.frechet_distance(metrics.GaussianStats(mu1, s1, 0),
                                          metrics.GaussianStats(mu2, s2, 0))
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    sampled = metrics.frechet_distance(metrics.gaussian_stats(x), metrics.gaussian_stats(y))
    assert sampled == pytest.approx(population, rel=0.02)


def test_frechet_distance_is_zero_for_equal_stats_and_finite_when_rank_deficient():
    rng = np.random.default_rng(2)
    sigma = _random_spd(rng, 64, rank=5)  # singular, as from fewer samples than dimensions
    stats = metrics.GaussianStats(rng.normal(size=64), sigma, 6)
    assert metrics.frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-8)
    few = metrics.gaussian_stats(rng.normal(size=(10, 64)))  # rank 9 covariance
    many = metrics.gaussian_stats(rng.normal(size=(5000, 64)))
    value = metrics.frechet_distance(few, many)
    assert np.isfinite(value) and value > 0


def test_fid_infinity_removes_the_small_sample_bias():
    """Chong & Forsyth 2020: against a known population, FID of n samples overshoots the true
    distance by about tr-terms / n; the 1/N extrapolation lands near the true value (0 for the
    same distribution, the closed form for two Gaussians) from a few hundred samples, where plain
    FID is several times too high."""
    rng = np.random.default_rng(3)
    d = 32
    sigma = _random_spd(rng, d)
    population = metrics.GaussianStats(np.zeros(d), sigma, 0)
    same = rng.multivariate_normal(np.zeros(d), sigma, size=800)
    biased = metrics.frechet_distance(metrics.gaussian_stats(same), population)
    assert biased > 0.1
    assert abs(metrics.frechet_distance_infinity(same, population)) < biased / 5
    shifted_mu = np.full(d, 0.1)  # true distance ||0.1||^2 d = 0.32
    other = rng.multivariate_normal(shifted_mu, sigma, size=800)
    true = metrics.frechet_distance(metrics.GaussianStats(shifted_mu, sigma, 0), population)
    assert true == pytest.approx(0.32, rel=1e-6)
    plain = metrics.frechet_distance(metrics.gaussian_stats(other), population)
    extrapolated = metrics.frechet_distance_infinity(other, population)
    assert abs(extrapolated - true) < abs(plain - true) / 3
    # deterministic given the seed; too few samples for the smallest subset is a ValueError
    assert extrapolated == metrics.frechet_distance_infinity(other, population)
    assert metrics.min_samples_for_infinity(d) == 330
    with pytest.raises(ValueError, match="needs at least 330 samples"):
        metrics.frechet_distance_infinity(other[:300], population)


def test_gaussian_stats_matches_numpy_cov_in_float64():
    x = torch.randn(50, 3, dtype=torch.float32)
    stats = metrics.gaussian_stats(x)
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)
    assert metrics.min_samples_for_fid(64) == 65


def test_mmd2_unbiased_hand_computed_case():
    # 1-D points, linear kernel k(x, y) = x y: X = {1, 2}, Y = {0, 3}
    x, y = np.array([[1.0], [2.0]]), np.array([[0.0], [3.0]])
    kernel = {"degree": 1, "gamma": 1.0, "coef0": 0.0}
    got = metrics.mmd2_unbiased(metrics.polynomial_kernel(x, x, **kernel),
                                metrics.polynomial_kernel(y, y, **kernel),
                                metrics.polynomial_kernel(x, y, **kernel))
    # off-diagonal XX: 2 * (1*2) / 2 = 2; YY: 2 * (0*3) / 2 = 0; XY: (0 + 3 + 0 + 6) / 4 = 2.25
    assert got == pytest.approx(2 + 0 - 2 * 2.25)


def test_kid_cubic_kernel_hand_computed_case():
    # the cubic KID kernel (x.y/d + 1)^3 in d = 1 on X = {0, 1}, Y = {1, 2}
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    k = lambda a, b: (a * b + 1.0) ** 3  # noqa: E731
    expected = (2 * k(0, 1)) / 2 + (2 * k(1, 2)) / 2 \
        - 2 * (k(0, 1) + k(0, 2) + k(1, 1) + k(1, 2)) / 4
    mean, std = metrics.kid(x, y, subsets=3, subset_size=2)
    assert mean == pytest.approx(expected) and std == pytest.approx(0.0)
    assert expected == pytest.approx(1 + 27 - (1 + 1 + 8 + 27) / 2)


def test_kid_unbiased_in_expectation():
    # linear kernel: E[unbiased MMD^2] = |mu_P - mu_Q|^2 exactly; the biased V-statistic would
    # add (tr Sigma_P / m + tr Sigma_Q / n), here 2 * 8 / 20 = 0.8
    rng = np.random.default_rng(3)
    delta = np.full(8, 0.25)  # |delta|^2 = 0.5
    kernel = {"degree": 1, "gamma": 1.0, "coef0": 0.0}
    estimates = []
    for _ in range(4000):
        x = rng.normal(size=(20, 8))
        y = rng.normal(size=(20, 8)) + delta
        estimates.append(metrics.mmd2_unbiased(metrics.polynomial_kernel(x, x, **kernel),
                                               metrics.polynomial_kernel(y, y, **kernel),
                                               metrics.polynomial_kernel(x, y, **kernel)))
    assert np.mean(estimates) == pytest.approx(0.5, abs=0.03)
    same = metrics.kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), subsets=50,
                       subset_size=100)[0]
    assert abs(same) < 0.01  # same distribution: unbiased, so about zero (may be negative)


def test_precision_recall_known_configuration():
    real = np.arange(5.0)[:, None]  # 0..4, k=1 radii are all 1
    fake = np.array([[0.5], [10.0], [20.0]])  # one inside the real manifold, two far away
    precision, recall = metrics.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(1 / 3)
    # fake radii (k=1): 9.5, 10, 10 -> every real point lies within 9.5 of 0.5
    assert recall == pytest.approx(1.0)
    far = metrics.precision_recall(real, fake + 100, k=1)
    assert far == (0.0, 0.0)
    same = np.random.default_rng(4).normal(size=(200, 3))
    assert metrics.precision_recall(same, same) == (1.0, 1.0)


def test_inception_score_extremes():
    k = 10
    confident = torch.full((100, k), -30.0)
    confident[torch.arange(100), torch.arange(100) % k] = 30.0
    mean, _ = metrics.inception_score(confident, splits=1)
    assert mean == pytest.approx(k, rel=1e-6)  # sharp and balanced: IS = number of classes
    one_class = torch.zeros(100, k)
    one_class[:, 3] = 30.0
    assert metrics.inception_score(one_class, splits=2)[0] == pytest.approx(1.0, abs=1e-6)
    assert metrics.class_entropy(np.arange(100) % k, k) == pytest.approx(math.log(k))
    assert metrics.class_entropy(np.zeros(7, dtype=int), k) == 0.0


def test_agrees_with_torch_fidelity_statistics_to_metric():
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(5)
    a = torch.from_numpy(rng.normal(size=(400, 16)))
    b = torch.from_numpy(rng.normal(size=(400, 16)) * 1.3 + 0.2)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a),
                                      fid_features_to_statistics(b), False)
    ours = metrics.frechet_distance(metrics.gaussian_stats(a), metrics.gaussian_stats(b))
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    kid_theirs = kid_features_to_metric(a, b, kid_subsets=1, kid_subset_size=400,
                                        kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=0,
                                        verbose=False, kid_kernel="poly",
                                        kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                        kid_kernel_poly_coef0=1)
    kid_ours, _ = metrics.kid(a, b, subsets=1, subset_size=400)  # full sets: no randomness
    assert kid_ours == pytest.approx(kid_theirs["kernel_inception_distance_mean"], rel=1e-6)
    prc = prc_features_to_metric(b.float(), a.float(), prc_neighborhood=3, prc_batch_size=1000,
                                 save_cpu_ram=False, verbose=False)
    assert metrics.precision_recall(a, b) == pytest.approx((prc["precision"], prc["recall"]))
    isc = isc_features_to_metric(a, splits=1, shuffle=False)
    assert metrics.inception_score(a, splits=1)[0] == \
        pytest.approx(isc["inception_score_mean"], rel=1e-9)
