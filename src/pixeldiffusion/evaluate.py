"""``pixeldiffusion eval``: score images against reference statistics, one result or a sweep.

Inputs (``load_input``): a checkpoint (samples are drawn first, with any sampler, steps and
guidance), a folder of images, or a ``samples.npz`` (``images`` uint8 [N, H, W, C], optional
``labels`` [N]). References (``reference_features``): a data set name (``digits`` = the 4,000
held-in built-in digits, ``digits-heldout``, ``mnist``, ``cifar10``, ``celeba64``), an image
folder, or a statistics file saved by ``--save_stats``. Reference features are cached on disk
under a key made of the data set, the resolution, the channels and the feature extractor (with
its weights' hash), so changing any of them recomputes.

Extractors: ``digits`` (offline, ``digit_classifier.py``: "digit-FID", confidence, class balance,
class accuracy) and ``inception`` (Inception-v3 from the optional ``torch-fidelity`` package: FID,
IS, KID, precision/recall). The metric math is ``metrics.py``. Every result carries a
``Provenance`` (extractor and weights, sample count, reference, resize, warnings).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import metrics
from .errors import DataError, PixelDiffusionError

INCEPTION_ENV = "PIXELDIFFUSION_INCEPTION_WEIGHTS"
CACHE_ENV = "PIXELDIFFUSION_CACHE"
DATASET_REFS = ("digits", "digits-heldout", "mnist", "cifar10", "celeba64")
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


# --------------------------------------------------------------------------- feature extractors


@dataclass
class Features:
    """What an extractor returns for N images: features float32 [N, D], logits [N, K] or None."""

    features: Tensor
    logits: Tensor | None


@dataclass
class Extractor:
    """A feature extractor: ``fn(images [N, C, H, W] in [-1, 1]) -> Features``.

    ``key`` names it in cache keys (it changes with the weights); ``papers_samples`` is the sample
    count published numbers use, below which results get a warning.
    """

    name: str
    key: str
    description: str
    dim: int
    papers_samples: int
    fn: Callable[[Tensor], Features]
    input_size: int | None = None  # the size images are resized to, when fixed

    def __call__(self, images: Tensor) -> Features:
        return self.fn(images)


def digit_extractor(device: torch.device | str = "cpu") -> Extractor:
    """The shipped digit classifier: 64-d penultimate features and 10 logits, offline."""
    from . import digit_classifier as dc

    model = dc.load_digit_classifier(device)

    def fn(images: Tensor) -> Features:
        features, logits = dc.digit_outputs(model, dc.to_digit_input(images))
        return Features(features, logits)

    return Extractor("digits", f"digitcnn-{dc.weights_digest()}", dc.describe(), dc.FEATURE_DIM,
                     1000, fn, dc.IMAGE_SIZE)


def _torchvision_hint() -> str:
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    vision = f"0.{minor + 15}" if major == 2 else "the matching version"
    return (f"torch-fidelity imports torchvision; install the torchvision built for your torch "
            f"{torch.__version__} (torch {major}.{minor} pairs with torchvision {vision}), e.g. "
            f"pip install torchvision=={vision}.* --index-url "
            f"https://download.pytorch.org/whl/cpu (or the CUDA index you installed torch from)")


def _import_fidelity() -> Any:
    """torch_fidelity's Inception module, or a PixelDiffusionError saying what to install."""
    try:
        import torch_fidelity  # noqa: F401
        from torch_fidelity import feature_extractor_inceptionv3 as inception
    except ModuleNotFoundError as err:
        if err.name == "torch_fidelity":
            raise PixelDiffusionError(
                "Inception metrics need the optional torch-fidelity package; install it with "
                "pip install 'pixeldiffusion[fid]' (plus the torchvision matching your torch), "
                "or use --extractor digits for the offline digit metric") from None
        if err.name == "torchvision":
            raise PixelDiffusionError(_torchvision_hint()) from None
        raise PixelDiffusionError(f"torch-fidelity could not be imported ({err}); reinstall it "
                                  f"with pip install 'pixeldiffusion[fid]'") from None
    except Exception as err:  # a torchvision built for another torch fails in many ways
        raise PixelDiffusionError(f"torch-fidelity could not be imported ({type(err).__name__}: "
                                  f"{err}); {_torchvision_hint()}") from None
    return inception


def inception_extractor(weights: str | Path | None = None,
                        device: torch.device | str = "cpu") -> Extractor:
    """Inception-v3 as in the TF FID code (torch-fidelity's "inception-v3-compat"): 2048-d pool
    features and 1008 logits. ``weights`` (or $PIXELDIFFUSION_INCEPTION_WEIGHTS) is a local copy
    of the weights; without one torch-fidelity downloads them on first use."""
    weights = weights or os.environ.get(INCEPTION_ENV) or None
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise PixelDiffusionError(f"Inception weights file '{weights}' does not exist; "
                                      f"download {INCEPTION_URL} there, or drop "
                                      f"--inception-weights / {INCEPTION_ENV} to download it "
                                      f"automatically")
    inception = _import_fidelity()
    try:
        model = inception.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"],
            feature_extractor_weights_path=None if weights is None else str(weights))
    except Exception as err:  # a failed download surfaces as URLError, OSError, RuntimeError...
        where = f"'{weights}'" if weights else "the default location"
        raise PixelDiffusionError(f"could not load the Inception weights from {where} "
                                  f"({type(err).__name__}: {err}); download {INCEPTION_URL} and "
                                  f"pass --inception-weights PATH or set {INCEPTION_ENV}") from None
    model = model.to(device).eval()
    digest = _file_digest(weights) if weights else Path(INCEPTION_URL).stem.rsplit("-", 1)[-1]

    @torch.no_grad()
    def fn(images: Tensor) -> Features:
        feats, logits = [], []
        for chunk in images.split(64):
            x = ((chunk.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            pool, logit = model(x.to(device))
            feats.append(pool.float().cpu())
            logits.append(logit.float().cpu())
        return Features(torch.cat(feats), torch.cat(logits))

    source = str(weights) if weights else INCEPTION_URL
    return Extractor("inception", f"inception-v3-compat-{digest}",
                     f"Inception-v3 (torch-fidelity inception-v3-compat) pool3 2048-d, weights "
                     f"{source}; images resized to 299x299 bilinearly, grey repeated to RGB",
                     2048, 50_000, fn, 299)


def make_extractor(name: str, *, inception_weights: str | Path | None = None,
                   device: torch.device | str = "cpu") -> Extractor:
    """``digits`` or ``inception``."""
    if name == "digits":
        return digit_extractor(device)
    if name == "inception":
        return inception_extractor(inception_weights, device)
    raise PixelDiffusionError(f"unknown extractor '{name}'; use digits or inception")


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:12]


# --------------------------------------------------------------------------- inputs


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


def _from_uint8_nhwc(pixels: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_npz(path: str | Path) -> Images:
    """``samples.npz``: ``images`` uint8 [N, H, W, C] (C = 1 or 3), optional ``labels`` [N]."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise DataError(f"'{path}' is not a readable .npz file ({err})") from None
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
    labels = arrays.get("labels")
    if labels is not None and labels.shape != (images.shape[0],):
        raise DataError(f"'{path}': 'labels' has shape {list(labels.shape)} but there are "
                        f"{images.shape[0]} images; it must be [N]")
    return Images(_from_uint8_nhwc(images),
                  None if labels is None else torch.from_numpy(labels.astype(np.int64)), str(path))


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def load_folder(path: str | Path) -> Images:
    """Every image Pillow reads under ``path`` (recursive); all must share one size and be all
    grey or all colour, else a DataError naming two files that differ."""
    from .data import _image_files, _to_mode

    root = Path(path)
    files = _image_files(root) if root.is_dir() else []
    if not files:
        raise DataError(f"no images found in '{root}'; point eval at a folder of .png/.jpg "
                        f"files, a samples.npz or a checkpoint")
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
    channels = next(iter(modes))
    pixels = []
    for f in files:
        with Image.open(f) as img:
            pixels.append(np.asarray(_to_mode(img, channels)).reshape(img.size[1], img.size[0],
                                                                        channels))
    return Images(_from_uint8_nhwc(np.stack(pixels)), None, str(root))


def is_checkpoint(path: Path) -> bool:
    """A .safetensors file, a checkpoint directory or a run directory with checkpoints."""
    return (path.is_file() and path.suffix == ".safetensors") or \
        (path / "weights.safetensors").is_file() or (path / "checkpoints").is_dir()


# --------------------------------------------------------------------------- references


def cache_dir() -> Path:
    """$PIXELDIFFUSION_CACHE/stats, else ~/.cache/pixeldiffusion/stats."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pixeldiffusion"
    return Path(base) / "stats"


@dataclass
class Reference:
    """Reference features of a real data set, with what they are."""

    name: str
    features: np.ndarray          # float32 [M, D]
    stats: metrics.GaussianStats
    extractor_key: str
    resolution: int
    channels: int
    cached: Path | None = None

    @property
    def n(self) -> int:
        return self.stats.n

    @property
    def radii(self) -> np.ndarray:
        """k=3 nearest-neighbour radii of the reference features (computed once)."""
        if getattr(self, "_radii", None) is None:
            self._radii = metrics.knn_radii(self.features, 3)
        return self._radii


def _folder_fingerprint(root: Path) -> str:
    from .data import _image_files

    sha = hashlib.sha256()
    for f in _image_files(root):
        st = f.stat()
        sha.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return sha.hexdigest()[:12]


def cache_key(name: str, resolution: int, channels: int, extractor_key: str) -> str:
    """File name of a reference's cached features: data set, resolution, channels, extractor."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{safe}-{resolution}px-{channels}ch-{extractor_key}.npz"


def reference_images(name: str, resolution: int, channels: int,
                     data_root: str | Path = "data") -> Tensor:
    """Real images of a reference: float32 [M, channels, resolution, resolution] in [-1, 1]."""
    from .config import DataConfig
    from .data import load_dataset
    from .digit_classifier import digit_splits

    dataset_name = "digits" if name.startswith("digits") else name
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
        return torch.from_numpy(np.asarray(pixels)).float() / 127.5 - 1
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _features_batched(extractor: Extractor, x: Tensor, batch: int = 1000) -> Features:
    parts = [extractor(chunk) for chunk in x.split(batch)]
    logits = None if parts[0].logits is None else torch.cat([p.logits for p in parts])
    return Features(torch.cat([p.features for p in parts]), logits)


def load_stats_file(path: Path, extractor: Extractor) -> Reference:
    """A statistics file written by ``save_stats`` (or any npz with ``mu``/``sigma``)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise DataError(f"'{path}' is not a readable statistics file ({err})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise DataError(f"'{path}' has no 'mu' and 'sigma' arrays; make one with "
                        f"pixeldiffusion eval ... --save_stats PATH")
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    key = meta.get("extractor", "unknown")
    if key != extractor.key:
        raise DataError(f"statistics file '{path}' was made with extractor '{key}', but this "
                        f"evaluation uses '{extractor.key}'; recompute it with --extractor "
                        f"{extractor.name} --save_stats")
    features = arrays.get("features", np.zeros((0, extractor.dim), np.float32))
    stats = metrics.GaussianStats(arrays["mu"].astype(np.float64),
                                  arrays["sigma"].astype(np.float64), int(meta.get("n", 0)))
    reference = Reference(meta.get("reference", str(path)), features, stats, key,
                          int(meta.get("resolution", 0)), int(meta.get("channels", 0)), path)
    if "radii" in arrays and len(arrays["radii"]) == len(features):
        reference._radii = arrays["radii"]
    return reference


def save_stats(reference: Reference, path: str | Path) -> Path:
    """Write a reference's features, mean, covariance and what made them (npz, atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"reference": reference.name, "resolution": reference.resolution,
            "channels": reference.channels, "extractor": reference.extractor_key,
            "n": reference.n}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        radii = reference.radii if len(reference.features) > 3 else np.zeros(0)
        np.savez(f, features=reference.features.astype(np.float32), mu=reference.stats.mu,
                 sigma=reference.stats.sigma, radii=radii, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return path


def reference_features(ref: str, extractor: Extractor, *, resolution: int, channels: int,
                       data_root: str | Path = "data", use_cache: bool = True) -> Reference:
    """The reference ``ref`` (data set name, image folder or statistics .npz) as features,
    from the on-disk cache when the same data set, resolution, channels and extractor were
    seen before."""
    path = Path(ref).expanduser()
    if ref.endswith(".npz") and path.is_file():
        return load_stats_file(path, extractor)
    if ref not in DATASET_REFS:
        if not path.is_dir():
            raise DataError(f"unknown reference '{ref}'; use one of {', '.join(DATASET_REFS)}, "
                            f"an image folder or a statistics .npz")
        name = f"folder-{path.resolve().name}-{_folder_fingerprint(path)}"
    else:
        name = ref
    cached = cache_dir() / cache_key(name, resolution, channels, extractor.key)
    if use_cache and cached.is_file():
        reference = load_stats_file(cached, extractor)
        reference.cached = cached
        return reference
    images = reference_images(str(path) if ref not in DATASET_REFS else ref, resolution,
                              channels, data_root)
    features = _features_batched(extractor, images).features.numpy()
    reference = Reference(name, features, metrics.gaussian_stats(features), extractor.key,
                          resolution, channels)
    if use_cache:
        reference.cached = save_stats(reference, cached)
    return reference


# --------------------------------------------------------------------------- scoring


@dataclass
class Provenance:
    """How a number was made; printed with every table and saved with every file."""

    extractor: str
    n_samples: int
    reference: str
    reference_n: int
    resize: str
    warnings: list[str] = field(default_factory=list)


def sample_warnings(n: int, extractor: Extractor, metric: str) -> list[str]:
    """Warnings about a sample count that is too small for a stable or comparable number."""
    notes = []
    need = metrics.min_samples_for_fid(extractor.dim)
    if n < need:
        notes.append(f"{metric} on {n} samples is unstable: the {extractor.dim}-d feature "
                     f"covariance needs at least {need} samples to be full rank; use -n {need} "
                     f"or more ({extractor.papers_samples:,} for numbers comparable to "
                     f"published ones)")
    elif n < extractor.papers_samples:
        notes.append(f"{metric} on {n:,} samples is biased upwards and not comparable with "
                     f"numbers on {extractor.papers_samples:,} samples")
    return notes


def score(images: Images, reference: Reference, extractor: Extractor, *,
          kid_subsets: int = 100) -> tuple[dict[str, float], Provenance]:
    """All metrics of ``images`` against ``reference`` with ``extractor``: a dict of numbers
    and how they were made."""
    if reference.channels and images.channels != reference.channels:
        raise DataError(f"the images have {images.channels} channel(s) but the reference "
                        f"'{reference.name}' has {reference.channels}; compare like with like "
                        f"(convert the images, or pick a reference with {images.channels})")
    if reference.resolution and images.size != (reference.resolution, reference.resolution):
        raise DataError(f"the images are {images.size[0]}x{images.size[1]} but the reference "
                        f"'{reference.name}' is {reference.resolution}x{reference.resolution}; "
                        f"resize them first (a reference at another resolution is another "
                        f"distribution)")
    out = _features_batched(extractor, images.x)
    feats = out.features.numpy()
    n = feats.shape[0]
    metric = "digit-FID" if extractor.name == "digits" else "FID"
    notes = sample_warnings(n, extractor, metric)
    results: dict[str, float] = {}
    if n >= 2:
        fid = metrics.frechet_distance(metrics.gaussian_stats(feats), reference.stats)
        results["digit_fid" if extractor.name == "digits" else "fid"] = fid
    else:
        notes.append(f"{metric} needs at least 2 samples; got {n}")
    if reference.features.shape[0] > 3 and n > 3:
        results["kid"], results["kid_std"] = metrics.kid(feats, reference.features,
                                                         subsets=kid_subsets)
        results["precision"], results["recall"] = metrics.precision_recall(
            reference.features, feats, real_radii=reference.radii)
    elif reference.features.shape[0] == 0:
        notes.append("the statistics file holds no features, so KID and precision/recall are "
                     "skipped; save it with --save_stats to keep them")
    if out.logits is not None:
        probs = out.logits.double().softmax(dim=1)
        if extractor.name == "digits":
            predicted = probs.argmax(dim=1)
            results["confidence"] = float(probs.max(dim=1).values.mean())
            results["class_entropy"] = metrics.class_entropy(predicted, probs.shape[1])
            if images.labels is not None:
                results["class_accuracy"] = float((predicted == images.labels).double().mean())
        else:
            results["is"], results["is_std"] = metrics.inception_score(out.logits)
    size = images.size
    resize = "none" if extractor.input_size in (None, size[0]) and size[0] == size[1] else \
        f"bilinear {size[0]}x{size[1]} -> {extractor.input_size}x{extractor.input_size}"
    if extractor.name == "digits" and images.channels == 3:
        resize += "; RGB -> grey (BT.601)"
    provenance = Provenance(extractor.description, n, reference.name, reference.n, resize, notes)
    return results, provenance


# --------------------------------------------------------------------------- sampling + sweep


class CountingModel(nn.Module):
    """Wraps a denoising network and counts its calls (the NFE actually spent)."""

    def __init__(self, model: nn.Module, on_call: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.model, self.calls, self.on_call = model, 0, on_call

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        if self.on_call is not None:
            self.on_call()
        return self.model(*args, **kwargs)


def nfe_of(sampler: str, steps: int, alphas_cumprod: Tensor) -> int:
    """Model calls ``sampler`` makes for ``steps`` steps, counted on a 1-pixel dummy model."""
    from .samplers import sample

    counter = CountingModel(_Zero())
    with metrics.single_thread():  # thousands of tiny ops: a busy thread pool only slows them
        sample(counter, torch.zeros(1, 1, 1, 1), alphas_cumprod, sampler=sampler, steps=steps)
    return counter.calls


class _Zero(nn.Module):
    def forward(self, x: Tensor, t: Tensor, **_: Any) -> Tensor:
        return torch.zeros_like(x)


def steps_for_nfe(sampler: str, nfe: int, alphas_cumprod: Tensor) -> int:
    """The most steps whose NFE is at most ``nfe`` (``heun``: (nfe + 1) // 2)."""
    for steps in range(nfe, 0, -1):
        if nfe_of(sampler, steps, alphas_cumprod) <= nfe:
            return steps
    raise PixelDiffusionError(f"sampler '{sampler}' cannot run on {nfe} model calls")


def parse_sweep(items: Sequence[str]) -> list[dict[str, str]]:
    """``["sampler=ddpm,ddim", "steps=10,20"]`` -> the product as dicts of strings, in order."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not parts:
            raise PixelDiffusionError(f"--sweep item '{item}' must look like key=v1,v2 "
                                      f"(e.g. sampler=ddim,dpmpp_2m steps=10,20,50)")
        axes.append((key.strip(), parts))
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise PixelDiffusionError(f"--sweep names a key twice ({', '.join(keys)}); give each "
                                  f"key once with comma-separated values")
    if "steps" in keys and "nfe" in keys:
        raise PixelDiffusionError("--sweep takes steps= or nfe=, not both")
    return [dict(zip(keys, combo, strict=True)) for combo in
            itertools.product(*(values for _, values in axes))]


def _typed_sample_config(base: Any, point: dict[str, str]) -> Any:
    """``cfg.sample`` with a sweep point's values, converted to the fields' types."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    values: dict[str, Any] = {}
    for key, text in point.items():
        if key == "nfe":
            continue
        if key not in names:
            raise PixelDiffusionError(f"--sweep key '{key}' is not a sampling option; use nfe or "
                                      f"one of {', '.join(sorted(names))}")
        typ = next((a for a in typing.get_args(hints[key]) if a is not type(None)), hints[key])
        try:
            values[key] = typ(text) if typ in (int, float, str) else text
        except ValueError:
            raise PixelDiffusionError(f"--sweep {key}={text}: not a valid "
                                      f"{getattr(typ, '__name__', typ)}") from None
    return replace(base, **values)


@dataclass
class Row:
    """One evaluated setting: what was varied, the NFE spent, the metrics and the time."""

    setting: dict[str, Any]
    nfe: int
    results: dict[str, float]
    seconds: float
    provenance: Provenance


def sample_images(loaded: Any, cfg: Any, device: torch.device, *, micro_batch: int,
                  on_call: Callable[[], None] | None = None) -> tuple[Images, int]:
    """Draw ``cfg.sample.n_samples`` images from a loaded checkpoint; returns them and the NFE
    per image (model calls per micro batch)."""
    from .generate import generate

    counter = CountingModel(loaded.model, on_call)
    generated = generate(counter, cfg, device, micro_batch=micro_batch)
    batches = -(-len(generated.images) // micro_batch)
    labels = getattr(generated, "labels", None)
    return (Images(generated.images, None if labels is None else labels.cpu(), str(loaded.path)),
            counter.calls // max(batches, 1))


def run_sweep(loaded: Any, points: list[dict[str, str]], reference: Reference,
              extractor: Extractor, device: torch.device, *, n_samples: int,
              micro_batch: int = 250, seed: int | None = None, progress: bool = True,
              grid_dir: Path | None = None) -> list[Row]:
    """Sample and score every sweep point of a checkpoint, with one progress bar (in model calls)
    over the whole sweep."""
    from .images import save_grid
    from .samplers import SAMPLERS
    from .schedule import alphas_cumprod_of

    base = loaded.config
    alphas_cumprod = alphas_cumprod_of(base)
    plans = []
    for point in points:
        s = _typed_sample_config(base.sample, point)
        s = replace(s, n_samples=n_samples, seed=base.sample.seed if seed is None else seed)
        if s.sampler not in SAMPLERS:
            close = difflib.get_close_matches(s.sampler, list(SAMPLERS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise PixelDiffusionError(f"unknown sampler '{s.sampler}'; {hint}use one of "
                                      f"{', '.join(SAMPLERS)} (or sampler=all in --sweep)")
        if "nfe" in point:
            s = replace(s, steps=steps_for_nfe(s.sampler, int(point["nfe"]), alphas_cumprod))
        if s.steps > base.diffusion.timesteps:
            raise PixelDiffusionError(f"steps {s.steps} is more than the model's "
                                      f"{base.diffusion.timesteps} timesteps")
        plans.append((point, replace(base, sample=s)))
    batches = -(-n_samples // micro_batch)
    total = sum(nfe_of(c.sample.sampler, c.sample.steps, alphas_cumprod) for _, c in plans)
    rows = []
    with tqdm(total=total * batches, desc="eval", unit="call", disable=not progress,
              dynamic_ncols=True) as bar:
        for point, cfg in plans:
            bar.set_postfix_str(f"{cfg.sample.sampler} {cfg.sample.steps} steps")
            start = time.perf_counter()
            images, nfe = sample_images(loaded, cfg, device, micro_batch=micro_batch,
                                        on_call=lambda: bar.update(1))
            seconds = time.perf_counter() - start
            results, provenance = score(images, reference, extractor)
            setting = {"sampler": cfg.sample.sampler, "steps": cfg.sample.steps,
                       **{k: v for k, v in point.items() if k not in ("sampler", "steps", "nfe")}}
            rows.append(Row(setting, nfe, results, seconds, provenance))
            if grid_dir is not None:
                name = "-".join(f"{k}{v}" for k, v in setting.items())
                save_grid(images.x[:64], grid_dir / f"grid-{name}.png", nrow=8)
    return rows


# --------------------------------------------------------------------------- output

COLUMNS = ("digit_fid", "fid", "is", "kid", "precision", "recall", "confidence", "class_entropy",
           "class_accuracy")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: the setting columns, nfe, every metric present, seconds."""
    setting_keys = list(dict.fromkeys(k for r in rows for k in r.setting))
    metric_keys = [c for c in COLUMNS if any(c in r.results for r in rows)]
    header = [*setting_keys, "nfe", *metric_keys, "seconds"]
    cells = [[_fmt(r.setting.get(k, "")) for k in setting_keys] + [str(r.nfe)]
             + [_fmt(r.results.get(k, "")) for k in metric_keys] + [f"{r.seconds:.1f}"]
             for r in rows]
    return header, cells


def markdown(rows: list[Row]) -> str:
    """A Markdown table followed by how the numbers were made."""
    header, cells = table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", describe(rows[0].provenance)]
    return "\n".join(lines) + "\n"


def describe(p: Provenance) -> str:
    """The provenance as a few lines of text."""
    text = (f"Extractor: {p.extractor}. Samples: {p.n_samples:,} per row. Reference: "
            f"{p.reference} ({p.reference_n:,} images). Resize: {p.resize}.")
    return "\n".join([text, *(f"Warning: {w}" for w in p.warnings)])


def plain_table(rows: list[Row]) -> str:
    """Columns aligned for a terminal."""
    header, cells = table(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def write_results(rows: list[Row], out_dir: str | Path) -> list[Path]:
    """results.csv, results.md and results.json (with provenance) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, cells = table(rows)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)
    (out_dir / "results.md").write_text(markdown(rows))
    (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return [out_dir / n for n in ("results.csv", "results.md", "results.json")]


def plot_vs_nfe(rows: list[Row], path: str | Path, metric: str | None = None) -> Path:
    """Metric against NFE, one line per sampler (matplotlib, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PixelDiffusionError("--plot needs matplotlib; pip install matplotlib") from None
    metric = metric or next(c for c in COLUMNS if c in rows[0].results)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler in dict.fromkeys(r.setting.get("sampler") for r in rows):
        mine = sorted((r.nfe, r.results[metric]) for r in rows
                      if r.setting.get("sampler") == sampler and metric in r.results)
        ax.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", label=str(sampler))
    ax.set_xscale("log")
    ticks = sorted({r.nfe for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("NFE (model calls per image)")
    ax.set_ylabel(metric.replace("_", "-"))
    p = rows[0].provenance
    ax.set_title(f"{metric.replace('_', '-')} vs NFE ({p.n_samples:,} samples, ref "
                 f"{p.reference})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- training hook


class TrainingEval:
    """Metrics during training (``train.eval_*``): sample ``train.eval_samples`` images with the
    EMA weights and ``train.eval_sampler`` / ``eval_steps``, score them with the digit extractor
    against the built-in digits' held-in split and/or with Inception against the training data
    set. Reference features are computed once (and cached on disk)."""

    def __init__(self, cfg: Any, device: torch.device) -> None:
        from .errors import ConfigError
        from .samplers import SAMPLERS

        tc = cfg.train
        if tc.eval_sampler not in SAMPLERS:
            raise ConfigError(f"config key 'train.eval_sampler' must be one of "
                              f"{', '.join(SAMPLERS)}; got '{tc.eval_sampler}'")
        self.device, self.warned = device, False
        self.parts: list[tuple[Extractor, Reference]] = []
        size, channels = cfg.data.image_size, cfg.data.channels
        if tc.eval_metric in ("digits", "both"):
            digits = digit_extractor("cpu")
            self.parts.append((digits, reference_features("digits", digits, resolution=size,
                                                          channels=channels)))
        if tc.eval_metric in ("inception", "both"):
            inception = inception_extractor(None, device)
            self.parts.append((inception, reference_features(
                _default_reference(cfg), inception, resolution=size, channels=channels,
                data_root=cfg.data.root)))

    def __call__(self, model: nn.Module, cfg: Any) -> tuple[str, dict[str, float]]:
        """(one log line with the numbers and how they were made, {tensorboard tag: value})."""
        from .generate import generate

        tc = cfg.train
        s = replace(cfg.sample, sampler=tc.eval_sampler, steps=tc.eval_steps,
                    n_samples=tc.eval_samples)
        was_training = model.training
        model.eval()
        try:
            generated = generate(model, replace(cfg, sample=s), self.device,
                                 micro_batch=min(tc.eval_samples, 256))
        finally:
            model.train(was_training)
        labels = getattr(generated, "labels", None)
        images = Images(generated.images, None if labels is None else labels.cpu(),
                        "EMA samples")
        parts, scalars, notes = [], {}, []
        for extractor, reference in self.parts:
            results, provenance = score(images, reference, extractor, kid_subsets=10)
            notes += provenance.warnings
            for key in ("digit_fid", "fid", "is", "confidence", "class_entropy",
                        "class_accuracy"):
                if key in results:
                    scalars[f"eval/{key}"] = results[key]
                    parts.append(f"{key.replace('_', '-')} {results[key]:.4g}")
            parts.append(f"[{extractor.name}: vs {reference.name}, {reference.n} images]")
        line = (f"{' '.join(parts)} ({tc.eval_samples} EMA samples, {tc.eval_sampler} "
                f"{tc.eval_steps} steps)")
        if not self.warned and notes:
            line += "; " + "; ".join(notes)
            self.warned = True
        return line, scalars


# --------------------------------------------------------------------------- the command


def _default_reference(cfg: Any | None) -> str:
    if cfg is None:
        return "digits"
    if cfg.data.dataset == "folder":
        return cfg.data.root
    return cfg.data.dataset


def _sample_overrides(cfg: Any, args: Any, overrides: Sequence[str]) -> Any:
    """The checkpoint's config with ``--sampler/--steps/--guidance/--class`` and any
    ``--sample.KEY value`` overrides on top (validated like the config file)."""
    from .config import from_dict, parse_overrides

    raw: dict[str, Any] = {}
    for key, value in parse_overrides(list(overrides)):
        section, _, name = key.partition(".")
        if section != "sample":
            raise PixelDiffusionError(f"eval takes only sampling overrides (--sample.KEY value); "
                                      f"got --{key}")
        raw[name] = value
    import yaml

    cfg = from_dict({"sample": {k: yaml.safe_load(v) for k, v in raw.items()}}, base=cfg)
    chosen = {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
              "class_label": args.class_label}
    return replace(cfg, sample=replace(cfg.sample, **{k: v for k, v in chosen.items()
                                                      if v is not None}))


def _reattach(args: Any, overrides: list[str]) -> list[str]:
    """argparse hands the value of the first ``--sample.KEY VALUE`` override to the optional
    INPUT positional when INPUT is absent; give it back to the key that is missing a value."""
    for i, item in enumerate(overrides):
        dangling = item.startswith("--") and "=" not in item and \
            (i + 1 == len(overrides) or overrides[i + 1].startswith("--"))
        if dangling and args.input is not None:
            overrides.insert(i + 1, args.input)
            args.input = None
            break
    return overrides


def run_from_args(args: Any, overrides: Sequence[str]) -> int:
    """What ``pixeldiffusion eval`` does after parsing."""
    import sys

    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .samplers import SAMPLERS

    overrides = _reattach(args, list(overrides))
    source = args.checkpoint or args.input
    if source is None:
        raise PixelDiffusionError("eval needs something to score: a checkpoint (-cp RUN_DIR), an "
                                  "image folder or a samples.npz")
    if args.checkpoint and args.input:
        raise PixelDiffusionError("give either INPUT or -cp CHECKPOINT, not both")
    path = Path(source).expanduser()
    if not path.exists():
        raise PixelDiffusionError(f"'{path}' does not exist; pass a checkpoint, an image folder "
                                  f"or a samples.npz")
    device = resolve_device(args.device)
    extractor = make_extractor(args.extractor, inception_weights=args.inception_weights,
                               device=device)
    loaded = None
    if args.checkpoint or is_checkpoint(path):
        loaded = load_checkpoint(path, use_ema=args.load_ema, device=device)
        loaded.config = _sample_overrides(loaded.config, args, overrides)
        resolution, channels = loaded.config.data.image_size, loaded.config.data.channels
        images = None
    else:
        if overrides or args.sweep:
            raise PixelDiffusionError("sampling options and --sweep need a checkpoint input "
                                      "(-cp RUN_DIR); images in a folder or npz are scored as "
                                      "they are")
        images = load_npz(path) if path.suffix == ".npz" else load_folder(path)
        resolution, channels = images.size[0], images.channels
        if images.size[0] != images.size[1]:
            raise DataError(f"the images are {images.size[0]}x{images.size[1]}; eval compares "
                            f"square images with a square reference, crop them first")
    ref = args.ref or _default_reference(None if loaded is None else loaded.config)
    reference = reference_features(ref, extractor, resolution=resolution, channels=channels,
                                   data_root=args.data_root, use_cache=not args.no_cache)
    if args.save_stats:
        print(f"reference statistics: {save_stats(reference, args.save_stats)}")
    out_dir = Path(args.out)
    if loaded is not None:
        points = parse_sweep(args.sweep) if args.sweep else [{}]
        if any(p.get("sampler") == "all" for p in points):
            points = [{**p, "sampler": name} for p in points for name in SAMPLERS
                      if p.get("sampler") == "all"] + [p for p in points
                                                       if p.get("sampler") != "all"]
        rows = run_sweep(loaded, points, reference, extractor, device, n_samples=args.n_samples,
                         micro_batch=args.micro_batch, seed=args.seed,
                         progress=not args.no_progress, grid_dir=out_dir)
    else:
        start = time.perf_counter()
        results, provenance = score(images, reference, extractor)
        rows = [Row({"input": path.name}, 0, results, time.perf_counter() - start, provenance)]
    for warning in dict.fromkeys(w for r in rows for w in r.provenance.warnings):
        print(f"pixeldiffusion: warning: {warning}", file=sys.stderr)
    print(plain_table(rows))
    print(describe(replace(rows[0].provenance, warnings=[])))
    for written in write_results(rows, out_dir):
        print(written)
    if args.plot:
        print(plot_vs_nfe(rows, args.plot))
    return 0
