"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Alg. 2): a student learns to take in one DDIM step what its teacher takes in
two; then the student becomes the teacher and the steps halve again, from ``from_steps`` (say
64) down to ``to_steps`` (4, 2 or 1).

Everything is in EDM's coordinates (Karras et al. 2022): x = x0 + sigma eps, the VP point x_t
divided by sqrt(abar), sigma^2 = (1 - abar) / abar. There deterministic DDIM (Song et al. 2021,
eq. 12, eta 0) is the Euler step x' = D + (sigma' / sigma)(x - D), D the denoiser's x0. The
steps are the ``uniform`` (trailing) spacing of the model's own VP table, which is nested: the
N-step grid is every other point of the 2N-step one (``stage_sigmas``, checked). So the result
is an ordinary diffusion checkpoint that ``pixeldiffusion sample --sampler ddim --spacing
uniform --steps N`` samples exactly as it was trained (without x0 clipping: the student's x0 is
the point one step aims at, which may lie outside [-1, 1]).

- ``stage_sigmas(alphas_cumprod, steps)``: the steps + 1 noise levels DDIM visits, last 0.
- ``ddim_step(D, x, sigma, sigma_next)``, ``distillation_target``: Alg. 2's two teacher steps
  and the x0 whose single step lands where they do.
- ``ProgressiveDistiller``: the training loop's loss, which also moves from stage to stage
  (the student's EMA becomes the teacher, written to ``RUN/progressive/`` so that a resumed run
  finds it again).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import load_checkpoint, save_ema_weights
from .config import Config, ProgressiveConfig
from .consistency import FrozenTeacher, teacher_denoiser
from .errors import ConfigError
from .formulations import bridge_for
from .schedule import sampling_timesteps, sigma_of
from .train import Hook, TrainState, lr_factor

STAGE_DIR = "progressive"  # RUN/progressive/stage-K-teacher.safetensors

Denoiser = Callable[..., Tensor]


def stage_sigmas(alphas_cumprod: Tensor, steps: int) -> Tensor:
    """The noise levels DDIM with ``steps`` ``uniform`` steps visits, float64 [steps + 1]:
    sigma of each timestep of ``schedule.sampling_timesteps``, descending, then 0 (the data)."""
    t = sampling_timesteps(len(alphas_cumprod), steps, "uniform")
    sigmas = sigma_of(alphas_cumprod.double()[t])
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _nested(alphas_cumprod: Tensor, from_steps: int, to_steps: int) -> bool:
    """Whether each grid from ``from_steps`` down to ``to_steps`` is every other point of the
    one before."""
    grids = []
    steps = from_steps
    while steps >= to_steps:
        grids.append(stage_sigmas(alphas_cumprod, steps))
        steps //= 2
    pairs = zip(grids[:-1], grids[1:], strict=True)
    return all(torch.equal(fine[::2], coarse) for fine, coarse in pairs)


def check_nested(alphas_cumprod: Tensor, from_steps: int, to_steps: int) -> None:
    """Every stage's grid must be every other point of its teacher's (a ConfigError naming the
    largest from_steps that works otherwise), so that two teacher steps and one student step
    start and end at the same noise levels."""
    if _nested(alphas_cumprod, from_steps, to_steps):
        return
    works = [to_steps << m for m in range(1, 20) if to_steps << m <= len(alphas_cumprod)
             and _nested(alphas_cumprod, to_steps << m, to_steps)]
    fix = (f"the largest that works here is {works[-1]}" if works
           else "none works with this many diffusion.timesteps")
    raise ConfigError(f"progressive distillation cannot halve the {from_steps}-step DDIM grid of "
                      f"this model's {len(alphas_cumprod)} timesteps down to {to_steps} (a grid "
                      f"is not every other point of the one before); lower "
                      f"progressive.from_steps: {fix}")


def stage_count(p: ProgressiveConfig) -> int:
    """The stages of progressive distillation from p.from_steps to p.to_steps: log2 of the ratio
    (the config's rules make it a power of 2)."""
    return (p.from_steps // p.to_steps).bit_length() - 1


def stage_file(run_dir: str | Path, stage: int) -> Path:
    """Stage ``stage``'s teacher (0-based), which is also stage ``stage - 1``'s student."""
    return Path(run_dir) / STAGE_DIR / f"stage-{stage}-teacher.safetensors"


def student_file(run_dir: str | Path, p: ProgressiveConfig, steps: int) -> Path | None:
    """The file of the student that samples in ``steps`` DDIM steps, for steps between
    p.to_steps (exclusive: that one is the run's final checkpoint) and p.from_steps: the teacher
    file of the stage after the one that made it; None where no stage ended at ``steps`` or the
    file is not there (yet)."""
    stage = (p.from_steps // max(steps, 1)).bit_length() - 1
    if not 1 <= stage < stage_count(p) or p.from_steps != steps << stage:
        return None
    path = stage_file(run_dir, stage)
    return path if path.is_file() else None


def _per_image(s: Tensor) -> Tensor:
    return s.reshape(-1, 1, 1, 1)


def ddim_step(D: Denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor,
              y: Tensor | None = None) -> Tensor:
    """One deterministic DDIM step from noise level sigma [N] (> 0) to sigma_next [N] (>= 0):
    x' = D + (sigma_next / sigma)(x - D), D = D(x, sigma, y) (Song et al. 2021, eq. 12 in EDM's
    x = x_t / sqrt(abar)). x [N, C, H, W]; returns x' of the same shape."""
    x0 = D(x, sigma, y=y)
    return x0 + _per_image(sigma_next / sigma) * (x - x0)


def distillation_target(x: Tensor, sigma: Tensor, x_next: Tensor, sigma_next: Tensor) -> Tensor:
    """The x0 whose DDIM step from (x, sigma) lands on (x_next, sigma_next) (Salimans & Ho 2022,
    Alg. 2's x~ in EDM's coordinates): x~ = (x_next - (sigma_next / sigma) x) / (1 - sigma_next /
    sigma). x, x_next [N, C, H, W]; sigma [N] > sigma_next [N] >= 0."""
    ratio = _per_image(sigma_next / sigma)
    return (x_next - ratio * x) / (1 - ratio)


def truncated_snr_weight(sigma: Tensor) -> Tensor:
    """Salimans & Ho 2022's loss weight max(SNR, 1) on the x0 error, SNR = 1 / sigma^2: [N]."""
    return (1 / sigma.square()).clamp(min=1.0)


class ProgressiveDistiller:
    """The training loop's loss ``loss_fn(net, x0, generator=, y=)`` for ``cfg`` (a ``distill
    --method pd`` config), and the keeper of its stages.

    Stage k (k = 0 .. m - 1, m = log2(from_steps / to_steps)) covers optimizer steps
    [k L, (k + 1) L), L = progressive.stage_steps or train.steps // m (the last stage runs on
    to train.steps); its student learns from_steps / 2^(k+1) steps from a teacher taking twice
    as many. The teacher of stage 0 is ``progressive.teacher``'s EMA weights; at the first step
    of stage k >= 1 the student's EMA becomes the teacher and the student's own weights restart
    from it (Alg. 2: eta <- theta, theta starts at eta), and that teacher is written to
    RUN/progressive/stage-K-teacher.safetensors, which a run resumed inside stage k loads.
    ``lr_factor`` is the loop's learning-rate schedule (progressive.stage_lr).

    Call: net the student UNet as its formulation calls it, x0 [B, C, H, W] in [-1, 1], y int64
    [B] or None. Each image draws one of the stage's student steps i uniformly and eps ~ N(0, I)
    from ``generator``; returns the mean over the batch of max(SNR, 1) times the mean squared
    error between the student's x0 at (x, sigma_i) and ``distillation_target``, a 0-dim tensor.
    """

    def __init__(self, cfg: Config) -> None:
        p = cfg.progressive
        self.cfg, self.bridge = cfg, bridge_for(cfg.diffusion)
        check_nested(self.bridge.alphas_cumprod, p.from_steps, p.to_steps)
        self.stages = stage_count(p)
        self.stage_length = p.stage_steps or max(1, cfg.train.steps // self.stages)
        self.teacher = FrozenTeacher(p.teacher)  # its net takes each stage's teacher weights
        self.state: TrainState | None = None
        self.stage = 0
        self.grid = self._teacher_grid(0)
        self.student: tuple[Denoiser, Denoiser] | None = None  # (net, its denoiser), built once

    def stage_of(self, step: int) -> int:
        """The stage optimizer step ``step`` (0-based) belongs to."""
        return min(step // self.stage_length, self.stages - 1)

    def lr_factor(self, step: int) -> float:
        """train.lr's multiplier at optimizer step ``step`` (0-based), the training loop's
        ``lr_schedule``. ``progressive.stage_lr`` run (the default): ``train.lr_factor`` with
        train.lr_schedule over the whole run. linear: (end - step) / (end - start) within the
        stage [start, end), so each student's learning rate falls from train.lr towards 0 by
        its stage's last step and restarts with the next student (Salimans & Ho 2022's code,
        google-research/diffusion_distillation: learning_rate_anneal_type linear over each
        stage's steps), after the run's linear warm-up over train.warmup_steps."""
        tc = self.cfg.train
        if self.cfg.progressive.stage_lr == "run":
            return lr_factor(step, tc.warmup_steps, tc.lr_schedule, tc.steps)
        stage = self.stage_of(step)
        start = stage * self.stage_length
        end = tc.steps if stage == self.stages - 1 else start + self.stage_length
        warm_up = (step + 1) / tc.warmup_steps if step < tc.warmup_steps else 1.0
        return warm_up * max(end - step, 1) / max(end - start, 1)

    def teacher_steps(self, stage: int) -> int:
        """The teacher's DDIM steps in ``stage``; the student learns half as many."""
        return self.cfg.progressive.from_steps >> stage

    def _teacher_grid(self, stage: int) -> Tensor:
        return stage_sigmas(self.bridge.alphas_cumprod, self.teacher_steps(stage)).float()

    def setup(self, state: TrainState) -> None:
        """Hook setup: remember the run's state (its EMA and step). A fresh run's weights come
        from the teacher through ``distill.start_from_teacher``, as ECT's do."""
        self.state = state
        p = self.cfg.progressive
        lr = "annealed linearly within each stage" if p.stage_lr == "linear" else \
            f"train.lr_schedule {self.cfg.train.lr_schedule} over the run"
        state.log(f"progressive distillation: {self.stages} stages of {self.stage_length} steps, "
                  f"{p.from_steps} -> {p.to_steps} DDIM steps; learning rate {lr}")

    def hook(self) -> Hook:
        return Hook(0, setup=self.setup)

    def _enter(self, stage: int) -> None:
        """Make ``stage``'s teacher current: at its first step from the student's EMA (saved),
        inside it (a resumed run) from the file its first step wrote."""
        state = self.state
        assert state is not None, "ProgressiveDistiller.setup must run before the first step"
        path = stage_file(state.run_dir, stage)
        if state.step == stage * self.stage_length:
            weights = {k: v.detach().clone() for k, v in state.ema.state_dict().items()}
            with torch.no_grad():
                state.accelerator.unwrap_model(state.model).load_state_dict(weights)
            if state.main:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_ema_weights(path, weights, state.cfg, state.step,
                                 note=f"ema.* = the teacher of progressive distillation's stage "
                                      f"{stage} ({self.teacher_steps(stage)} DDIM steps)")
        elif path.is_file():
            weights = load_checkpoint(path, device=state.device).model.state_dict()
        else:
            raise ConfigError(f"this run resumes inside progressive distillation's stage "
                              f"{stage}, but its teacher {path} is missing; restore it, or "
                              f"resume from the checkpoint at step {stage * self.stage_length}")
        self.teacher.net.load_state_dict(weights)
        self.stage, self.grid = stage, self._teacher_grid(stage)
        state.log(f"progressive distillation: stage {stage + 1} of {self.stages}, "
                  f"{self.teacher_steps(stage)} -> {self.teacher_steps(stage) // 2} steps")

    def __call__(self, net: Denoiser, x0: Tensor, *, generator: torch.Generator | None = None,
                 y: Tensor | None = None) -> Tensor:
        step = self.state.step if self.state is not None else 0
        if self.stage_of(step) != self.stage:
            self._enter(self.stage_of(step))
        if self.grid.device != x0.device or self.grid.dtype != x0.dtype:
            self.grid = self.grid.to(x0.device, x0.dtype)  # once per stage, not every step
        grid = self.grid
        n = x0.shape[0]
        i = torch.randint(0, (len(grid) - 1) // 2, (n,), generator=generator, device=x0.device)
        sigma, sigma_mid, sigma_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = x0 + _per_image(sigma) * eps
        with torch.no_grad():  # Alg. 2: two DDIM steps of the teacher
            x_mid = ddim_step(self.teacher, x, sigma, sigma_mid, y)
            x_next = ddim_step(self.teacher, x_mid, sigma_mid, sigma_next, y)
            target = distillation_target(x, sigma, x_next, sigma_next)
        if self.student is None or self.student[0] is not net:
            self.student = (net, teacher_denoiser(net, self.bridge))
        student = self.student[1](x, sigma, y=y)
        error = (student - target).square().flatten(1).mean(1)
        return (truncated_snr_weight(sigma) * error).mean()
