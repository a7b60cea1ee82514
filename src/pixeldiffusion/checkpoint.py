"""Checkpoints: safetensors weights that sample on their own, plus a resumable training state.

Layout of a run directory::

    EXP_DIR/config.yaml
    EXP_DIR/checkpoints/step-0003000/weights.safetensors   raw weights "model.*" and EMA "ema.*";
                                                           metadata: config, step, version
    EXP_DIR/checkpoints/step-0003000/state.pt              optimizer, LR schedule, step, RNG
    EXP_DIR/checkpoints/latest                             name of the newest complete checkpoint

A checkpoint directory is written under a temporary name, fsync'ed and renamed into place; the
``latest`` pointer moves last. Nothing is ever unpickled: weights load with safetensors, the
training state with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from . import __version__
from .config import Config, from_dict
from .errors import CheckpointError
from .unet import UNet, build_unet

FORMAT = "pixeldiffusion/1"
WEIGHTS, STATE, LATEST = "weights.safetensors", "state.pt", "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, ema: nn.Module,
                    training_state: dict[str, Any], cfg: Config, keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` into ``run_dir/checkpoints`` atomically; keep the newest
    ``keep_last``. Returns the checkpoint directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"model.{k}": v for k, v in _state_dict_cpu(model).items()}
    tensors |= {f"ema.{k}": v for k, v in _state_dict_cpu(ema).items()}
    metadata = {"format": FORMAT, "pixeldiffusion_version": __version__, "step": str(step),
                "config": json.dumps(cfg.to_dict()),
                "weights": "model.* = raw training weights; ema.* = EMA weights (sample with them)"}
    save_file(tensors, tmp / WEIGHTS, metadata=metadata)
    torch.save(training_state, tmp / STATE)
    for name in (WEIGHTS, STATE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic_text(root / LATEST, final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / WEIGHTS).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint that ``latest`` names, else the newest complete one, else None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if pointer.is_file():
        named = pointer.parent / pointer.read_text().strip()
        if (named / WEIGHTS).is_file():
            return named
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_weights_path(path: str | Path) -> Path:
    """A weights file from a file, a checkpoint directory or a run directory (its newest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a .safetensors file, a "
                              f"checkpoint directory or a run directory (e.g. runs/exp-...)")
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    newest = latest_checkpoint(path)
    if newest is None:
        raise CheckpointError(f"'{path}' holds no checkpoint (no {WEIGHTS} found under it); "
                              f"train first or point -cp at a checkpoint")
    return newest / WEIGHTS


@dataclass
class LoadedCheckpoint:
    model: UNet
    config: Config
    step: int
    path: Path


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata, or a CheckpointError if the file is not a checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"'{path}' is not a readable safetensors checkpoint ({err}); it may "
                              f"be truncated or of another format") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is a safetensors file but not a pixeldiffusion "
                              f"checkpoint (no '{FORMAT}' metadata)")
    return metadata


def load_checkpoint(path: str | Path, *, use_ema: bool = True,
                    device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Build the UNet that a checkpoint describes and load its EMA (or raw) weights."""
    weights = resolve_weights_path(path)
    metadata = read_metadata(weights)
    try:
        cfg = from_dict(json.loads(metadata["config"]))
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"'{weights}' has no readable config in its metadata ({err})") \
            from None
    prefix = "ema." if use_ema else "model."
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"'{weights}' could not be read ({err}); it may be truncated") \
            from None
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"'{weights}' has no '{prefix}*' weights")
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    load_state_checked(model, state, str(weights))
    return LoadedCheckpoint(model.to(device).eval(), cfg, int(metadata.get("step", 0)), weights)


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict, but mismatches become one readable CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{title}: {', '.join(items[:5])}{more}")
        raise CheckpointError(f"'{source}' does not fit this model configuration; "
                              + "; ".join(parts))
    model.load_state_dict(state)


def load_training_state(checkpoint_dir: Path) -> dict[str, Any]:
    """The resumable state saved next to the weights (loaded without unpickling code)."""
    path = checkpoint_dir / STATE
    if not path.is_file():
        raise CheckpointError(f"'{checkpoint_dir}' has no {STATE}; it holds weights only and "
                              f"cannot resume training (it can still sample)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or hostile files
        raise CheckpointError(f"'{path}' could not be loaded safely ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None


def load_training_weights(checkpoint_dir: Path, model: nn.Module, ema: nn.Module) -> None:
    """Load raw and EMA weights of a checkpoint into the training modules."""
    weights = checkpoint_dir / WEIGHTS
    read_metadata(weights)
    tensors = load_file(str(weights))
    for prefix, module in (("model.", model), ("ema.", ema)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_state_checked(module, state, str(weights))
