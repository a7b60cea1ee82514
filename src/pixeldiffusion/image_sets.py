"""Sets of images that ``pixeldiffusion eval`` scores or compares against: a ``samples.npz`` or a
folder of image files, read into one float tensor.

``samples.npz`` is what ``pixeldiffusion sample --save_dir`` writes: ``images`` uint8
[N, H, W, C] (C = 1 or 3; [N, H, W] is read as grey) and optional integer ``labels`` [N].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import DataError
from .images import uint8_to_float

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass
class Images:
    """Images to score: x float32 [N, C, H, W] in [-1, 1], labels int64 [N] or None."""

    x: Tensor
    labels: Tensor | None
    source: str

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.x.shape[2]), int(self.x.shape[3])


def from_uint8_nhwc(pixels: np.ndarray) -> Tensor:
    """uint8 [N, H, W, C] in [0, 255] -> float32 [N, C, H, W] in [-1, 1]."""
    return uint8_to_float(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickled objects), or a DataError if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise DataError(f"'{path}' is not a readable .npz file ({err})") from None


def npz_pixels(path: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The ``images`` array of a samples.npz as uint8 [N, H, W, C], checked."""
    if "images" not in arrays:
        raise DataError(f"'{path}' has no 'images' array (it has {sorted(arrays)}); write one "
                        f"with pixeldiffusion sample --save_dir DIR")
    images = arrays["images"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise DataError(f"'{path}': 'images' must be uint8 [N, H, W, C] with C 1 or 3 and N > 0; "
                        f"got shape {list(images.shape)}")
    if images.dtype != np.uint8:
        raise DataError(f"'{path}': 'images' must be uint8 pixels 0..255; got {images.dtype}")
    return images


def npz_labels(path: Path, arrays: dict[str, np.ndarray], n: int) -> Tensor | None:
    """The optional ``labels`` array of a samples.npz as int64 [n], checked."""
    labels = arrays.get("labels")
    if labels is None:
        return None
    if labels.shape != (n,):
        raise DataError(f"'{path}': 'labels' has shape {list(labels.shape)} but there are {n} "
                        f"images; it must be [N]")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'{path}': 'labels' must be integer class indices; got {labels.dtype} "
                        f"(e.g. {labels.flat[0].item()!r}); save them as integers, e.g. "
                        f"labels=np.asarray(indices, dtype=np.int64), or leave 'labels' out")
    return torch.from_numpy(labels.astype(np.int64))


def load_npz(path: str | Path) -> Images:
    """``samples.npz``: ``images`` uint8 [N, H, W, C] (C = 1 or 3), optional ``labels`` [N]."""
    path = Path(path)
    arrays = read_npz(path)
    pixels = npz_pixels(path, arrays)
    return Images(from_uint8_nhwc(pixels), npz_labels(path, arrays, len(pixels)), str(path))


def _one_size_and_mode(root: Path, files: list[Path]) -> int:
    """The channel count (1 or 3) shared by every file; a DataError naming two files that differ
    in size or in grey/colour otherwise."""
    sizes: dict[tuple[int, int], Path] = {}
    modes: dict[int, Path] = {}
    for f in files:
        try:
            with Image.open(f) as img:
                sizes.setdefault(img.size, f)
                modes.setdefault(1 if img.mode in GREY_MODES else 3, f)
        except Exception as err:  # Pillow raises many types on a bad file
            raise DataError(f"cannot read image '{f}' ({err}); remove or fix it") from None
    if len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise DataError(f"images in '{root}' have different sizes ('{f1.name}' is {s1[0]}x{s1[1]},"
                        f" '{f2.name}' is {s2[0]}x{s2[1]}); resize them to one size first")
    if len(modes) > 1:
        raise DataError(f"images in '{root}' mix grey and colour ('{modes[1].name}' is grey, "
                        f"'{modes[3].name}' is colour); convert them to one channel count first")
    return next(iter(modes))


def load_folder(path: str | Path) -> Images:
    """Every image Pillow reads under ``path`` (recursive); all must share one size and be all
    grey or all colour, else a DataError naming two files that differ."""
    from .data import _image_files, _to_mode

    root = Path(path)
    files = _image_files(root) if root.is_dir() else []
    if not files:
        raise DataError(f"no images found in '{root}'; point eval at a folder of .png/.jpg "
                        f"files, a samples.npz or a checkpoint")
    channels = _one_size_and_mode(root, files)
    pixels = []
    for f in files:
        with Image.open(f) as img:
            pixels.append(np.asarray(_to_mode(img, channels)).reshape(img.size[1], img.size[0],
                                                                        channels))
    return Images(from_uint8_nhwc(np.stack(pixels)), None, str(root))


def load_images(path: str | Path) -> Images:
    """A samples.npz (by its suffix) or a folder of images."""
    path = Path(path)
    return load_npz(path) if path.suffix == ".npz" else load_folder(path)


def is_checkpoint(path: Path) -> bool:
    """A .safetensors file, a checkpoint directory or a run directory with checkpoints."""
    return (path.is_file() and path.suffix == ".safetensors") or \
        (path / "weights.safetensors").is_file() or (path / "checkpoints").is_dir()
