"""Reference statistics: the features of real images that samples are compared with.

A reference (``reference_features``) is one of

- a data set name: ``digits`` (the 4,000 held-in built-in digits), ``digits-heldout``, ``mnist``,
  ``cifar10``, ``celeba64``;
- a folder of images, or an images .npz (``images`` uint8 [N, H, W, C], like the
  ``samples.npz`` that ``pixeldiffusion sample`` writes); both are fitted to the resolution and
  channels of the images being scored, as a data set is;
- a statistics .npz written by ``save_stats`` (``eval --save_stats``), told apart from an
  images .npz by its ``mu`` and ``sigma`` arrays.

Computed features are cached on disk under a key made of the reference (for a folder or an npz:
its name and a fingerprint of its files), the resolution, the channels and the extractor's key
(which changes with its weights), so changing any of them recomputes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import metrics
from .errors import DataError, did_you_mean
from .features import Extractor, extract_batched
from .files import atomic_write
from .image_sets import npz_pixels, read_npz
from .images import uint8_to_float

CACHE_ENV = "PIXELDIFFUSION_CACHE"
DATASET_REFS = ("digits", "digits-heldout", "mnist", "cifar10", "celeba64")
STATS_KEYS = ("mu", "sigma")  # what save_stats writes besides features, radii and meta


def cache_dir() -> Path:
    """$PIXELDIFFUSION_CACHE/stats, else ~/.cache/pixeldiffusion/stats."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pixeldiffusion"
    return Path(base) / "stats"


@dataclass
class Reference:
    """Reference features of real images, with what they are: features float32 [M, D] (M may be
    0 for a statistics file saved without them), their Gaussian statistics, the extractor key,
    and the resolution and channels the images had (0 = unknown)."""

    name: str
    features: np.ndarray
    stats: metrics.GaussianStats
    extractor_key: str
    resolution: int
    channels: int
    cached: Path | None = None
    known_radii: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.stats.n

    @property
    def radii(self) -> np.ndarray:
        """k=3 nearest-neighbour radii of the reference features float64 [M] (computed once)."""
        if self.known_radii is None:
            self.known_radii = metrics.knn_radii(self.features, 3)
        return self.known_radii


def _fingerprint(root: Path, files: list[Path]) -> str:
    """12 hex digits that change when any file's name, size or modification time changes."""
    sha = hashlib.sha256()
    for f in files:
        st = f.stat()
        sha.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return sha.hexdigest()[:12]


def reference_name(ref: str) -> str:
    """The name a reference is cached under: a data set's own name, else ``folder-NAME-HASH`` or
    ``npz-NAME-HASH`` with a fingerprint of the files."""
    from .data import _image_files

    if ref in DATASET_REFS:
        return ref
    path = Path(ref).expanduser()
    if path.is_dir():
        return f"folder-{path.resolve().name}-{_fingerprint(path, _image_files(path))}"
    if path.suffix == ".npz" and path.is_file():
        return f"npz-{path.stem}-{_fingerprint(path.parent, [path])}"
    raise DataError(f"unknown reference '{ref}'; {did_you_mean(ref, DATASET_REFS)}use one of "
                    f"{', '.join(DATASET_REFS)}, an image folder, an images .npz or a statistics "
                    f".npz")


def cache_key(name: str, resolution: int, channels: int, extractor_key: str) -> str:
    """File name of a reference's cached features: data set, resolution, channels, extractor."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{safe}-{resolution}px-{channels}ch-{extractor_key}.npz"


def _npz_reference_images(path: Path, resolution: int, channels: int) -> Tensor:
    """An images .npz fitted like a data set: float32 [M, channels, resolution, resolution]."""
    from .data import _fit

    pixels = npz_pixels(path, read_npz(path))
    if pixels.shape[1] != pixels.shape[2]:
        raise DataError(f"the reference images in '{path}' are {pixels.shape[2]}x"
                        f"{pixels.shape[1]}; a reference must be square, crop them first")
    fitted = _fit(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), resolution, channels)
    return uint8_to_float(fitted)


def reference_images(name: str, resolution: int, channels: int,
                     data_root: str | Path = "data") -> Tensor:
    """Real images of a reference (a data set name, an image folder or an images .npz):
    float32 [M, channels, resolution, resolution] in [-1, 1]."""
    from .config import DataConfig
    from .data import load_dataset
    from .digit_classifier import digit_splits

    if name.endswith(".npz"):
        return _npz_reference_images(Path(name).expanduser(), resolution, channels)
    dataset_name = "digits" if name in ("digits", "digits-heldout") else name
    if dataset_name in DATASET_REFS:
        cfg = DataConfig(dataset=dataset_name, root=str(data_root), image_size=resolution,
                         channels=channels)
    else:
        cfg = DataConfig(dataset="folder", root=str(name), image_size=resolution,
                         channels=channels)
    dataset = load_dataset(cfg)
    if hasattr(dataset, "images"):
        pixels = dataset.images
        if dataset_name == "digits":
            held_in, held_out = digit_splits(dataset.labels.numpy())
            pixels = pixels[torch.from_numpy(held_out if name == "digits-heldout" else held_in)]
        return uint8_to_float(np.asarray(pixels))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def is_stats_file(arrays: dict[str, np.ndarray]) -> bool:
    """Whether the arrays of an .npz are reference statistics (``mu`` and ``sigma``)."""
    return all(k in arrays for k in STATS_KEYS)


def stats_from_arrays(arrays: dict[str, np.ndarray], path: Path,
                      extractor: Extractor) -> Reference:
    """A Reference from the arrays of a statistics file, checked against ``extractor``."""
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    key = meta.get("extractor", "unknown")
    if key != extractor.key:
        raise DataError(f"statistics file '{path}' was made with extractor '{key}', but this "
                        f"evaluation uses '{extractor.key}'; recompute it with --extractor "
                        f"{extractor.name} --save_stats")
    features = arrays.get("features", np.zeros((0, extractor.dim), np.float32))
    stats = metrics.GaussianStats(arrays["mu"].astype(np.float64),
                                  arrays["sigma"].astype(np.float64), int(meta.get("n", 0)))
    radii = arrays.get("radii")
    return Reference(meta.get("reference", str(path)), features, stats, key,
                     int(meta.get("resolution", 0)), int(meta.get("channels", 0)), path,
                     radii if radii is not None and len(radii) == len(features) else None)


def load_stats_file(path: Path, extractor: Extractor) -> Reference:
    """A statistics file written by ``save_stats`` (or any npz with ``mu``/``sigma``)."""
    arrays = read_npz(path)
    if not is_stats_file(arrays):
        raise DataError(f"'{path}' has no 'mu' and 'sigma' arrays; make one with "
                        f"pixeldiffusion eval ... --save_stats PATH")
    return stats_from_arrays(arrays, path, extractor)


def save_stats(reference: Reference, path: str | Path) -> Path:
    """Write a reference's features, mean, covariance and what made them (npz, atomically)."""
    path = Path(path)
    meta = {"reference": reference.name, "resolution": reference.resolution,
            "channels": reference.channels, "extractor": reference.extractor_key,
            "n": reference.n}
    radii = reference.radii if len(reference.features) > 3 else np.zeros(0)
    # np.savez appends ".npz" to a path without it, so it writes to an open file instead
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=reference.features.astype(np.float32), mu=reference.stats.mu,
                 sigma=reference.stats.sigma, radii=radii, meta=np.array(json.dumps(meta)))
    return path


def reference_features(ref: str, extractor: Extractor, *, resolution: int, channels: int,
                       data_root: str | Path = "data", use_cache: bool = True) -> Reference:
    """The reference ``ref`` (data set name, image folder, images .npz or statistics .npz) as
    features, from the on-disk cache when the same reference, resolution, channels and extractor
    were seen before."""
    path = Path(ref).expanduser()
    if path.suffix == ".npz" and path.is_file():
        arrays = read_npz(path)
        if is_stats_file(arrays):
            return stats_from_arrays(arrays, path, extractor)
        if "images" not in arrays:
            raise DataError(f"'{path}' holds neither reference statistics ('mu' and 'sigma', "
                            f"written by eval --save_stats) nor images ('images', written by "
                            f"sample --save_dir); it has {sorted(arrays)}")
    name = reference_name(ref)
    cached = cache_dir() / cache_key(name, resolution, channels, extractor.key)
    if use_cache and cached.is_file():
        reference = load_stats_file(cached, extractor)
        reference.cached = cached
        return reference
    images = reference_images(ref if ref in DATASET_REFS else str(path), resolution, channels,
                              data_root)
    if len(images) < 2:
        raise DataError(f"the reference '{ref}' has {len(images)} image(s); its statistics need "
                        f"at least 2 (and thousands for a stable FID), add more images")
    features = extract_batched(extractor, images).features.numpy()
    reference = Reference(name, features, metrics.gaussian_stats(features), extractor.key,
                          resolution, channels)
    if use_cache:
        reference.cached = save_stats(reference, cached)
    return reference
