import pytest
import torch

from pixeldiffusion.diffusion import (
    gather,
    min_snr_weight,
    q_sample,
    target,
    training_loss,
    x0_eps_from_output,
)
from pixeldiffusion.schedule import alphas_cumprod_from_betas, linear_betas

ABAR = alphas_cumprod_from_betas(linear_betas(1000))


def test_q_sample_exact_and_in_distribution():
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    t = torch.full((200_000,), 300)
    abar = gather(ABAR, t, x0)
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_t = q_sample(x0, abar, eps)
    a = ABAR[300].item()
    torch.testing.assert_close(x_t, a**0.5 * 0.7 + (1 - a) ** 0.5 * eps)
    # DDPM eq. 4: mean sqrt(abar) x0, variance 1 - abar
    assert x_t.mean().item() == pytest.approx(a**0.5 * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.03)


def test_gather_shapes_and_dtype():
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    abar = gather(ABAR, torch.tensor([0, 10, 999]), like)
    assert abar.shape == (3, 1, 1, 1) and abar.dtype == torch.float32
    assert abar[1].item() == pytest.approx(ABAR[10].item())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_targets_round_trip_to_x0_and_eps(prediction):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(64, 3, 2, 2, dtype=torch.float64, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    abar = gather(ABAR, torch.randint(0, 1000, (64,), generator=g), x0)
    x_t = q_sample(x0, abar, eps)
    got_x0, got_eps = x0_eps_from_output(prediction, target(prediction, x0, eps, abar), x_t, abar)
    torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-9)


def test_v_is_the_velocity_of_the_paper():
    x0, eps, abar = torch.tensor(0.5), torch.tensor(-1.0), torch.tensor(0.36)
    # Salimans & Ho: v = alpha eps - sigma x0 with alpha = 0.6, sigma = 0.8
    assert target("v", x0, eps, abar).item() == pytest.approx(0.6 * -1.0 - 0.8 * 0.5)


def test_min_snr_weights_closed_form():
    abar = torch.tensor([0.99, 0.5, 0.01])
    snr = abar / (1 - abar)  # 99, 1, 1/99
    gamma = 5.0
    torch.testing.assert_close(min_snr_weight("eps", abar, gamma),
                               torch.minimum(snr, torch.tensor(gamma)) / snr)
    torch.testing.assert_close(min_snr_weight("x0", abar, gamma), torch.tensor([5.0, 1.0, 1 / 99]))
    torch.testing.assert_close(min_snr_weight("v", abar, gamma),
                               torch.tensor([5 / 100, 1 / 2, (1 / 99) / (1 / 99 + 1)]))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("min_snr_gamma", [0.0, 5.0])
def test_an_oracle_model_has_zero_loss(prediction, min_snr_gamma):
    """Data is one point c, so the exact answer is known from x_t and t alone."""
    c = torch.full((16, 1, 4, 4), 0.3, dtype=torch.float64)
    ac = ABAR

    def oracle(x_t, t):
        abar = gather(ac, t, x_t)
        eps = (x_t - abar.sqrt() * c) / (1 - abar).sqrt()
        return target(prediction, c, eps, abar)

    loss = training_loss(oracle, c, ac, prediction=prediction, min_snr_gamma=min_snr_gamma,
                         generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-12


def test_loss_is_the_mean_squared_error_of_the_target():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 1, 2, 2, generator=g)
    loss = training_loss(lambda x_t, t: torch.zeros_like(x_t), x0, ABAR, prediction="eps",
                         generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert loss.item() == pytest.approx(eps.square().mean().item(), rel=1e-6)
    l1 = training_loss(lambda x_t, t: torch.zeros_like(x_t), x0, ABAR, loss="l1",
                       generator=torch.Generator().manual_seed(4))
    assert l1.item() == pytest.approx(eps.abs().mean().item(), rel=1e-6)
