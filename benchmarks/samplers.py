"""Sampler accuracy at a small number of model calls (NFE), against diffusers, on analytic data.

The data is a Gaussian mixture, so the exact eps(x_t, t) is closed-form and no training noise
enters. For NFE in {5, 10, 20, 50} the script measures
  (a) ODE error: RMS distance of a deterministic sampler's x_0 to the 1000-step DDIM solution
      from the same x_T (probability-flow ODE, every integer timestep 999..0), and
  (b) SW2: sliced Wasserstein-2 distance (128 random directions) of the samples to fresh true
      samples of the mixture (its floor is the finite-sample distance, printed as "data").
Every diffusers scheduler runs with the same betas (linear 1e-4..0.02, T = 1000), the same
model and the same x_T; NFE is counted, not assumed (Heun: 2 steps - 1, so the largest NFE not
above the target is used and printed). Rows with ``spacing=optimal`` first fit their timesteps
to the model (optimal_steps.py: 200 + 5 x NFE calls on 32 calibration noise samples drawn with
another seed than the benchmark's x_T, once per model and budget); those calls are a one-off
cost and are not in the NFE columns.

    pip install -e ".[bench]"
    python benchmarks/samplers.py                 # about 10 minutes on a busy 2-core CPU
    python benchmarks/samplers.py --nfe 10 --n 256 --no-diffusers
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from pixeldiffusion.optimal_steps import calibrated_timesteps
from pixeldiffusion.samplers import make_denoiser, nfe_of, sample
from pixeldiffusion.schedule import alphas_cumprod_at, alphas_cumprod_from_betas, linear_betas

T = 1000
ABAR = alphas_cumprod_from_betas(linear_betas(T))


class Mixture:
    """K isotropic Gaussians in d dimensions: means ~ U[-0.7, 0.7]^d, stds ~ U[0.05, 0.25],
    weights ~ U[0.5, 1.5] normalised (seeded). Exact E[x0 | x_t] from Bayes' rule."""

    def __init__(self, dim: int = 16, components: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.means = (torch.rand(components, dim, generator=g, dtype=torch.float64) - 0.5) * 1.4
        self.stds = 0.05 + 0.2 * torch.rand(components, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        self.log_weights = (weights / weights.sum()).log()
        self.dim = dim

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The exact noise prediction E[eps | x_t] at timestep t (long or float [N])."""
        abar = alphas_cumprod_at(ABAR, t.detach().double().cpu().reshape(-1)[:1]).item()
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        var = alpha**2 * self.stds**2 + sigma**2                            # [K]
        diff = x_t[:, None, :] - alpha * self.means[None]                    # [N, K, d]
        log_p = self.log_weights - 0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * var.log()
        resp = log_p.softmax(dim=1)                                          # [N, K]
        x0_k = self.means[None] + (alpha * self.stds**2 / var)[None, :, None] * diff
        x0 = (resp[..., None] * x0_k).sum(1)
        return (x_t - alpha * x0) / sigma


def sliced_w2(a: Tensor, b: Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between two equal-size point clouds [N, d] (Rabin et al. 2011)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=0)
    pa, pb = (a @ directions).sort(0).values, (b @ directions).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def counted(model: Callable[[Tensor, Tensor], Tensor]) -> tuple[Callable, list[int]]:
    calls = [0]

    def wrapped(x_t: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        return model(x_t, t)
    return wrapped, calls


OURS: list[tuple[str, dict]] = [
    ("ddim", {"spacing": "uniform"}),
    ("euler", {"spacing": "karras"}),
    ("heun", {"spacing": "karras"}),
    ("dpmpp_2m", {"spacing": "logsnr"}),
    ("dpmpp_2m", {"spacing": "karras"}),
    ("dpmpp_3m", {"spacing": "logsnr"}),
    ("unipc", {"spacing": "logsnr", "order": 2}),
    ("unipc", {"spacing": "logsnr", "order": 3, "variant": "bh1"}),
    ("unipc", {"spacing": "logsnr", "order": 3}),
    ("unipc", {"spacing": "karras", "order": 3}),
    ("unipc", {"spacing": "linspace", "order": 3}),
    # fitted to the model (optimal_steps.py) on 32 calibration samples, not the benchmark's x_T
    ("ddim", {"spacing": "optimal"}),
    ("dpmpp_3m", {"spacing": "optimal"}),
    ("unipc", {"spacing": "optimal", "order": 2}),
    ("unipc", {"spacing": "optimal", "order": 3}),
]
OURS_STOCHASTIC: list[tuple[str, dict]] = [
    ("ddpm", {"spacing": "uniform"}),
    ("euler_ancestral", {"spacing": "karras"}),
    ("dpmpp_2m_sde", {"spacing": "logsnr"}),
]


def run_ours(mixture: Mixture, x_T: Tensor, name: str, options: dict, nfe: int,
             seed: int) -> tuple[Tensor, int]:
    steps = (nfe + 1) // 2 if name == "heun" else nfe
    if options.get("spacing") == "optimal":  # fitted first; its calls are not counted as NFE
        options = dict(options)
        denoise = make_denoiser(mixture.eps, ABAR, clip_x0=False)
        solver_options = {k: v for k, v in options.items() if k != "spacing"}
        options["spacing"] = calibrated_timesteps(denoise, x_T, ABAR, steps, sampler=name,
                                                  options=solver_options, seed=123)
    model, calls = counted(mixture.eps)
    x0 = sample(model, x_T, ABAR, sampler=name, steps=steps, clip_x0=False,
                generator=torch.Generator().manual_seed(seed), **options)
    assert calls[0] == nfe_of(name, steps), (name, calls[0])
    return x0, calls[0]


def diffusers_schedulers() -> list[tuple[str, Callable[[], object]]]:
    import diffusers as d

    betas = {"num_train_timesteps": T, "beta_start": 1e-4, "beta_end": 0.02,
             "beta_schedule": "linear"}
    return [
        ("DDIM (leading)", lambda: d.DDIMScheduler(**betas, clip_sample=False)),
        ("DDIM (trailing)", lambda: d.DDIMScheduler(**betas, clip_sample=False,
                                                    timestep_spacing="trailing")),
        ("DPMSolverMultistep 2M", lambda: d.DPMSolverMultistepScheduler(**betas)),
        ("DPMSolverMultistep 2M karras", lambda: d.DPMSolverMultistepScheduler(
            **betas, use_karras_sigmas=True)),
        ("DPMSolverMultistep 3M", lambda: d.DPMSolverMultistepScheduler(**betas, solver_order=3)),
        ("DPMSolverMultistep 3M karras", lambda: d.DPMSolverMultistepScheduler(
            **betas, solver_order=3, use_karras_sigmas=True)),
        ("DPMSolverMultistep 2M lu_lambdas", lambda: d.DPMSolverMultistepScheduler(
            **betas, use_lu_lambdas=True)),
        ("DPMSolverMultistep 3M lu_lambdas", lambda: d.DPMSolverMultistepScheduler(
            **betas, solver_order=3, use_lu_lambdas=True)),
        ("UniPCMultistep bh2 p2", lambda: d.UniPCMultistepScheduler(**betas)),
        ("UniPCMultistep bh2 p2 karras", lambda: d.UniPCMultistepScheduler(
            **betas, use_karras_sigmas=True)),
        ("UniPCMultistep bh2 p3", lambda: d.UniPCMultistepScheduler(**betas, solver_order=3)),
        ("UniPCMultistep bh1 p3", lambda: d.UniPCMultistepScheduler(
            **betas, solver_order=3, solver_type="bh1")),
        ("UniPCMultistep bh2 p3 karras", lambda: d.UniPCMultistepScheduler(
            **betas, solver_order=3, use_karras_sigmas=True)),
        ("UniPCMultistep bh2 p3 exponential", lambda: d.UniPCMultistepScheduler(
            **betas, solver_order=3, use_exponential_sigmas=True)),
        ("UniPCMultistep bh1 p3 exponential", lambda: d.UniPCMultistepScheduler(
            **betas, solver_order=3, solver_type="bh1", use_exponential_sigmas=True)),
        ("Euler", lambda: d.EulerDiscreteScheduler(**betas)),
        ("Euler karras", lambda: d.EulerDiscreteScheduler(**betas, use_karras_sigmas=True)),
        ("Heun", lambda: d.HeunDiscreteScheduler(**betas)),
        ("Heun karras", lambda: d.HeunDiscreteScheduler(**betas, use_karras_sigmas=True)),
    ]


def run_diffusers(mixture: Mixture, x_T: Tensor, make: Callable[[], object],
                  nfe: int) -> tuple[Tensor, int]:
    """The standard diffusers loop; for Heun the most steps whose NFE is at most ``nfe``."""
    scheduler = make()
    steps = nfe
    while True:
        scheduler.set_timesteps(steps)
        if len(scheduler.timesteps) <= nfe:
            break
        steps -= 1
    model, calls = counted(mixture.eps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t.reshape(1).expand(len(x)))
        x = scheduler.step(eps, t, x).prev_sample
    return x, calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--n", type=int, default=500, help="samples (rows of x_T)")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args()
    mixture = Mixture(args.dim, args.components)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64)
    data = mixture.sample(args.n, torch.Generator().manual_seed(2))
    start = time.perf_counter()
    reference = sample(mixture.eps, x_T, ABAR, sampler="ddim", steps=T, spacing="uniform",
                       clip_x0=False)
    floor = sliced_w2(mixture.sample(args.n, torch.Generator().manual_seed(3)), data)
    print(f"# Gaussian mixture: {args.components} components in {args.dim} dims, "
          f"{args.n} samples; linear betas 1e-4..0.02, T = {T}")
    print(f"# SW2 of the 1000-step DDIM reference: {sliced_w2(reference, data):.4f}; "
          f"of a second set of true samples (floor): {floor:.4f}")
    rows: list[tuple[str, list[str]]] = []
    ours = [(f"{n} {' '.join(f'{k}={v}' for k, v in o.items())}", n, o, True) for n, o in OURS]
    ours += [(f"{n} {' '.join(f'{k}={v}' for k, v in o.items())}", n, o, False)
             for n, o in OURS_STOCHASTIC]
    for label, name, options, deterministic in ours:
        cells = []
        for nfe in args.nfe:
            x0, used = run_ours(mixture, x_T, name, options, nfe, seed=4)
            ode = ((x0 - reference) ** 2).mean().sqrt().item() if deterministic else math.nan
            cells.append(f"{ode:.4f} / {sliced_w2(x0, data):.4f}"
                         + ("" if used == nfe else f" ({used})"))
        rows.append((f"pixeldiffusion {label}", cells))
    if not args.no_diffusers:
        for label, make in diffusers_schedulers():
            cells = []
            for nfe in args.nfe:
                x0, used = run_diffusers(mixture, x_T, make, nfe)
                ode = ((x0 - reference) ** 2).mean().sqrt().item()
                cells.append(f"{ode:.4f} / {sliced_w2(x0, data):.4f}"
                             + ("" if used == nfe else f" ({used})"))
            rows.append((f"diffusers {label}", cells))
    print("# cells: ODE error (RMS to 1000-step DDIM) / SW2 to data; (k) = NFE used when it "
          "differs; stochastic samplers have no ODE error (nan)")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |")
    print("|---|" + "---|" * len(args.nfe))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"# {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
