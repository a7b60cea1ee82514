"""The training loop (Ho et al. 2020, Alg. 1): AdamW with LR warm-up, gradient clipping, an EMA
of the weights, checkpoints that resume exactly, scalars to TensorBoard or Weights & Biases.

Read it top to bottom from ``train``: ``build_run`` makes everything a run needs (a
``TrainState``), ``restore`` puts a checkpoint back into it, and ``_loop`` calls ``train_step``
until ``train.steps``, running the periodic work it is given as ``Hook``s (the loss line, the
checkpoint; sample grids and the quality score come from ``run.py``, so training does not depend
on the sampling or metric code). The loss is a callable the loop is handed too: the configured
formulation's (``formulations.loss_for``: DDPM, EDM or flow matching).

Devices, mixed precision and multi-process training go through Hugging Face ``accelerate``; data
sharding is done by ``EpochBatchSampler`` itself so that the step number is the data position.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (
    ResumePoint,
    find_resumable,
    latest_checkpoint,
    list_checkpoints,
    load_resume_point,
    load_training_weights,
    run_lock,
    save_checkpoint,
)
from .config import Config, save_config
from .data import ImageDataset, load_dataset, make_loader, random_hflip
from .device import conv_width, make_generator, resolve_device, resolve_precision, use_fast_kernels
from .errors import CheckpointError, ConfigError, PixelDiffusionError
from .formulations import loss_for
from .guidance import drop_labels
from .loggers import NullLogger, ScalarLogger, check_logger, make_logger
from .unet import build_unet, count_parameters

# devices with a fused AdamW kernel; it skips a NaN/Inf step on the device (see NonFiniteSteps)
FUSED_ADAMW = ("cuda", "cpu", "mps", "xpu")


class LossFn(Protocol):
    """A training objective: ``loss_fn(net, x0, generator=, y=)`` -> 0-dim loss Tensor.

    ``net(x_t, t, y=None)`` is the network being trained, ``x0`` float [B, C, H, W] in [-1, 1]
    the clean batch, ``y`` int64 [B] class labels (the null class where dropped) or None. The
    loss draws its own noise levels and noise from ``generator``.
    """

    def __call__(self, net: Callable[..., Tensor], x0: Tensor, *,
                 generator: torch.Generator, y: Tensor | None) -> Tensor: ...


class TrainingInterrupted(PixelDiffusionError):
    """SIGINT/SIGTERM: a checkpoint of this step was written; the message says how to resume."""

    exit_code = 130


class TrainingDiverged(PixelDiffusionError):
    """The loss became NaN or infinite; nothing non-finite was saved."""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None  # the final checkpoint (on the main process)
    grid: Path | None        # the final sample grid, when a hook wrote one
    step: int


def _log(message: str) -> None:
    print(message, flush=True)  # flushed: users tail redirected logs of long runs


def _quiet(_message: str) -> None:
    """The log of non-main processes: they say nothing."""


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("exp-%Y%m%d-%H%M%S")


def ema_decay_at(cfg: Config, step: int) -> float:
    """EMA decay after ``step`` updates: min(decay, (1 + n)/(10 + n)) with warm-up, as in
    Tensorflow's ExponentialMovingAverage(num_updates) used by the DDPM code."""
    if not cfg.train.ema_warmup:
        return cfg.train.ema_decay
    return min(cfg.train.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float,
               skip: Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model, in one fused foreach call; where the 0-dim
    ``skip`` flag is 1 the EMA is left as it is (decided on the device, no host sync)."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    if skip is None:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    else:
        weight = (1.0 - skip).mul_(1.0 - decay).to(ema_params[0].dtype)
        torch._foreach_lerp_(ema_params, params, [weight] * len(params))


class NonFiniteSteps:
    """Skips updates whose loss or gradient norm is NaN/Inf and counts them, without a host sync.

    ``flag(loss, grad_norm)`` computes a 0-dim float flag on the device (1 = skip this step) and
    hands it to the fused AdamW as ``found_inf``, the mechanism ``torch.amp.GradScaler`` uses: the
    kernel leaves weights, moments and its step count untouched when the flag is set. With fp16
    the GradScaler already skips non-finite gradients and sets ``found_inf`` itself; where no
    fused kernel exists the step is skipped after one ``.item()``. The counts are read only by
    ``check`` (at log intervals and before a checkpoint), which stops the run after ``patience``
    bad steps in a row. In multi-process runs the flag is summed over processes, so every
    process skips the same steps.
    """

    def __init__(self, device: torch.device, patience: int, total: int = 0) -> None:
        self.patience = patience
        self.run = torch.zeros((), device=device)      # current streak of bad steps
        self.longest = torch.zeros((), device=device)  # longest streak since the last check
        self.total = torch.full((), float(total), device=device)
        self.reported = total

    def flag(self, loss: Tensor, grad_norm: Tensor | None, accelerator) -> Tensor:
        """This step's 0-dim flag: 1.0 if ``loss`` or ``grad_norm`` (when given) is NaN/Inf."""
        bad = ~torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            bad |= ~torch.isfinite(grad_norm)
        bad = bad.float()
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, "sum").clamp_(max=1.0)
        self.run.mul_(bad).add_(bad)  # run = (run + 1) * bad
        torch.maximum(self.longest, self.run, out=self.longest)
        self.total.add_(bad)
        return bad

    def check(self, step: int, last_good: Path | None, log: Callable[[str], None]) -> None:
        """Host sync: report newly skipped steps; raise TrainingDiverged after ``patience`` in a
        row."""
        longest, total = int(self.longest), int(self.total)
        self.longest.copy_(self.run)
        if longest >= self.patience:
            raise TrainingDiverged(
                f"the loss or its gradients were NaN/Inf for {longest} steps in a row before step "
                f"{step} (train.nan_patience is {self.patience}); those updates were skipped and "
                f"no non-finite weights were saved. Likely causes: a learning rate too high for "
                f"this model or fp16 overflow. Lower --train.lr, keep --train.grad_clip on, or use "
                f"bf16 instead of fp16. Last good checkpoint: {last_good}")
        if total > self.reported:
            log(f"pixeldiffusion: warning: skipped {total - self.reported} step(s) with a NaN/Inf "
                f"loss or gradient before step {step} ({total} in all); the weights were not "
                f"updated by them")
            self.reported = total


class LossMeter:
    """The mean finite training loss over intervals that differ per reader: ``"log"`` (the loss
    line, every train.log_every steps) and ``"save"`` (the keep_best score of a checkpoint).

    ``add`` sums each step's loss into one device-side (sum, count) pair, without a host sync.
    ``mean(reader)`` is the sync (a collective: every process calls it at the same step): it
    moves the pair, summed over processes, into every reader's host total and returns this
    reader's mean since its previous call (NaN when none of those steps was finite).
    """

    READERS = ("log", "save")

    def __init__(self, device: torch.device) -> None:
        self.pending = torch.zeros(2, device=device)  # finite-loss sum, finite-step count
        self.totals = {reader: (0.0, 0.0) for reader in self.READERS}
        self.steps, self.read_at = 0, dict.fromkeys(self.READERS, 0)

    def add(self, loss: Tensor, bad: Tensor) -> None:
        """Count a step's 0-dim ``loss`` unless its 0-dim ``bad`` flag is 1."""
        good_loss = torch.where(bad > 0, 0.0, loss.float())
        self.pending.add_(torch.stack([good_loss, 1 - bad]))
        self.steps += 1

    def steps_since(self, reader: str) -> int:
        """Steps added since ``reader``'s last ``mean`` (no sync)."""
        return self.steps - self.read_at[reader]

    def mean(self, reader: str, accelerator) -> float:
        """``reader``'s mean loss since its previous call (a host sync and a collective)."""
        loss_sum, count = accelerator.reduce(self.pending, "sum").tolist()
        self.pending.zero_()
        self.totals = {r: (s + loss_sum, c + count) for r, (s, c) in self.totals.items()}
        (loss_sum, count), self.totals[reader] = self.totals[reader], (0.0, 0.0)
        self.read_at[reader] = self.steps
        return loss_sum / count if count else math.nan


def lr_factor(step: int, warmup_steps: int, schedule: str = "constant",
              total_steps: int = 0) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based): linear warm-up to 1 over
    ``warmup_steps``, then constant (DDPM, App. B) or, for ``"cosine"``, half a cosine from 1
    to 0 at ``total_steps`` (SGDR, Loshchilov & Hutter 2017, eq. 5 without restarts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- the run


@dataclass
class TrainState:
    """Everything the loop reads and advances; made by ``build_run``."""

    cfg: Config                 # as trained: class_names filled in from the data set
    run_dir: Path
    accelerator: Any            # accelerate.Accelerator
    dataset: ImageDataset
    model: nn.Module            # the trained weights, as accelerate prepared them (DDP: wrapped)
    net: Callable[..., Tensor]  # model, or its torch.compile wrapper: what the loss calls
    ema: nn.Module              # EMA of the weights, on the device, in eval mode
    optimizer: Any              # AdamW under accelerate's wrapper
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # this process's timesteps, noise, flips and label drops
    batches: Iterator[tuple[Tensor, Tensor]]  # (x [B, C, H, W] in [-1, 1], y int64 [B])
    loss_fn: LossFn
    nonfinite: NonFiniteSteps
    losses: LossMeter
    log: Callable[[str], None]  # the user's log on the main process, silent on the others
    step: int = 0
    logger: ScalarLogger = field(default_factory=NullLogger)
    checkpoint: Path | None = None  # newest checkpoint written or resumed from (main process)
    saved_step: int = -1            # its step, known on every process
    grid: Path | None = None        # newest sample grid written by a hook
    postfix: dict[str, str] = field(default_factory=dict)  # progress bar: loss, lr, fid
    # parts of the training state that hooks own (name -> an object with state_dict() and
    # load_state_dict(saved or None)), registered in their setup; saved into state.pt under the
    # name and handed back on resume (``restore_hook_states``)
    hook_states: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def done(self) -> bool:
        """True once train.steps are trained (at the end-of-run hooks)."""
        return self.step >= self.cfg.train.steps


@dataclass
class Hook:
    """Periodic work given to the loop: ``fn(state)`` after every ``every``-th step (0 = only at
    the end) and once more after the last step. ``setup(state)``, if given, runs once before the
    first step on every process (build what ``fn`` needs there: it may draw random numbers).
    A hook with a setup and no ``fn`` does its work before training only."""

    every: int
    fn: Callable[[TrainState], None] | None = None
    setup: Callable[[TrainState], None] | None = None


def train(cfg: Config, run_dir: str | Path | None = None, *, resume: str | None = None,
          progress: bool = True, log: Callable[[str], None] = _log, hooks: Sequence[Hook] = (),
          loss_fn: LossFn | None = None,
          lr_schedule: Callable[[int], float] | None = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; ``resume`` is None, "auto" or a checkpoint path.

    The loop itself logs the loss and writes checkpoints; ``hooks`` add periodic work
    (``run.default_hooks(cfg)``: sample grids and the quality score, which ``pixeldiffusion
    train`` and ``pd.train``, i.e. ``run.train``, add). ``loss_fn`` defaults to
    ``formulations.loss_for(cfg.diffusion)``; ``lr_schedule`` (optimizer step, 0-based ->
    train.lr's multiplier) to ``lr_factor`` with train.warmup_steps and train.lr_schedule. The
    main process
    holds ``run_dir/train.lock`` throughout, so a second run pointed at the same directory is
    refused while this one lives (see ``checkpoint.run_lock``).
    """
    check_logger(cfg.train.logger)  # a missing package fails now, not after the data set loads
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
    accelerator = _make_accelerator(cfg)
    log = log if accelerator.is_main_process else _quiet
    with run_lock(run_dir) if accelerator.is_main_process else nullcontext():
        point = _resume_point(run_dir, resume, log)
        state = build_run(cfg, run_dir, accelerator, log, loss_fn=loss_fn,
                          lr_schedule=lr_schedule,
                          start=_saved_step(point) if point is not None else 0)
        if point is not None:
            restore(state, point)  # before anything is written: a misfit checkpoint writes nothing
        _announce(state, point)
        state.logger = _open_logger(state)
        try:
            for hook in hooks:
                if hook.setup is not None:
                    hook.setup(state)
            if point is not None:  # last: the setups above may draw from the global RNG
                restore_hook_states(state, point)
                restore_rngs(state, point)
            tc = state.cfg.train
            _loop(state, [Hook(tc.log_every, log_scalars), Hook(tc.save_every, save), *hooks],
                  progress)
        finally:
            state.logger.close()
        _report(state)
        return TrainResult(run_dir, state.checkpoint, state.grid, state.step)


def _loop(state: TrainState, hooks: Sequence[Hook], progress: bool) -> None:
    """Train until train.steps, running each hook every ``hook.every`` steps and all of them once
    at the end. SIGINT/SIGTERM is acted on between two steps: save this step, then stop."""
    total = state.cfg.train.steps
    bar = tqdm(total=total, initial=state.step, disable=not (progress and state.main),
               desc="train", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10)
    with _stop_on_signals() as stop:
        while state.step < total:
            if stop:
                _interrupt(state, stop["signal"])
            loss, bad = train_step(state, *next(state.batches))
            state.losses.add(loss, bad)
            state.step += 1
            bar.update(1)
            due = [h for h in hooks if h.every and state.step % h.every == 0 and not state.done]
            if due:
                _run_hooks(state, due)
                bar.set_postfix(state.postfix, refresh=False)
    bar.close()
    _run_hooks(state, hooks)  # the end: the last loss line, checkpoint, grid and score


def train_step(state: TrainState, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One update of DDPM's Alg. 1 on a batch from the loader (x [B, C, H, W] in [-1, 1], y int64
    [B]): loss, backward, clip, NaN/Inf flag, AdamW step (skipped where flagged), LR schedule,
    EMA. Returns the 0-dim loss and flag (1.0 = skipped), still on the device: no host sync."""
    accelerator, tc = state.accelerator, state.cfg.train
    x0, labels = _batch_on_device(state, x, y)
    with accelerator.autocast():
        loss = state.loss_fn(state.net, x0, generator=state.generator, y=labels)
    accelerator.backward(loss)
    # with max_norm inf the clip multiplies by exactly 1: only the norm is wanted
    grad_norm = accelerator.clip_grad_norm_(
        state.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    # fp16 gradients overflow now and then by design; there only the loss counts
    fp16 = getattr(state.optimizer, "scaler", None) is not None
    bad = state.nonfinite.flag(loss, None if fp16 else grad_norm, accelerator)
    _optimizer_step(state, bad)
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    decay = ema_decay_at(state.cfg, state.step)
    ema_update(state.ema, accelerator.unwrap_model(state.model), decay, skip=bad)
    return loss.detach(), bad


def _batch_on_device(state: TrainState, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """x0 on the device in channels-last, randomly flipped (data.random_flip), and the labels of
    a conditional model with some replaced by the null class num_classes (classifier-free
    guidance, train.p_uncond); None for an unconditional model."""
    cfg = state.cfg
    x0 = x.to(state.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    if cfg.data.random_flip:
        x0 = random_hflip(x0, state.generator)
    if not cfg.model.num_classes:
        return x0, None
    labels = y.to(state.device, non_blocking=True)
    return x0, drop_labels(labels, cfg.train.p_uncond, cfg.model.num_classes, state.generator)


def _optimizer_step(state: TrainState, bad: Tensor) -> None:
    """AdamW's update unless the 0-dim ``bad`` flag is 1: the fused kernel skips it on the device
    (``found_inf``, as GradScaler does); with fp16 the GradScaler skips overflowing steps itself;
    elsewhere it costs one host sync."""
    optimizer = state.optimizer
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None and state.device.type in FUSED_ADAMW:
        getattr(optimizer, "optimizer", optimizer).found_inf = bad  # under accelerate's wrapper
        optimizer.step()
    elif scaler is not None or not bad.item():
        optimizer.step()


# --------------------------------------------------------------------------- building and restoring


def build_run(cfg: Config, run_dir: Path, accelerator, log: Callable[[str], None], *,
              loss_fn: LossFn | None = None, lr_schedule: Callable[[int], float] | None = None,
              start: int = 0) -> TrainState:
    """A fresh run of ``cfg`` whose data begins at step ``start`` (a resume point's step; then
    ``restore`` loads the rest): data set, UNet, EMA, AdamW, LR schedule (``lr_schedule``, else
    ``lr_factor`` of the config), RNG, all on the device."""
    device = accelerator.device
    use_fast_kernels(device)
    dataset = load_dataset(cfg.data)
    cfg = _with_class_names(cfg, dataset)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=device.type in FUSED_ADAMW)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule or (lambda s: lr_factor(s, tc.warmup_steps, tc.lr_schedule,
                                                       tc.steps)))
    loader = make_loader(dataset, tc.batch_size, seed=tc.seed, start=start,
                         num_workers=cfg.data.num_workers, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, pin_memory=device.type == "cuda")
    # channels-last: the layout oneDNN's and the tensor cores' fastest convolutions take
    model.to(memory_format=torch.channels_last)
    ema.to(device, memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainState(
        cfg=cfg, run_dir=run_dir, accelerator=accelerator, dataset=dataset, model=model,
        # the compiled wrapper shares model's parameters; saving and the EMA use model itself
        net=torch.compile(model) if tc.compile else model, ema=ema, optimizer=optimizer,
        scheduler=scheduler, generator=make_generator(device, tc.seed + accelerator.process_index),
        batches=iter(loader), loss_fn=loss_fn or loss_for(cfg.diffusion),
        nonfinite=NonFiniteSteps(device, tc.nan_patience), losses=LossMeter(device), log=log,
        step=start)


def _with_class_names(cfg: Config, dataset: ImageDataset) -> Config:
    """``cfg`` with model.class_names from the data set (saved with the config into every
    checkpoint, so sampling can take --class cat); a class count that does not fit is an error."""
    num_classes = cfg.model.num_classes
    if num_classes and num_classes != dataset.num_classes:
        raise ConfigError(f"config key 'model.num_classes' is {num_classes} but data set "
                          f"'{cfg.data.dataset}' has {dataset.num_classes} classes")
    if num_classes and not cfg.model.class_names and dataset.class_names:
        return replace(cfg, model=replace(cfg.model, class_names=tuple(dataset.class_names)))
    return cfg


def _saved_step(point: ResumePoint) -> int:
    try:
        return int(point.state["step"])
    except (KeyError, ValueError, TypeError) as err:
        raise _misfit(point, err) from None


def _misfit(point: ResumePoint, err: Exception) -> CheckpointError:
    return CheckpointError(f"the training state in '{point.path}' does not fit this run "
                           f"({type(err).__name__}: {err}); resume with the config it was "
                           f"trained with (EXP_DIR/config.yaml)")


def restore(state: TrainState, point: ResumePoint) -> None:
    """Load a checkpoint into a run built at its step: raw and EMA weights, AdamW's moments, the
    LR schedule, the NaN/Inf count. The RNGs come last, in ``restore_rngs``."""
    load_training_weights(point.path, state.accelerator.unwrap_model(state.model), state.ema,
                          point.tensors)
    try:
        state.optimizer.load_state_dict(point.state["optimizer"])
        state.scheduler.load_state_dict(point.state["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise _misfit(point, err) from None
    state.nonfinite = NonFiniteSteps(state.device, state.cfg.train.nan_patience,
                                     int(point.state.get("nonfinite_steps", 0)))
    state.checkpoint, state.saved_step = point.path, state.step


def restore_hook_states(state: TrainState, point: ResumePoint) -> None:
    """Hand each part in ``state.hook_states`` (registered by the hooks' setup) what the
    checkpoint saved under its name, or None when it saved nothing."""
    for name, part in state.hook_states.items():
        part.load_state_dict(point.state.get(name))


def restore_rngs(state: TrainState, point: ResumePoint) -> None:
    """This process's saved RNG states (global and the run's generator). Call it after anything
    that may still draw from the global RNG (building the loader iterator, the hooks' setup, the
    logger), so that a resumed run continues exactly where it stopped. A checkpoint from another
    number of processes has only rank 0's; the other ranks then keep their fresh seeds rather
    than repeat rank 0's noise."""
    ranks = point.state.get("rng_ranks", [])
    accelerator = state.accelerator
    if len(ranks) == accelerator.num_processes:
        states = ranks[accelerator.process_index]
    elif accelerator.process_index == 0:
        states = point.state["rng"]
    else:
        return
    torch.set_rng_state(states["torch"])
    state.generator.set_state(states["generator"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _rng_states(generator: torch.Generator) -> dict[str, Tensor]:
    states = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _rng_states_of_all(accelerator, generator: torch.Generator) -> list[dict[str, Tensor]]:
    """The RNG states of every process in rank order (a collective call when there are several):
    each rank draws its own timesteps and noise, so each must resume its own stream."""
    states = _rng_states(generator)
    if accelerator.num_processes == 1:
        return [states]
    from accelerate.utils import gather_object
    return gather_object([states])


# --------------------------------------------------------------------------- the loop's own hooks


def log_scalars(state: TrainState) -> None:
    """The mean loss since the last call and the LR, to the progress bar and the logger; also
    where skipped NaN/Inf steps are noticed (a host sync)."""
    if not state.losses.steps_since("log"):
        return  # nothing trained since: a run resumed at its last step
    state.nonfinite.check(state.step, latest_checkpoint(state.run_dir), state.log)
    loss = state.losses.mean("log", state.accelerator)  # NaN if every step was skipped
    lr = state.scheduler.get_last_lr()[0]
    state.postfix.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    state.logger.log_scalars({"train/loss": loss, "train/lr": lr}, state.step)


def save(state: TrainState) -> None:
    """Checkpoint this step (unless it already is one) with everything ``restore`` needs; its
    keep_best score is the mean loss since the previous save. Weights that are no longer finite
    are refused."""
    if state.saved_step == state.step:
        return
    run_dir, step = state.run_dir, state.step
    state.nonfinite.check(step, latest_checkpoint(run_dir), state.log)
    raw = state.accelerator.unwrap_model(state.model)
    for module in (raw, state.ema):
        if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
            raise TrainingDiverged(f"weights became non-finite by step {step}; not saved. Last "
                                   f"good checkpoint: {latest_checkpoint(run_dir)}. Lower "
                                   f"--train.lr or use bf16 instead of fp16")
    training_state = {
        "step": step, "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "rng": _rng_states(state.generator),
        "nonfinite_steps": int(state.nonfinite.total),
        "rng_ranks": _rng_states_of_all(state.accelerator, state.generator),
        **{name: part.state_dict() for name, part in state.hook_states.items()}}
    score = state.losses.mean("save", state.accelerator)
    tc = state.cfg.train
    if state.main:
        state.checkpoint = save_checkpoint(
            run_dir, step, raw, state.ema, training_state, state.cfg, keep_last=tc.keep_last,
            score=score if tc.keep_best and not math.isnan(score) else None)
    state.saved_step = step
    state.accelerator.wait_for_everyone()


def _run_hooks(state: TrainState, hooks: Sequence[Hook]) -> None:
    """Each hook in turn, on RNGs forked from training's: whatever a hook draws (sampling a grid)
    leaves the training stream as it was, so a resumed run matches a straight one."""
    device = state.device
    for hook in hooks:
        if hook.fn is None:
            continue
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            hook.fn(state)


def _interrupt(state: TrainState, signum: int) -> None:
    save(state)
    raise TrainingInterrupted(
        f"training stopped by signal {signum} at step {state.step}; checkpoint saved to "
        f"{state.checkpoint}. Resume with: pixeldiffusion train -e {state.run_dir} --resume auto")


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (never mid-update); a second
    signal interrupts at once."""
    received: dict[str, int] = {}
    handlers = {}

    def handler(signum, _frame):
        if "signal" in received:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        received["signal"] = signum

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield received
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- setup and report


def _make_accelerator(cfg: Config):
    from accelerate import Accelerator

    device = resolve_device(cfg.train.device)
    if cfg.train.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'train.mixed_precision' fp16 needs a CUDA GPU; use bf16 or "
                          "no on this device")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # accelerate's single-process device is the current one
    mixed_precision = cfg.train.mixed_precision
    if mixed_precision == "auto":
        with torch.device("meta"):  # the architecture only: no weights are allocated
            model = build_unet(cfg.model, in_channels=cfg.data.channels,
                               image_size=cfg.data.image_size)
        chosen = resolve_precision("auto", device, conv_width(model)).precision
        mixed_precision = "bf16" if chosen == "bf16" else "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def _resume_point(run_dir: Path, resume: str | None,
                  log: Callable[[str], None]) -> ResumePoint | None:
    """The checkpoint to continue from, loaded and checked; "auto" falls back past a corrupt
    newest checkpoint to the newest one that loads, and says so."""
    if resume is None:
        if list_checkpoints(run_dir):
            raise PixelDiffusionError(f"'{run_dir}' already holds checkpoints; continue it with "
                                      f"--resume auto, or pass another -e EXP_DIR")
        return None
    if resume == "auto":
        point = find_resumable(run_dir)
        for skipped, why in point.skipped if point is not None else []:
            log(f"pixeldiffusion: warning: newest checkpoint {skipped} cannot be loaded ({why}); "
                f"falling back to {point.path}")
        return point
    path = Path(resume)
    found = path if (path / "state.pt").is_file() else latest_checkpoint(path)
    if found is None:
        raise PixelDiffusionError(f"--resume {resume}: no checkpoint there; pass a checkpoint "
                                  f"directory (EXP_DIR/checkpoints/step-...) or --resume auto")
    return load_resume_point(found)


def _announce(state: TrainState, point: ResumePoint | None) -> None:
    """Main process: write run_dir/config.yaml and say what is being trained where."""
    if not state.main:
        return
    cfg, accelerator = state.cfg, state.accelerator
    state.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, state.run_dir / "config.yaml")
    where = f"resuming from {point.path} at step {state.step}" if point else "new run"
    processes = "" if accelerator.num_processes == 1 else f" x{accelerator.num_processes}"
    state.log(f"pixeldiffusion: {where}; run directory {state.run_dir}")
    state.log(f"  data: {cfg.data.dataset}, {len(state.dataset)} images of {cfg.data.channels}x"
              f"{cfg.data.image_size}x{cfg.data.image_size}; model: "
              f"{count_parameters(state.ema):,} parameters; device: {state.device}{processes}"
              f"; mixed precision: {cfg.train.mixed_precision}{_resolved(accelerator, cfg)}")


def _resolved(accelerator, cfg: Config) -> str:
    """" -> bf16" when train.mixed_precision auto chose a precision, else ""."""
    return f" -> {accelerator.mixed_precision}" if cfg.train.mixed_precision == "auto" else ""


def _open_logger(state: TrainState) -> ScalarLogger:
    """train.logger on the main process; the others log nothing."""
    if not state.main:
        return NullLogger()
    tc = state.cfg.train
    return make_logger(tc.logger, state.run_dir, config=state.cfg.to_dict(),
                       project=tc.wandb_project)


def _report(state: TrainState) -> None:
    """Main process: the unreadable files the data set skipped, the final checkpoint and grid."""
    if not state.main:
        return
    skipped = state.dataset.skipped_files()
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:5])
        state.log(f"pixeldiffusion: warning: skipped {len(skipped)} unreadable image file(s): "
                  f"{shown}{', ...' if len(skipped) > 5 else ''}")
    state.log(f"checkpoint: {state.checkpoint}")
    if state.grid is not None:
        state.log(f"sample grid: {state.grid}")
