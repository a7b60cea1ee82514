"""``pixeldiffusion distill``: tune a trained diffusion checkpoint of any formulation into a
consistency model with Easy Consistency Tuning (Geng et al. 2024; ``--method ect``) or with
consistency distillation on ECT's schedule (Song et al. 2023; ``--method cd``: each pair's second
point is the frozen teacher's ODE step from the first; docs/consistency.md).

The student is the teacher's own UNet (same architecture, its EMA weights as the start), seen as
EDM's raw network through the teacher's VP bridge (``consistency.EDMRawNetwork``) and wrapped in
the consistency parameterisation with f(x, sigma_min) = x (``consistency.student_function``).
Training is ``train.train``'s loop unchanged (checkpoints, exact resume, Ctrl-C, NaN handling,
progress bar, sample grids), handed ``DistillLoss`` and two hooks: one starts a fresh run from
the teacher's weights, one tells the loss the optimizer step (ECT's r(t) schedule depends on it).

The run's config is the teacher's with a ``consistency`` section (method ect, the teacher's
path, sigma_min / sigma_max / sigma_data and the ECT knobs) and ``sample.sampler consistency``,
so every checkpoint it writes says what it is and ``generate`` samples it with
``consistency.consistency_sample``.

``--method pd`` is progressive distillation (Salimans & Ho 2022; progressive.py): the same loop
and the same start from the teacher, with ``progressive.ProgressiveDistiller`` as the loss and
keeper of the stages. Its config keeps the teacher's diffusion model and adds a ``progressive``
section (the teacher's path, from_steps, to_steps, stage_steps) and DDIM sampling on the uniform
grid in to_steps steps without x0 clipping: the result is a diffusion checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import load_checkpoint, load_state_checked
from .config import CONSISTENCY_SAMPLER, Config, DiffusionConfig, apply_overrides, from_dict
from .config import parse_overrides as _parse_overrides
from .consistency import SIGMA_MAX, ECTLoss, EDMRawNetwork, FrozenTeacher, highest_sigma
from .errors import PixelDiffusionError
from .formulations import bridge_for
from .progressive import ProgressiveDistiller
from .train import Hook, TrainResult, TrainState, _log

METHODS = ("ect", "cd", "pd")
ECT_LR = 1e-4  # locuslab/ect run_ecm.sh (RAdam there; the loop's AdamW with weight decay 0 here)
STAGES = 8  # ECT halves Delta t 8 times over a run (d = 25k of 200k steps)


class DistillError(PixelDiffusionError):
    """A teacher that cannot be tuned (already a consistency model) or an unknown method."""


def student_config(teacher: str | Path, overrides: Sequence[str] = (), *,
                   method: str = "ect") -> Config:
    """The config of a consistency model tuned from ``teacher`` (a checkpoint file, checkpoint
    or run directory): the teacher's (dropout included), with ECT's tuning defaults (lr 1e-4,
    2-step sampling) and the consistency section, then ``overrides`` (``--section.key value``).
    A missing file, a file that is not a checkpoint, or a consistency model is refused.

    Dropout stays the teacher's: ECT raises its teacher's 0.13 to 0.2, but switching dropout on
    in a network trained without it changes the very function tuning starts from (the digits
    run of docs/consistency.md kept the teacher's 0); raise it with ``--model.dropout``."""
    if method not in METHODS:
        raise DistillError(f"unknown distillation method '{method}'; use one of "
                           f"{', '.join(METHODS)}")
    loaded = load_checkpoint(teacher)
    base = loaded.config
    if base.consistency.method != "none":
        raise DistillError(f"'{loaded.path}' is already a consistency model (tuned from "
                           f"'{base.consistency.teacher}'); distill a diffusion checkpoint")
    teacher_path = str(loaded.path.resolve())
    if method == "pd":
        return _progressive_config(base, teacher_path, overrides)
    sigma_max = min(SIGMA_MAX, highest_sigma(bridge_for(base.diffusion)))
    cfg = from_dict({
        "consistency": {"method": method, "teacher": teacher_path, "sigma_max": sigma_max},
        "progressive": {"teacher": ""},  # a pd student tuned on is no longer one
        "sample": {"sampler": CONSISTENCY_SAMPLER, "steps": 2, "spacing": None},
        "train": {"lr": ECT_LR, "eval_sampler": CONSISTENCY_SAMPLER, "eval_steps": 2},
    }, base=base)
    return apply_overrides(cfg, _parse_overrides(overrides)) if overrides else cfg


def _progressive_config(base: Config, teacher: str, overrides: Sequence[str]) -> Config:
    """``student_config`` for method pd: a diffusion model sampled by DDIM on the uniform grid
    in progressive.to_steps steps, without x0 clipping (progressive.py), unless the overrides
    set the sample steps themselves."""
    pairs = _parse_overrides(overrides) if overrides else []
    cfg = from_dict({"progressive": {"teacher": teacher}}, base=apply_overrides(base, pairs))
    steps = cfg.progressive.to_steps  # read with the overrides, which then go on top again
    return apply_overrides(from_dict({
        "sample": {"sampler": "ddim", "spacing": "uniform", "eta": 0.0, "clip_x0": False,
                   "steps": steps},
        "train": {"lr": ECT_LR, "eval_sampler": "ddim", "eval_steps": steps},
    }, base=cfg), pairs)


def ect_loss_of(cfg: Config, teacher: Callable[..., Tensor] | None = None) -> ECTLoss:
    """The ``ECTLoss`` of a consistency config; consistency.d 0 means train.steps / 8.
    ``teacher``: the frozen teacher's denoiser, for method cd (consistency distillation)."""
    c = cfg.consistency
    d = c.d or max(1, cfg.train.steps // STAGES)
    return ECTLoss(sigma_min=c.sigma_min, sigma_data=c.sigma_data, P_mean=c.p_mean,
                   P_std=c.p_std, q=c.q, d=d, k=c.k, b=c.b, c=c.c, sigma_max=c.sigma_max,
                   teacher=teacher, solver=c.solver)




class StepClock:
    """The number of optimizer steps done, kept by a hook run after every step (and set when a
    run starts or resumes), for a loss that depends on it."""

    def __init__(self) -> None:
        self.step = 0

    def __call__(self, state: TrainState) -> None:
        self.step = state.step

    def hook(self) -> Hook:
        return Hook(1, self, setup=self)


class DistillLoss:
    """The training loop's loss ``loss_fn(net, x0, generator=, y=)``: ``ECTLoss`` on the
    consistency function around ``net`` seen through the teacher's bridge, at ``clock.step``.

    net: the UNet being tuned, called as the teacher's formulation calls it; x0 [B, C, H, W] in
    [-1, 1]; y int64 [B] or None. Returns a 0-dim tensor.
    """

    def __init__(self, ect: ECTLoss, diffusion: DiffusionConfig, clock: StepClock) -> None:
        self.ect, self.bridge, self.clock = ect, bridge_for(diffusion), clock
        self.raw: EDMRawNetwork | None = None  # built once per net: its table copies persist

    def __call__(self, net: Callable[..., Tensor], x0: Tensor, *,
                 generator: torch.Generator | None = None, y: Tensor | None = None) -> Tensor:
        if self.raw is None or self.raw.net is not net:
            self.raw = EDMRawNetwork(net, self.bridge, self.ect.sigma_data)
        return self.ect(self.raw, x0, generator=generator, y=y, step=self.clock.step)


def start_from_teacher(state: TrainState, weights: dict[str, Tensor] | None = None) -> None:
    """A fresh run's raw and EMA weights become the teacher's EMA weights (ECT and progressive
    distillation start from the pretrained model): ``weights`` where the caller has read them
    already, else read from the teacher's checkpoint; a resumed run keeps what it restored."""
    if state.checkpoint is not None:
        return
    teacher = state.cfg.progressive.teacher or state.cfg.consistency.teacher
    if weights is None:
        weights = load_checkpoint(teacher).model.state_dict()
    for module in (state.accelerator.unwrap_model(state.model), state.ema):
        load_state_checked(module, weights, teacher)


def tune(cfg: Config, run_dir: str | Path | None = None, *, resume: str | None = None,
         progress: bool = True, log: Callable[[str], None] = _log,
         hooks: Sequence[Hook] | None = None, **kwargs: Any) -> TrainResult:
    """Tune ``cfg`` (a ``student_config``) into ``run_dir`` with the training loop; ``resume``
    None, "auto" or a checkpoint path as for ``train``. ``hooks`` default to the training run's
    (``run.default_hooks``: sample grids, the quality score)."""
    from .run import default_hooks
    from .train import train

    extra = default_hooks(cfg) if hooks is None else list(hooks)
    if cfg.progressive.teacher:  # method pd
        distiller = ProgressiveDistiller(cfg)
        start = functools.partial(start_from_teacher,
                                  weights=distiller.teacher.net.state_dict())
        return train(cfg, run_dir, resume=resume, progress=progress, log=log, loss_fn=distiller,
                     lr_schedule=distiller.lr_factor,
                     hooks=[Hook(0, setup=start), distiller.hook(), *extra], **kwargs)
    if cfg.consistency.method not in METHODS:
        raise DistillError("this config is not a distilled model's; make one with "
                           "pixeldiffusion distill -cp TEACHER")
    clock = StepClock()
    teacher = FrozenTeacher(cfg.consistency.teacher) if cfg.consistency.method == "cd" else None
    loss = DistillLoss(ect_loss_of(cfg, teacher), cfg.diffusion, clock)
    start = start_from_teacher if teacher is None else functools.partial(
        start_from_teacher, weights=teacher.net.state_dict())  # the file is read once
    return train(cfg, run_dir, resume=resume, progress=progress, log=log, loss_fn=loss,
                 hooks=[Hook(0, setup=start), clock.hook(), *extra],
                 **kwargs)


def is_distill_run(cfg: Config) -> bool:
    """Whether ``cfg`` is a ``distill`` run's (a consistency model or progressive distillation),
    which ``tune`` continues, rather than a training run's."""
    return cfg.consistency.method != "none" or bool(cfg.progressive.teacher)
