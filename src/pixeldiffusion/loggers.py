"""Where training scalars go (``train.logger``): TensorBoard event files in RUN_DIR/tensorboard,
a Weights & Biases run, or nowhere. A logger is two calls, so another backend is one class:

    logger.log_scalars({"train/loss": 0.031, "train/lr": 1e-3}, step)
    logger.close()
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import ConfigError, PixelDiffusionError


class ScalarLogger(Protocol):
    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Record each ``{tag: value}`` at training step ``step``."""

    def close(self) -> None:
        """Flush and finish; the logger is not used afterwards."""


class NullLogger:
    """``train.logger none``, and every process but the main one."""

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files in ``log_dir`` (``tensorboard --logdir RUN_DIR`` shows them)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """One Weights & Biases run per training process launch, named after the run directory,
    with the resolved config and the run directory as its config. Its files go to RUN_DIR/wandb
    (or $WANDB_DIR); WANDB_MODE=offline keeps them there without a network until ``wandb sync``.
    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any], project: str) -> None:
        wandb = _import_wandb()
        try:
            self.run = wandb.init(project=project, name=run_dir.name,
                                  dir=os.environ.get("WANDB_DIR") or str(run_dir),
                                  config={**config, "run_dir": str(run_dir.resolve())})
        except Exception as err:  # wandb raises its own types for login, network and settings
            raise PixelDiffusionError(
                f"wandb could not start a run ({type(err).__name__}: {err}); run `wandb login`, "
                f"or set WANDB_MODE=offline to log locally and `wandb sync` later") from None

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(f"config key 'train.logger' is wandb but the wandb package cannot be "
                          f"imported ({err}); pip install wandb, or use --train.logger "
                          f"tensorboard") from None
    return wandb


def check_logger(kind: str) -> None:
    """Fail now, with the fix, if the package ``kind`` needs is missing (before a run starts)."""
    if kind == "wandb":
        _import_wandb()


def make_logger(kind: str, run_dir: Path, *, config: Mapping[str, Any],
                project: str = "pixeldiffusion") -> ScalarLogger:
    """The logger ``kind`` (config.LOGGERS) for the run in ``run_dir``; ``config`` (the resolved
    config as a dict) and ``project`` are for wandb."""
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir / "tensorboard")
    if kind == "wandb":
        return WandbLogger(run_dir, config, project)
    return NullLogger()
