"""A training run as ``pixeldiffusion train`` makes it: train.py's loop plus the hooks that need
the sampling and metric code, sample grids (train.sample_every) and the quality score
(train.eval_*), plus the post-hoc EMA snapshots (train.posthoc_ema_every). Kept apart so that
the loop does not depend on that code.

    from pixeldiffusion.run import default_hooks, train
    train(cfg, "runs/digits")                       # as the CLI does (pd.train is this)

    from pixeldiffusion.train import Hook, train    # the loop alone, or with hooks of your own
    train(cfg, "runs/x", hooks=[*default_hooks(cfg), Hook(100, my_hook)])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config
from .ema_snapshots import SnapshotRecorder
from .errors import ConfigError
from .generate import generate
from .images import save_grid
from .train import Hook, TrainResult, TrainState
from .train import train as train_loop


def train(cfg: Config, run_dir: str | Path | None = None, **kwargs: Any) -> TrainResult:
    """``train.train`` with ``default_hooks(cfg)``; the keyword arguments are that function's."""
    return train_loop(cfg, run_dir, hooks=default_hooks(cfg), **kwargs)


def default_hooks(cfg: Config) -> list[Hook]:
    """A sample grid every train.sample_every steps and the quality score every
    train.eval_every steps, each also at the end of the run; with train.posthoc_ema_every, the
    post-hoc EMA tracker (``posthoc_ema_hook``). A sample section the grids cannot draw (a
    classifier-free weight meant for autoguidance, which needs a guidance model) is a
    ConfigError before the first step, not at the first grid."""
    if cfg.sample.autoguidance_cfg != 1.0:
        raise ConfigError(f"config key 'sample.autoguidance_cfg' "
                          f"({cfg.sample.autoguidance_cfg:g}) applies only when sampling with a "
                          f"guidance model (sample or eval --guidance_model); training's sample "
                          f"grids have none, so leave it at 1 in a training config")
    hooks = [Hook(cfg.train.sample_every, save_sample_grid), eval_hook(cfg.train.eval_every)]
    if cfg.train.posthoc_ema_every:
        hooks.append(posthoc_ema_hook(cfg.train.posthoc_ema_every, cfg.train.posthoc_sigma_rels))
    return hooks


def posthoc_ema_hook(every: int, sigma_rels: Sequence[float]) -> Hook:
    """Post-hoc EMA (EDM2, Sec. 3): the power-function averages of ``sigma_rels`` updated after
    every step, snapshotted into RUN/ema_snapshots/ every ``every`` steps and at the end, kept
    in the checkpoints' training state (ema_snapshots.SnapshotRecorder)."""
    recorder = SnapshotRecorder(every, sigma_rels)
    return Hook(1, recorder, setup=recorder.setup)


def save_sample_grid(state: TrainState) -> None:
    """Main process: EMA samples (the ``sample`` config section) as RUN_DIR/samples/step-N.png,
    or samples/final.png at the end."""
    if not state.main:
        return
    name = "final.png" if state.done else f"step-{state.step:07d}.png"
    images = generate(state.ema, state.cfg, state.device).images
    state.grid = save_grid(images, state.run_dir / "samples" / name, nrow=state.cfg.sample.nrow)


def eval_hook(every: int) -> Hook:
    """Score EMA samples with ``evaluate.TrainingEval`` (train.eval_samples of them; 0 = off):
    the log line "eval at step N: ...", the logger's eval/* scalars and the bar's FID."""
    scorer = _Scorer()
    return Hook(every, scorer, setup=scorer.setup)


class _Scorer:
    def __init__(self) -> None:
        self.evaluator: Any = None  # evaluate.TrainingEval on the main process, when enabled

    def setup(self, state: TrainState) -> None:
        if state.main and state.cfg.train.eval_samples:
            from .evaluate import TrainingEval  # the metric stack only when a score is wanted

            self.evaluator = TrainingEval(state.cfg, state.device)

    def __call__(self, state: TrainState) -> None:
        if self.evaluator is None:
            return
        line, scalars = self.evaluator(state.ema, state.cfg)
        state.log(f"eval at step {state.step}: {line}")
        state.logger.log_scalars(scalars, state.step)
        for tag in ("eval/digit_fid", "eval/fid"):
            if tag in scalars:
                state.postfix[tag.split("/")[1].replace("_", "")] = f"{scalars[tag]:.1f}"
