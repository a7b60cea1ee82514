"""Pictures: tensors in [-1, 1] -> uint8 arrays -> grids and PNG files (written atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """[N, C, H, W] float in [-1, 1] -> uint8 [N, H, W, C] in 0..255 (outside values clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


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
    """Save ``image`` to ``path`` via a temporary file and a rename: never a half-written PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=save_kwargs.pop("format", None) or _format(path), **save_kwargs)
    os.replace(tmp, path)
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
