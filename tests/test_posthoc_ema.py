"""Post-hoc EMA (EDM2) against closed forms: sigma_rel <-> gamma, the power EMA's exact weights,
the profiles' inner product, and a profile reconstructed from two others' snapshots."""

import math

import pytest
import torch

from pixeldiffusion.posthoc_ema import (
    SIGMA_REL_MAX,
    PostHocEMA,
    PowerEMA,
    gamma_of_sigma_rel,
    power_beta,
    profile_inner_product,
    reconstruct,
    sigma_rel_of_gamma,
    snapshot_weights,
)

F64 = torch.float64


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.07, 0.10, 0.2, SIGMA_REL_MAX])
def test_gamma_and_sigma_rel_round_trip(sigma_rel):
    gamma = gamma_of_sigma_rel(sigma_rel)
    assert gamma >= 0
    assert sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-9)


def test_the_papers_two_profiles():
    """EDM2, Sec. 3.2: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94; gamma 0 is uniform."""
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_of_gamma(0.0) == pytest.approx(math.sqrt(1 / 12))
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            gamma_of_sigma_rel(bad)


def _one_hot_average(gamma, T):
    """Track theta_tau = e_tau (the tau-th basis vector): the average is the weight vector."""
    basis = torch.eye(T, dtype=F64)
    ema = PowerEMA({"w": basis[0]}, gamma)
    for t in range(1, T + 1):
        ema.update({"w": basis[t - 1]}, t)
    return ema.state["w"]


@pytest.mark.parametrize("gamma", [0.0, 2.5, gamma_of_sigma_rel(0.05)])
def test_power_ema_gives_the_integrated_power_profile_weights(gamma):
    T = 300
    tau = torch.arange(1, T + 1, dtype=F64)
    exact = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
    weights = _one_hot_average(gamma, T)
    torch.testing.assert_close(weights, exact, rtol=1e-9, atol=1e-15)
    assert weights.sum().item() == pytest.approx(1.0, rel=1e-12)
    assert power_beta(1, gamma) == 0.0


def test_power_ema_width_relative_to_t_is_sigma_rel():
    T = 4000
    weights = _one_hot_average(gamma_of_sigma_rel(0.10), T)
    u = torch.arange(1, T + 1, dtype=F64) / T
    mean = (weights * u).sum()
    std = ((weights * (u - mean) ** 2).sum()).sqrt().item()
    assert std == pytest.approx(0.10, rel=2e-3)


@pytest.mark.parametrize("t_a, gamma_a, t_b, gamma_b", [
    (100.0, 6.94, 100.0, 16.97), (40.0, 2.0, 100.0, 7.0), (100.0, 7.0, 40.0, 2.0),
    (1e6, 16.97, 3e5, 6.94)])
def test_profile_inner_product_is_the_integral(t_a, gamma_a, t_b, gamma_b):
    def profile(t, gamma, u):
        return torch.where(u <= t, (gamma + 1) * (u / t) ** gamma / t, torch.zeros_like(u))
    m = min(t_a, t_b)
    u = torch.linspace(0, m, 400_001, dtype=F64)
    numeric = torch.trapezoid(profile(t_a, gamma_a, u) * profile(t_b, gamma_b, u), u).item()
    closed = profile_inner_product(*(torch.tensor(v, dtype=F64)
                                     for v in (t_a, gamma_a, t_b, gamma_b))).item()
    assert closed == pytest.approx(numeric, rel=1e-6)


def test_a_stored_profile_is_reconstructed_from_itself():
    steps, gammas = [100, 200, 300, 100, 200, 300], [16.97] * 3 + [6.94] * 3
    weights = snapshot_weights(steps, gammas, 200, 6.94)
    torch.testing.assert_close(weights, torch.tensor([0, 0, 0, 0, 1.0, 0], dtype=F64),
                               atol=1e-6, rtol=0)


def _trajectory(T):
    """Parameters along a known path: a decay, an oscillation, a ramp and a random walk."""
    tau = torch.arange(1, T + 1, dtype=F64)
    walk = torch.randn(T, dtype=F64, generator=torch.Generator().manual_seed(0)).cumsum(0)
    return torch.stack([torch.exp(-tau / 300), torch.sin(tau / 150), (tau / T) ** 2,
                        walk / math.sqrt(T)], dim=1)


def test_a_profile_tracked_in_training_matches_its_post_hoc_reconstruction():
    """Track sigma_rel 0.05 and 0.10 with snapshots every 100 of 2000 steps, and 0.07 directly;
    the 0.07 average rebuilt from the snapshots matches, at the end and at an earlier step."""
    T, every = 2000, 100
    theta = _trajectory(T)
    tracker = PostHocEMA({"w": theta[0], "n": torch.tensor(0)}, sigma_rels=(0.05, 0.10),
                         every=every)
    direct = PowerEMA({"w": theta[0]}, gamma_of_sigma_rel(0.07))
    snapshots, at_1200 = [], None
    for t in range(1, T + 1):
        snapshots += tracker.update({"w": theta[t - 1], "n": torch.tensor(t)}, t)
        direct.update({"w": theta[t - 1]}, t)
        if t == 1200:
            at_1200 = direct.state["w"].clone()
    assert [s.step for s in snapshots] == [k * every for k in range(1, 21) for _ in range(2)]
    rebuilt = reconstruct(snapshots, 0.07)
    torch.testing.assert_close(rebuilt["w"], direct.state["w"], atol=2e-4, rtol=0)
    assert rebuilt["w"].dtype == F64 and rebuilt["n"].item() == T
    rebuilt_1200 = reconstruct([s for s in snapshots if s.step <= 1200], 0.07, step=1200)
    torch.testing.assert_close(rebuilt_1200["w"], at_1200, atol=2e-4, rtol=0)
    # the reconstruction is a real fit, not one of the stored averages
    assert (rebuilt["w"] - snapshots[-1].state["w"]).abs().max() > 1e-3


def test_snapshots_are_copies_in_the_tracked_dtype():
    state = {"w": torch.zeros(3), "count": torch.tensor(0)}
    tracker = PostHocEMA(state, every=2)
    assert tracker.update({"w": torch.ones(3), "count": torch.tensor(1)}, 1) == []
    snaps = tracker.update({"w": torch.full((3,), 3.0), "count": torch.tensor(2)}, 2)
    assert [round(s.sigma_rel, 6) for s in snaps] == [0.05, 0.1]
    first = snaps[0].state["w"].clone()
    tracker.update({"w": torch.full((3,), 9.0), "count": torch.tensor(3)}, 3)
    assert torch.equal(snaps[0].state["w"], first)  # not aliased to the running average
    assert snaps[0].state["w"].dtype == torch.float32 and snaps[0].state["count"].item() == 2
    assert state["w"].sum().item() == 0  # the caller's tensors are never written
    with pytest.raises(ValueError, match="at least one snapshot"):
        reconstruct([], 0.07)
    with pytest.raises(ValueError, match="every K >= 1"):
        PostHocEMA(state, every=0)
