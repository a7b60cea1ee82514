"""Pictures: tensors in [-1, 1] <-> uint8 pixels -> grids and PNG files (written atomically).

The one conversion between the model's range and pixels: x = p / 127.5 - 1, so 0 -> -1 and
255 -> 1 (``uint8_to_float``), and back p = round((x + 1) 127.5) (``float_to_uint8``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .files import atomic_write


def uint8_to_float(pixels: Tensor | np.ndarray) -> Tensor:
    """uint8 pixels in 0..255 (any shape) -> float32 in [-1, 1] of the same shape.

    A numpy array is converted in numpy, on one thread: torch's multi-threaded kernels stall on
    small tensors when the cores are busy (the data loader's batches)."""
    if isinstance(pixels, np.ndarray):
        x = pixels.astype(np.float32)
        x /= 127.5
        x -= 1.0
        return torch.from_numpy(x)
    return pixels.float().div_(127.5).sub_(1.0)


def float_to_uint8(x: Tensor) -> Tensor:
    """float in [-1, 1] (any shape) -> uint8 pixels in 0..255 of the same shape and device,
    rounded to the nearest; values outside [-1, 1] are clipped."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(x: Tensor) -> np.ndarray:
    """[N, C, H, W] float in [-1, 1] -> uint8 [N, H, W, C] pictures in 0..255 (PIL's layout)."""
    return float_to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+p)+p, nrow*(W+p)+p, C] picture, row by row."""
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c),
                   pad_value, dtype=np.uint8)
    for k in range(n):
        top = padding + (k // ncol) * (h + padding)
        left = padding + (k % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = images[k]
    return grid


def to_pil(image: np.ndarray, grayscale: bool = False) -> Image.Image:
    """uint8 [H, W, C] with C in {1, 3} -> PIL image (mode L or RGB)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return pil.convert("L") if grayscale else pil


def atomic_save(image: Image.Image, path: str | Path, **save_kwargs) -> Path:
    """Save ``image`` to ``path`` via a temporary file and a rename: never a half-written PNG.
    No fsync: a picture lost to a power cut is redrawn, and a run writes many."""
    path = Path(path)
    with atomic_write(path, fsync=False) as tmp:
        image.save(tmp, format=save_kwargs.pop("format", None) or _format(path), **save_kwargs)
    return path


def _format(path: Path) -> str:
    ext = path.suffix.lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".gif": "GIF", ".webp": "WEBP"}.get(ext, "PNG")


def save_grid(x: Tensor, path: str | Path, nrow: int = 8, grayscale: bool = False) -> Path:
    """Save a batch [N, C, H, W] in [-1, 1] as one grid picture at ``path``."""
    return atomic_save(to_pil(make_grid(to_uint8(x), nrow), grayscale), path)


def save_gif(frames: Tensor, path: str | Path, nrow: int = 8, grayscale: bool = False,
             duration_ms: int = 80, hold_ms: int = 1500) -> Path:
    """An animated GIF of a sampling chain: frames [N, F, C, H, W] in [-1, 1] (N samples, F steps)
    -> F grid pictures of the N samples, the last one held for ``hold_ms``; loops forever."""
    pictures = [to_pil(make_grid(to_uint8(frames[:, f]), nrow), grayscale)
                for f in range(frames.shape[1])]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_ms]
    return atomic_save(pictures[0], path, format="GIF", save_all=True,
                       append_images=pictures[1:], duration=durations, loop=0)
