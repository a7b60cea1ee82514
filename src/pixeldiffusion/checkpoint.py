"""Checkpoints: safetensors weights that sample on their own, plus a resumable training state.

Layout of a run directory::

    EXP_DIR/config.yaml
    EXP_DIR/checkpoints/step-0003000/weights.safetensors   raw weights "model.*" and EMA "ema.*";
                                                           metadata: config, step, version
    EXP_DIR/checkpoints/step-0003000/state.pt              optimizer, LR schedule, step, RNG
    EXP_DIR/checkpoints/latest                             name of the newest complete checkpoint
    EXP_DIR/checkpoints/best                               name and score of the best one
    EXP_DIR/train.lock                                     held while a run trains (flock)

A checkpoint directory is written under a temporary name, fsync'ed and renamed into place; the
``latest`` pointer moves last, so a crash or a full disk mid-save leaves the previous checkpoint
as the newest. Rotation keeps the newest ``keep_last`` plus the one ``best`` names. Nothing is ever
unpickled: weights load with safetensors, the training state with
``torch.load(weights_only=True)``; ``find_resumable`` skips a corrupt newest checkpoint for the
newest one that loads.

A checkpoint is checked before anything is allocated for it (docs/security.md): its metadata
config must pass ``config.check_architecture`` (which bounds the model's size), the tensor shapes
in the safetensors header must be the ones that config builds (compared on the meta device), a
``state.pt`` must not inflate beyond its size on disk, ``latest`` and ``best`` must name a
checkpoint directory of the run, and weights with NaN/Inf values are refused.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from . import __version__
from .config import Config, from_dict
from .errors import CheckpointError, ConfigError, PixelDiffusionError
from .files import atomic_write, write_text_atomic
from .unet import UNet, build_unet

FORMAT = "pixeldiffusion/1"
WEIGHTS, STATE, LATEST, BEST = "weights.safetensors", "state.pt", "latest", "best"
LOCK = "train.lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
CHECKPOINT_NAME = re.compile(r"step-\d{7,}")  # what latest / best may name
ALLOW_NONFINITE_ENV = "PIXELDIFFUSION_ALLOW_NONFINITE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, ema: nn.Module,
                    training_state: dict[str, Any], cfg: Config, keep_last: int = 3, *,
                    score: float | None = None) -> Path:
    """Write checkpoint ``step`` into ``run_dir/checkpoints`` atomically and return its directory.

    The files go to ``.step-N.tmp``, are fsync'ed and the directory is renamed into place; then
    ``latest`` moves. A lower ``score`` than the recorded best (e.g. the mean training loss since
    the previous save) makes it the ``best``. Afterwards only the newest ``keep_last`` and the
    best are kept. A failed write (a full disk) removes the partial files and raises a
    ``CheckpointError`` that names the checkpoint ``latest`` still points to.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    for stale in root.glob(".step-*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tensors = {f"model.{k}": v for k, v in _state_dict_cpu(model).items()}
    tensors |= {f"ema.{k}": v for k, v in _state_dict_cpu(ema).items()}
    metadata = {"format": FORMAT, "pixeldiffusion_version": __version__, "step": str(step),
                "config": json.dumps(cfg.to_dict()),
                "weights": "model.* = raw training weights; ema.* = EMA weights (sample with them)"}
    try:
        tmp.mkdir()
        save_file(tensors, tmp / WEIGHTS, metadata=metadata)
        torch.save(training_state, tmp / STATE)
        for name in (WEIGHTS, STATE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
    except (OSError, SafetensorError, RuntimeError) as err:
        free = shutil.disk_usage(root).free  # before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(root, final, err, free) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    try:
        write_text_atomic(root / LATEST, final.name + "\n")
        if score is not None and score == score and score < best_checkpoint(run_dir)[1]:
            write_text_atomic(root / BEST, f"{final.name} {score!r}\n")
    except OSError as err:  # atomic_write has removed its temporary file
        raise _write_error(root, final, err, shutil.disk_usage(root).free) from None
    prune_checkpoints(run_dir, keep_last)
    return final


def save_ema_weights(path: str | Path, ema_state: dict[str, torch.Tensor], cfg: Config,
                     step: int, *, note: str, metadata: dict[str, str] | None = None) -> Path:
    """A weights-only checkpoint: ``ema_state`` as ``ema.*`` with the config metadata, the file
    that ``load_checkpoint`` (so sample, eval, serve and convert) takes like any other; written
    atomically. ``note`` says where the weights come from; ``metadata`` adds string entries."""
    tensors = {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema_state.items()}
    header = {**(metadata or {}), "format": FORMAT, "pixeldiffusion_version": __version__,
              "step": str(step), "config": json.dumps(cfg.to_dict()), "weights": note}
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def _write_error(root: Path, final: Path, err: BaseException, free: int) -> CheckpointError:
    """One sentence for a failed checkpoint write: what, why, what is still there, what to do.
    ``free`` is the space left on the disk when it failed (torch.save's error has no errno)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    reason = lines[0] if lines else type(err).__name__
    full = getattr(err, "errno", None) in DISK_FULL or "No space left" in reason or free < 1 << 20
    previous = latest_checkpoint(root.parent)
    kept = (f"'latest' still names {previous}, which is intact" if previous is not None
            else "no earlier checkpoint exists")
    cause = (f"the disk is full ({free / 2**20:.1f} MiB free in {root})" if full
             else f"the write failed ({reason})")
    fix = ("free some space or lower --train.keep_last" if full
           else "check that the run directory is writable")
    return CheckpointError(f"could not save checkpoint {final.name}: {cause}; its partial files "
                           f"were removed and {kept}. To continue, {fix} and run: "
                           f"pixeldiffusion train -e {root.parent} --resume auto")


def _read_pointer(pointer: Path) -> str | None:
    """The text of a ``latest`` / ``best`` file (its first 256 bytes), or None if unreadable."""
    try:
        with open(pointer, encoding="utf-8", errors="replace") as f:
            return f.read(256)
    except OSError:
        return None


def _pointed(pointer: Path, name: str) -> Path:
    """The checkpoint directory that ``pointer`` names: a ``step-N`` directory directly inside
    the pointer's own folder, never a path elsewhere (nor a link out of the run)."""
    root = pointer.parent
    named = root / name
    if not CHECKPOINT_NAME.fullmatch(name) or named.resolve().parent != root.resolve():
        raise CheckpointError(f"'{pointer}' names {name[:60]!r}, which is not a checkpoint "
                              f"directory of this run; it may only name a step-NNNNNNN folder "
                              f"in {root} (delete the file to use the newest checkpoint)")
    return named


def best_checkpoint(run_dir: str | Path) -> tuple[Path | None, float]:
    """(the checkpoint ``best`` names, its score), or (None, inf) when there is none."""
    pointer = Path(run_dir) / "checkpoints" / BEST
    text = _read_pointer(pointer)
    try:
        name, score = (text or "").split()
        best = float(score)
    except ValueError:
        return None, float("inf")
    named = _pointed(pointer, name)
    return (named, best) if (named / WEIGHTS).is_file() else (None, float("inf"))


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all checkpoints but the newest ``keep_last``, the one ``latest`` names and the
    best."""
    keep = {latest_checkpoint(run_dir), best_checkpoint(run_dir)[0]}
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / WEIGHTS).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint that ``latest`` names, else the newest complete one, else None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    text = _read_pointer(pointer) if pointer.is_file() else None
    if text and text.strip():
        named = _pointed(pointer, text.strip())
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
        pickled = (" pixeldiffusion loads weights only from .safetensors files and never "
                   "unpickles .pt/.pth/.ckpt files, which can run code when loaded"
                   if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".pkl") else "")
        raise CheckpointError(f"'{path}' is not a readable safetensors checkpoint ({err}); it may "
                              f"be truncated or of another format.{pickled}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is a safetensors file but not a pixeldiffusion "
                              f"checkpoint (no '{FORMAT}' metadata)")
    return metadata


def load_checkpoint(path: str | Path, *, use_ema: bool = True,
                    device: torch.device | str = "cpu",
                    allow_nonfinite: bool = False) -> LoadedCheckpoint:
    """Build the UNet that a checkpoint describes and load its EMA (or raw) weights.

    Nothing is allocated before the checks pass: the metadata config must pass
    ``config.check_architecture`` (its size limits included) and the tensor shapes in the file's
    header must be the model's, compared on the meta device. Weights with NaN or Inf values are
    refused unless ``allow_nonfinite`` (or PIXELDIFFUSION_ALLOW_NONFINITE=1).
    """
    weights = resolve_weights_path(path)
    metadata = read_metadata(weights)
    cfg = _config_of(weights, metadata)
    prefix = "ema." if use_ema else "model."
    with torch.device("meta"):
        model = build_unet(cfg.model, in_channels=cfg.data.channels,
                           image_size=cfg.data.image_size)
    shapes = {k[len(prefix):]: shape for k, shape in _header_shapes(weights).items()
              if k.startswith(prefix)}
    if not shapes:
        raise CheckpointError(f"'{weights}' has no '{prefix}*' weights")
    _check_shapes(model, shapes, str(weights))
    state = _read_tensors(weights, prefix)
    if not (allow_nonfinite or os.environ.get(ALLOW_NONFINITE_ENV) == "1"):
        _check_finite(state, str(weights), prefix)
    model.load_state_dict(state, assign=True)
    return LoadedCheckpoint(model.to(device).eval(), cfg, int(metadata.get("step", 0)), weights)


def _config_of(weights: Path, metadata: dict[str, str]) -> Config:
    """The checked config stored in a checkpoint's metadata."""
    try:
        raw = json.loads(metadata["config"])
        return from_dict(_upgrade(raw, metadata.get("pixeldiffusion_version", "")))
    except (KeyError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"'{weights}' has no readable config in its metadata "
                              f"({type(err).__name__})") from None
    except ConfigError as err:
        raise CheckpointError(f"'{weights}' describes a model that is refused: {err}") from None


def _upgrade(raw: Any, version: str) -> Any:
    """A config saved by pixeldiffusion 0.1, read as today's. There ``sample.eta`` reached DDIM
    alone and every config stored its default 0.0, which would now also make euler_ancestral and
    dpmpp_2m_sde deterministic: 0.0 becomes null (each sampler's own default). And every config
    stored ``sample.precision`` fp32, the only default then: it becomes auto, the default now
    (a choice of the machine that samples, not of the run)."""
    sample = raw.get("sample") if isinstance(raw, dict) else None
    if not (version.startswith("0.1.") and isinstance(sample, dict)):
        return raw
    if sample.get("eta") == 0.0:
        sample["eta"] = None
    if sample.get("precision") == "fp32":
        sample["precision"] = "auto"
    return raw


def _header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors header, without reading any data."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"'{weights}' could not be read ({err}); it may be truncated") \
            from None


def _read_tensors(weights: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix`` (prefix removed), as float32 on the CPU."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key[len(prefix):]: f.get_tensor(key).float()
                    for key in f.keys() if key.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"'{weights}' could not be read ({err}); it may be truncated") \
            from None


def _check_finite(state: dict[str, torch.Tensor], source: str, prefix: str) -> None:
    bad = {key: int((~torch.isfinite(value)).sum()) for key, value in state.items()}
    bad = {key: count for key, count in bad.items() if count}
    if bad:
        first = next(iter(bad))
        raise CheckpointError(f"'{source}' has {sum(bad.values()):,} NaN/Inf values in its "
                              f"{prefix}* weights (first in {prefix}{first}), so it would sample "
                              f"only NaN; the training diverged before this save: use an earlier "
                              f"checkpoint, or set {ALLOW_NONFINITE_ENV}=1 to load it anyway")


def _check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """A CheckpointError listing missing, unexpected and mis-shaped tensors, if any."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    mismatched = [f"{k}: checkpoint {shapes[k]} vs model {own[k]}"
                  for k in own if k in shapes and shapes[k] != own[k]]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape", mismatched)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{title}: {', '.join(items[:5])}{more}")
        raise CheckpointError(f"'{source}' does not fit this model configuration; "
                              + "; ".join(parts))


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict, but mismatches become one readable CheckpointError."""
    _check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state)


def load_torch_file(path: Path) -> Any:
    """``torch.load`` of a file from outside (a training state, a diffusers ``.bin``), refused
    before loading when its zip entries inflate beyond the file's own size (``torch.save``
    never compresses, so only a crafted file does), and without unpickling any code."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"'{path}' could not be loaded safely: it is not a torch.save "
                              f"archive ({err})") from None
    size = path.stat().st_size
    if inflated > size:
        raise CheckpointError(f"'{path}' could not be loaded safely: its entries inflate to "
                              f"{inflated / 2**20:,.0f} MiB from a {size / 2**20:,.1f} MiB file, "
                              f"which torch.save never writes; use another checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or hostile files
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = lines[0] if lines and "eights only" not in lines[0] else \
            "it holds objects other than tensors and plain values, which are never unpickled"
        raise CheckpointError(f"'{path}' could not be loaded safely ({type(err).__name__}: "
                              f"{reason[:200]})") from None


def load_training_state(checkpoint_dir: Path) -> dict[str, Any]:
    """The resumable state saved next to the weights (loaded without unpickling code)."""
    path = checkpoint_dir / STATE
    if not path.is_file():
        raise CheckpointError(f"'{checkpoint_dir}' has no {STATE}; it holds weights only and "
                              f"cannot resume training (it can still sample)")
    return load_torch_file(path)


def load_training_weights(checkpoint_dir: Path, model: nn.Module, ema: nn.Module,
                          tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Load raw and EMA weights of a checkpoint (or its already read ``tensors``) into the
    training modules; a mismatch raises a CheckpointError listing the keys and shapes."""
    weights = checkpoint_dir / WEIGHTS
    if tensors is None:
        tensors = load_resume_point(checkpoint_dir).tensors
    for prefix, module in (("model.", model), ("ema.", ema)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_state_checked(module, state, str(weights))


# --------------------------------------------------------------------------- resuming


@dataclass
class ResumePoint:
    """A checkpoint verified to load: its directory, training state, tensors, and the newer
    checkpoints that were skipped because they did not load (path, reason)."""

    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def load_resume_point(checkpoint_dir: Path) -> ResumePoint:
    """Read and check every file of one checkpoint; a ``CheckpointError`` says what is wrong."""
    weights = checkpoint_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"'{checkpoint_dir}' has no {WEIGHTS}")
    read_metadata(weights)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"'{weights}' could not be read ({err}); it may be truncated") \
            from None
    return ResumePoint(checkpoint_dir, load_training_state(checkpoint_dir), tensors)


def find_resumable(run_dir: str | Path) -> ResumePoint | None:
    """The newest checkpoint of ``run_dir`` that loads completely (the one ``latest`` names
    first), with the newer ones that did not in ``skipped``; None if the run has none at all.

    Raises a ``CheckpointError`` naming every checkpoint and its fault when none loads.
    """
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    candidates = [newest] + [p for p in reversed(list_checkpoints(run_dir)) if p != newest]
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            point = load_resume_point(path)
        except CheckpointError as err:
            skipped.append((path, str(err)))
            continue
        point.skipped = skipped
        return point
    raise CheckpointError(f"no checkpoint in '{run_dir}' can be loaded: "
                          + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                          + ". Start a new run with another -e EXP_DIR")


# --------------------------------------------------------------------------- run lock


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir/train.lock`` (an exclusive ``flock``) while a run trains in ``run_dir``.

    The kernel releases the lock when the process ends, however it ends (kill -9 included), so a
    stale file never blocks a later run; a live holder makes this raise a PixelDiffusionError
    naming its pid. ``run_dir`` is created if needed and removed again if it is still empty on
    exit. Without ``fcntl`` (Windows) the directory is not locked.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not protected against each other there
        yield path
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PixelDiffusionError(
                f"another training run ({holder}) is using '{run_dir}' (it holds {path}); wait "
                f"for it to finish or stop it, then continue it with --resume auto, or pass "
                f"another -e EXP_DIR") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file that its previous holder unlinked after we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            try:
                run_dir.rmdir()  # only if nothing else was written
            except OSError:
                pass
