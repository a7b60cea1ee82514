"""The training loop (Ho et al. 2020, Alg. 1): AdamW with LR warm-up, gradient clipping, an EMA
of the weights, checkpoints that resume exactly, sample grids, TensorBoard scalars.

Devices, mixed precision and multi-process training go through Hugging Face ``accelerate``; data
sharding is done by ``EpochBatchSampler`` itself so that the step number is the data position.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

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
from .data import load_dataset, make_loader, random_hflip
from .device import make_generator, resolve_device, resolve_precision, use_fast_kernels
from .diffusion import training_loss
from .errors import CheckpointError, ConfigError, PixelDiffusionError
from .generate import generate
from .guidance import drop_labels
from .images import save_grid
from .schedule import alphas_cumprod_of
from .unet import build_unet, count_parameters

# devices with a fused AdamW kernel; it skips a NaN/Inf step on the device (see NonFiniteSteps)
FUSED_ADAMW = ("cuda", "cpu", "mps", "xpu")


class TrainingInterrupted(PixelDiffusionError):
    """SIGINT/SIGTERM: a checkpoint of this step was written; the message says how to resume."""

    exit_code = 130


class TrainingDiverged(PixelDiffusionError):
    """The loss became NaN or infinite; nothing non-finite was saved."""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    grid: Path | None
    step: int


def _log(message: str) -> None:
    print(message, flush=True)  # flushed: users tail redirected logs of long runs


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


def _rng_states(generator: torch.Generator) -> dict[str, Tensor]:
    states = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _rng_states_of_all(accelerator, generator: torch.Generator) -> list[dict[str, Tensor]]:
    """The RNG states of every process in rank order (a collective call when there are several):
    each rank draws its own timesteps and noise, so each must resume its own stream."""
    states = _rng_states(generator)
    if accelerator.num_processes == 1:
        return [states]
    from accelerate.utils import gather_object
    return gather_object([states])


def _rng_of_rank(state: dict, accelerator) -> dict[str, Tensor] | None:
    """This process's saved RNG states. A checkpoint from another number of processes (or from
    before per-rank states) has only rank 0's; the other ranks then keep their fresh seeds rather
    than repeat rank 0's noise."""
    ranks = state.get("rng_ranks", [])
    if len(ranks) == accelerator.num_processes:
        return ranks[accelerator.process_index]
    return state["rng"] if accelerator.process_index == 0 else None


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
        width = cfg.model.channels * max(cfg.model.channel_mult)  # device.conv_width of the UNet
        chosen = resolve_precision("auto", device, width).precision
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


def train(cfg: Config, run_dir: str | Path | None = None, *, resume: str | None = None,
          progress: bool = True, log: Callable[[str], None] = _log) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; ``resume`` is None, "auto" or a checkpoint path.

    The main process holds ``run_dir/train.lock`` throughout, so a second run pointed at the
    same directory is refused while this one lives (see ``checkpoint.run_lock``).
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
    accelerator = _make_accelerator(cfg)
    with run_lock(run_dir) if accelerator.is_main_process else nullcontext():
        point = _resume_point(run_dir, resume, log if accelerator.is_main_process else _quiet)
        return _train_locked(cfg, run_dir, point, accelerator, progress, log)


def _quiet(_message: str) -> None:
    """The log of non-main processes: they say nothing."""


def _train_locked(cfg: Config, run_dir: Path, point: ResumePoint | None, accelerator,
                  progress: bool, log: Callable[[str], None]) -> TrainResult:
    """The training loop proper, with the run directory locked and the resume point loaded."""
    resume_from = point.path if point is not None else None
    device, main = accelerator.device, accelerator.is_main_process
    use_fast_kernels(device)
    tc = cfg.train

    dataset = load_dataset(cfg.data)
    if cfg.model.num_classes and cfg.model.num_classes != dataset.num_classes:
        raise ConfigError(f"config key 'model.num_classes' is {cfg.model.num_classes} but data set "
                          f"'{cfg.data.dataset}' has {dataset.num_classes} classes")
    if cfg.model.num_classes and not cfg.model.class_names and dataset.class_names:
        # saved with the config into every checkpoint, so sampling can take --class cat
        cfg = replace(cfg, model=replace(cfg.model, class_names=tuple(dataset.class_names)))
    torch.manual_seed(tc.seed)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=device.type in FUSED_ADAMW)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.lr_schedule, tc.steps))
    generator = make_generator(device, tc.seed + accelerator.process_index)

    step = 0
    if point is not None:
        state = point.state
        load_training_weights(point.path, model, ema, point.tensors)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = int(state["step"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"the training state in '{point.path}' does not fit this run "
                                  f"({type(err).__name__}: {err}); resume with the config it "
                                  f"was trained with (EXP_DIR/config.yaml)") from None
    loader = make_loader(dataset, tc.batch_size, seed=tc.seed, start=step,
                         num_workers=cfg.data.num_workers, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, pin_memory=device.type == "cuda")
    batches = iter(loader)

    # channels-last runs the convolutions ~15% faster on CPU (oneDNN) and on tensor cores
    model.to(memory_format=torch.channels_last)
    ema.to(device, memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(model, optimizer)
    # the compiled wrapper shares model's parameters; saving and the EMA use model itself
    forward = torch.compile(model) if tc.compile else model
    alphas_cumprod = alphas_cumprod_of(cfg).float().to(device)

    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(run_dir / "tensorboard"))
        where = f"resuming from {resume_from} at step {step}" if resume_from else "new run"
        log(f"pixeldiffusion: {where}; run directory {run_dir}")
        log(f"  data: {cfg.data.dataset}, {len(dataset)} images of {cfg.data.channels}x"
            f"{cfg.data.image_size}x{cfg.data.image_size}; model: "
            f"{count_parameters(ema):,} parameters; device: {device}"
            f"{'' if accelerator.num_processes == 1 else f' x{accelerator.num_processes}'}"
            f"; mixed precision: {tc.mixed_precision}"
            f"{f' -> {accelerator.mixed_precision}' if tc.mixed_precision == 'auto' else ''}")

    nonfinite = NonFiniteSteps(device, tc.nan_patience,
                               int(point.state.get("nonfinite_steps", 0)) if point else 0)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    scaler = getattr(optimizer, "scaler", None)  # fp16: GradScaler skips overflowing steps
    skips_on_device = device.type in FUSED_ADAMW and scaler is None
    since_save = torch.zeros(2, device=device)  # finite loss sum and count since the last save

    def save(at_step: int) -> Path:
        nonfinite.check(at_step, latest_checkpoint(run_dir), log if main else _quiet)
        raw = accelerator.unwrap_model(model)
        for module in (raw, ema):
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise TrainingDiverged(f"weights became non-finite by step {at_step}; not saved. "
                                       f"Last good checkpoint: {latest_checkpoint(run_dir)}. "
                                       f"Lower --train.lr or use bf16 instead of fp16")
        state = {"step": at_step, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": _rng_states(generator),
                 "nonfinite_steps": int(nonfinite.total),
                 "rng_ranks": _rng_states_of_all(accelerator, generator)}
        loss_sum_count = accelerator.reduce(since_save, "sum").tolist()
        score = loss_sum_count[0] / loss_sum_count[1] if tc.keep_best and loss_sum_count[1] \
            else None
        since_save.zero_()
        path = None
        if main:
            path = save_checkpoint(run_dir, at_step, raw, ema, state, cfg, keep_last=tc.keep_last,
                                   score=score)
        accelerator.wait_for_everyone()
        return path

    def grid(name: str) -> Path | None:
        if not main:
            return None
        images = generate(ema, cfg, device).images
        return save_grid(images, run_dir / "samples" / name, nrow=cfg.sample.nrow)

    evaluator, eval_postfix = None, {}
    if main and tc.eval_samples:
        from .evaluate import TrainingEval
        evaluator = TrainingEval(cfg, device)

    def evaluate(at_step: int) -> None:
        """Score EMA samples (train.eval_*): log line, progress bar and TensorBoard."""
        if evaluator is None:
            return
        line, scalars = evaluator(ema, cfg)
        log(f"eval at step {at_step}: {line}")
        for tag, value in scalars.items():
            if writer is not None:
                writer.add_scalar(tag, value, at_step)
            if tag in ("eval/digit_fid", "eval/fid"):
                eval_postfix[tag.split("/")[1].replace("_", "")] = f"{value:.1f}"

    # Restore the RNGs last: creating the loader iterator, the evaluator or the writer may draw
    # from the global RNG, and a resumed run must continue exactly where it stopped.
    if resume_from is not None:
        rng = _rng_of_rank(state, accelerator)
        if rng is not None:
            _set_rng_states(rng, generator)
    model_kwargs = {}
    loss_sum, loss_count, checkpoint = torch.zeros((), device=device), 0.0, resume_from
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and main), desc="train",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10)
    with _stop_on_signals() as stop:
        while step < tc.steps:
            if stop:
                checkpoint = save(step)
                raise TrainingInterrupted(
                    f"training stopped by signal {stop['signal']} at step {step}; checkpoint "
                    f"saved to {checkpoint}. Resume with: pixeldiffusion train -e {run_dir} "
                    f"--resume auto")
            x, y = next(batches)
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if cfg.data.random_flip:
                x = random_hflip(x, generator)
            if cfg.model.num_classes:  # null class = num_classes (classifier-free guidance)
                model_kwargs["y"] = drop_labels(y.to(device, non_blocking=True), tc.p_uncond,
                                                cfg.model.num_classes, generator)
            with accelerator.autocast():
                loss = training_loss(forward, x, alphas_cumprod,
                                     prediction=cfg.diffusion.prediction, loss=cfg.diffusion.loss,
                                     min_snr_gamma=cfg.diffusion.min_snr_gamma,
                                     generator=generator, **model_kwargs)
            accelerator.backward(loss)
            # with max_norm inf the clip multiplies by exactly 1: only the norm is wanted
            grad_norm = accelerator.clip_grad_norm_(
                model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            # fp16 gradients overflow now and then by design; there only the loss counts
            bad = nonfinite.flag(loss, grad_norm if scaler is None else None, accelerator)
            if skips_on_device:
                inner_optimizer.found_inf = bad  # the fused kernel skips the update on device
                optimizer.step()
            elif scaler is not None or not bad.item():
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, accelerator.unwrap_model(model), ema_decay_at(cfg, step), skip=bad)
            step += 1
            good_loss = torch.where(bad > 0, 0.0, loss.detach().float())
            loss_sum += good_loss
            loss_count += 1 - bad
            since_save.add_(torch.stack([good_loss, 1 - bad]))
            bar.update(1)

            if step % tc.log_every == 0 or step == tc.steps:
                nonfinite.check(step, latest_checkpoint(run_dir), log if main else _quiet)
                good_steps = float(loss_count)
                mean_loss = float(accelerator.reduce(loss_sum, "mean")) / good_steps \
                    if good_steps else float("nan")  # every step of the interval was skipped
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **eval_postfix)
                if writer is not None:
                    writer.add_scalar("train/loss", mean_loss, step)
                    writer.add_scalar("train/lr", lr, step)
                loss_sum.zero_()
                loss_count = torch.zeros((), device=device)
            if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                grid(f"step-{step:07d}.png")
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                evaluate(step)
            if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
                checkpoint = save(step)
    bar.close()
    if checkpoint is None or step != _step_of(checkpoint):
        checkpoint = save(step)
    final_grid = grid("final.png")
    evaluate(step)
    if writer is not None:
        writer.close()
    if main:
        skipped = dataset.skipped_files()
        if skipped:
            shown = ", ".join(str(p) for p in skipped[:5])
            log(f"pixeldiffusion: warning: skipped {len(skipped)} unreadable image file(s): "
                f"{shown}{', ...' if len(skipped) > 5 else ''}")
        log(f"checkpoint: {checkpoint}")
        log(f"sample grid: {final_grid}")
    return TrainResult(run_dir, checkpoint, final_grid, step)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])
