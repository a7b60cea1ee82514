"""Feature extractors of the sample-quality metrics: images in, feature vectors (and logits) out.

Two extractors share one contract, ``Extractor(images [N, C, H, W] in [-1, 1]) -> Features``:

- ``digits``: the shipped digit classifier (``digit_classifier.py``), offline; its 64-d
  penultimate layer gives the "digit-FID" and its 10 logits the confidence and class balance.
- ``inception``: Inception-v3 as in the TF FID code, from the optional ``torch-fidelity``
  package; 2048-d pool features (FID, KID, precision/recall) and 1008 logits (IS).

An extractor's ``key`` changes with its weights, so statistics cached under it are never reused
with other weights (``reference.py``). The metric math is ``metrics.py``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import PixelDiffusionError, did_you_mean
from .images import float_to_uint8

INCEPTION_ENV = "PIXELDIFFUSION_INCEPTION_WEIGHTS"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
EXTRACTORS = ("digits", "inception")


@dataclass
class Features:
    """What an extractor returns for N images: features float32 [N, D], logits [N, K] or None."""

    features: Tensor
    logits: Tensor | None


@dataclass
class Extractor:
    """A feature extractor: ``fn(images [N, C, H, W] in [-1, 1]) -> Features``.

    ``key`` names it in cache keys (it changes with the weights); ``papers_samples`` is the sample
    count published numbers use, below which results get a warning; ``input_size`` is the size
    images are resized to, when it is fixed.
    """

    name: str
    key: str
    description: str
    dim: int
    papers_samples: int
    fn: Callable[[Tensor], Features]
    input_size: int | None = None

    def __call__(self, images: Tensor) -> Features:
        return self.fn(images)


def extract_batched(extractor: Extractor, x: Tensor, batch: int = 1000) -> Features:
    """``extractor`` over images x [N, C, H, W] in [-1, 1], ``batch`` images at a time, so memory
    stays bounded for tens of thousands of images."""
    parts = [extractor(chunk) for chunk in x.split(batch)]
    logits = None if parts[0].logits is None else torch.cat([p.logits for p in parts])
    return Features(torch.cat([p.features for p in parts]), logits)


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
    """How to install the torchvision that matches the installed torch (one sentence)."""
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


def _inception_weights_path(weights: str | Path | None) -> Path | None:
    """The local weights file to use (``weights``, else $PIXELDIFFUSION_INCEPTION_WEIGHTS), or
    None to let torch-fidelity download them; a named file that is missing is an error."""
    weights = weights or os.environ.get(INCEPTION_ENV) or None
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise PixelDiffusionError(f"Inception weights file '{path}' does not exist; download "
                                  f"{INCEPTION_URL} there, or drop --inception-weights / "
                                  f"{INCEPTION_ENV} to download it automatically")
    return path


def inception_extractor(weights: str | Path | None = None,
                        device: torch.device | str = "cpu") -> Extractor:
    """Inception-v3 as in the TF FID code (torch-fidelity's "inception-v3-compat"): 2048-d pool
    features and 1008 logits. ``weights`` (or $PIXELDIFFUSION_INCEPTION_WEIGHTS) is a local copy
    of the weights; without one torch-fidelity downloads them on first use."""
    path = _inception_weights_path(weights)
    inception = _import_fidelity()
    try:
        model = inception.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"],
            feature_extractor_weights_path=None if path is None else str(path))
    except Exception as err:  # a failed download surfaces as URLError, OSError, RuntimeError...
        where = f"'{path}'" if path else "the default location"
        raise PixelDiffusionError(f"could not load the Inception weights from {where} "
                                  f"({type(err).__name__}: {err}); download {INCEPTION_URL} and "
                                  f"pass --inception-weights PATH or set {INCEPTION_ENV}") from None
    model = model.to(device).eval()

    @torch.no_grad()
    def fn(images: Tensor) -> Features:
        feats, logits = [], []
        for chunk in images.split(64):
            # torch-fidelity takes uint8 RGB pixels and resizes to 299x299 itself
            x = float_to_uint8(chunk)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            pool, logit = model(x.to(device))
            feats.append(pool.float().cpu())
            logits.append(logit.float().cpu())
        return Features(torch.cat(feats), torch.cat(logits))

    digest = file_digest(path) if path else Path(INCEPTION_URL).stem.rsplit("-", 1)[-1]
    source = str(path) if path else INCEPTION_URL
    return Extractor("inception", f"inception-v3-compat-{digest}",
                     f"Inception-v3 (torch-fidelity inception-v3-compat) pool3 2048-d, weights "
                     f"{source}; images resized to 299x299 bilinearly, grey repeated to RGB",
                     2048, 50_000, fn, 299)


def make_extractor(name: str, *, inception_weights: str | Path | None = None,
                   device: torch.device | str = "cpu") -> Extractor:
    """The extractor called ``name``: ``digits`` or ``inception``."""
    if name == "digits":
        return digit_extractor(device)
    if name == "inception":
        return inception_extractor(inception_weights, device)
    raise PixelDiffusionError(f"unknown extractor '{name}'; {did_you_mean(name, EXTRACTORS)}"
                              f"use {' or '.join(EXTRACTORS)}")


def file_digest(path: Path) -> str:
    """First 12 hex digits of the SHA-256 of the file at ``path`` (read in 1 MiB blocks)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:12]
