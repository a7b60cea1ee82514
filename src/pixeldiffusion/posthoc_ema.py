"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, Sec. 3 and App. C): choose the EMA length after training.

The power-function EMA averages the parameters theta_1 .. theta_t of steps 1..t with weights
proportional to tau^gamma (EDM2 eq. 3). Its update is

    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

and the weight it gives theta_tau is exactly (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1),
the integral over (tau-1, tau] of the profile p_{t,gamma}(u) = (gamma+1) u^gamma / t^(gamma+1) on
[0, t]. Its relative width sigma_rel (std of u/t under the profile) is

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))            (EDM2 eq. 4).

Training keeps two such averages (``PostHocEMA``, sigma_rel 0.05 and 0.10 by default) and stores
both every K steps (``Snapshot``). Any other profile (t_r, gamma_r) is then approximated by a
linear combination of the stored snapshots, least squares in the profiles' L2 inner product, which
is closed form for power functions (EDM2 App. C.2, Alg. 3): ``snapshot_weights``, and
``reconstruct`` applies the weights to state dicts.

Everything here is tensors and state dicts in, state dicts out; writing snapshots to disk and the
command that reconstructs one belong to the checkpoint and CLI layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]
SIGMA_REL_MAX = math.sqrt(1 / 12)  # gamma = 0, uniform weights: the widest profile we allow


def sigma_rel_of_gamma(gamma: float) -> float:
    """EDM2 eq. 4: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), gamma >= 0."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma >= 0 of the profile of relative width ``sigma_rel`` in (0, sqrt(1/12)]:
    eq. 4 multiplied out, gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with
    s = sigma_rel^-2; its largest real root (EDM2 App. C.1)."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}] (sqrt(1/12), the "
                         f"uniform average); got {sigma_rel}")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(0.0, roots[np.abs(roots.imag) < 1e-9].real.max()))


def power_beta(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) for the update after optimizer step t >= 1 (EDM2 eq. 3,
    App. C.1); beta_1 = 0, so the average starts at theta_1."""
    return (1 - 1 / step) ** (gamma + 1)


def profile_inner_product(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_a, p_b> = integral of p_{t_a,gamma_a}(u) p_{t_b,gamma_b}(u) du for the power profiles
    p_{t,gamma}(u) = (gamma+1) u^gamma / t^(gamma+1) on [0, t] (EDM2 App. C.2). With m = min(t_a,
    t_b) it is (ga+1)(gb+1) m^(ga+gb+1) / ((ga+gb+1) t_a^(ga+1) t_b^(gb+1)); written with the
    ratio of the two t (m / max(t_a, t_b))^(gamma of the longer one) so large t and gamma do not
    overflow. Broadcasting float64 tensors in, their broadcast shape out."""
    a_first = t_a <= t_b
    ratio = torch.where(a_first, t_a / t_b, t_b / t_a)
    exponent = torch.where(a_first, gamma_b, gamma_a)
    t_max = torch.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max) * ratio**exponent


def snapshot_weights(steps: Sequence[int], gammas: Sequence[float], step: int,
                     gamma: float) -> Tensor:
    """Weights x [n] with sum_i x_i p_{steps[i], gammas[i]} the least-squares fit of the profile
    p_{step, gamma} (EDM2 Alg. 3): the normal equations A x = b with A_ij = <p_i, p_j> and
    b_i = <p_i, p_target>, solved by an SVD least squares (the Gram matrix of many close
    snapshots is nearly singular). float64 [n]."""
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    A = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_product(t, g, torch.tensor(float(step), dtype=torch.float64),
                              torch.tensor(gamma, dtype=torch.float64))
    return torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One power-function average as stored during training: after optimizer step ``step``,
    profile exponent ``gamma``, the averaged parameters ``state``."""

    step: int
    gamma: float
    state: dict[str, Tensor]

    @property
    def sigma_rel(self) -> float:
        return sigma_rel_of_gamma(self.gamma)


def _clone(state: StateDict) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in state.items()}


class PowerEMA:
    """One power-function EMA of a state dict (EDM2 eq. 3). Floating-point entries are averaged
    (in their own dtype); others (integer buffers) follow the latest value."""

    def __init__(self, state: StateDict, gamma: float):
        self.gamma = float(gamma)
        self.state = _clone(state)

    def update(self, state: StateDict, step: int) -> None:
        """Fold in the parameters after optimizer step ``step`` (1, 2, ...): one fused foreach
        lerp over the floating-point entries, on their device, without a host sync."""
        beta = power_beta(step, self.gamma)
        averages, values = [], []
        with torch.no_grad():
            for name, average in self.state.items():
                value = state[name].detach()
                if average.is_floating_point():
                    averages.append(average)
                    values.append(value.to(average.dtype))
                else:
                    average.copy_(value)
            if averages:
                torch._foreach_lerp_(averages, values, 1 - beta)  # beta avg + (1-beta) value


class PostHocEMA:
    """The averages that post-hoc EMA needs: one ``PowerEMA`` per ``sigma_rels`` entry, each
    snapshotted every ``every`` steps.

        tracker = PostHocEMA(model.state_dict())
        for step in range(1, steps + 1):
            ...optimizer.step()
            for snapshot in tracker.update(model.state_dict(), step):
                ...store snapshot (step, gamma, state)
    """

    def __init__(self, state: StateDict, sigma_rels: Sequence[float] = (0.05, 0.10),
                 every: int = 1000):
        if every < 1:
            raise ValueError(f"snapshots are taken every K >= 1 steps; got every={every}")
        self.every = every
        self.averages = [PowerEMA(state, gamma_of_sigma_rel(s)) for s in sigma_rels]

    def update(self, state: StateDict, step: int) -> list[Snapshot]:
        """Update every average with the parameters after step ``step``; at multiples of
        ``every``, return a snapshot of each (copies), else []."""
        for average in self.averages:
            average.update(state, step)
        return [] if step % self.every else self.snapshots(step)

    def snapshots(self, step: int) -> list[Snapshot]:
        """A copy of each average as it is now, labelled with ``step``."""
        return [Snapshot(step, average.gamma, _clone(average.state)) for average in self.averages]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue exactly: each average's gamma and state."""
        return {"gammas": [average.gamma for average in self.averages],
                "averages": [dict(average.state) for average in self.averages]}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Copy ``state_dict()``'s averages back in place (onto this tracker's devices); a
        ValueError if its profiles are not this tracker's."""
        gammas = [float(g) for g in saved["gammas"]]
        if not _same_profiles(gammas, [average.gamma for average in self.averages]):
            widths = ", ".join(f"{sigma_rel_of_gamma(g):.3g}" for g in gammas)
            raise ValueError(f"the saved post-hoc EMA tracks sigma_rel {widths}")
        with torch.no_grad():
            for average, saved_state in zip(self.averages, saved["averages"], strict=True):
                for name, value in average.state.items():
                    value.copy_(saved_state[name])


def _same_profiles(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9)
                                    for x, y in zip(a, b, strict=False))


def fit_error(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float) -> float:
    """How far the least-squares fit of ``snapshot_weights`` is from the wanted profile:
    ||sum_i x_i p_i - p|| / ||p|| in the profiles' L2 norm, from the same inner products
    (||.||^2 = <p, p> - 2 x.b + x.A x). 0 = exact; it grows where the snapshots are too few or
    too far from the wanted width."""
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    target_t = torch.tensor(float(step), dtype=torch.float64)
    target_g = torch.tensor(gamma, dtype=torch.float64)
    A = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_product(t, g, target_t, target_g)
    norm2 = profile_inner_product(target_t, target_g, target_t, target_g)
    x = snapshot_weights(steps, gammas, step, gamma)
    residual2 = norm2 - 2 * x @ b + x @ A @ x
    return float(residual2.clamp(min=0).sqrt() / norm2.sqrt())


def weighted_sum(weights: Sequence[float], states: Iterable[StateDict]) -> dict[str, Tensor]:
    """sum_i weights[i] states[i] entry by entry, summed in float64 and returned in each entry's
    own dtype; non-float entries come from the last state. ``states`` may be a generator, so
    only one state (plus the float64 sums) needs to be in memory at a time."""
    sums: dict[str, Tensor] = {}
    last: StateDict = {}
    count = 0
    for weight, state in zip(weights, states, strict=True):
        for name, value in state.items():
            if value.is_floating_point():
                term = float(weight) * value.double()
                sums[name] = term if name not in sums else sums[name].add_(term)
        last, count = state, count + 1
    if not count:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    return {name: sums[name].to(value.dtype) if value.is_floating_point() else value.clone()
            for name, value in last.items()}


def reconstruct(snapshots: Iterable[Snapshot], sigma_rel: float,
                step: int | None = None) -> dict[str, Tensor]:
    """The power-function EMA of relative width ``sigma_rel`` at ``step`` (default: the latest
    snapshot's), as a state dict: sum_i x_i snapshot_i.state with ``snapshot_weights``. Sums in
    float64 and returns each entry in its snapshot dtype; non-float entries come from the latest
    snapshot."""
    snapshots = sorted(snapshots, key=lambda s: s.step)
    if not snapshots:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    step = snapshots[-1].step if step is None else step
    weights = snapshot_weights([s.step for s in snapshots], [s.gamma for s in snapshots], step,
                               gamma_of_sigma_rel(sigma_rel))
    return weighted_sum(weights.tolist(), (s.state for s in snapshots))
