"""A small digit classifier: the feature extractor of the offline "digit-FID".

The network is a 3-block CNN for grey 32x32 digits in [-1, 1]; ``features(x)`` is its
penultimate layer (64 ReLU units), ``logits(x)`` the 10 class scores. Its weights ship inside
the package (``assets/digit_classifier.safetensors``) and are made by
``scripts/train_digit_classifier.py`` from the held-in split below, so the metric needs no
network. The held-out split (100 per class) is never seen by the classifier: it sets the
"real-digit floor", the score of real digits measured the same way as samples.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from .data import LUMA_601
from .errors import CheckpointError, did_you_mean
from .images import uint8_to_float

WEIGHTS_NAME = "digit_classifier.safetensors"
FEATURE_DIM = 64
NUM_CLASSES = 10
IMAGE_SIZE = 32
HELD_OUT_PER_CLASS = 100
SPLIT_SEED = 20_231_123


class DigitClassifier(nn.Module):
    """conv(1->32)-pool-conv(32->64)-pool-conv(64->64)-pool -> 1024 -> 64 (features) -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: Tensor) -> Tensor:
        """x [N, 1, 32, 32] in [-1, 1] -> penultimate features float32 [N, 64] (>= 0)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def logits(self, x: Tensor) -> Tensor:
        """x [N, 1, 32, 32] in [-1, 1] -> class scores [N, 10] (softmax gives p(digit | x))."""
        return self.fc2(self.dropout(self.features(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)


def digit_splits(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(held-in indices, held-out indices) of the built-in digits given their labels [5000]:
    ``HELD_OUT_PER_CLASS`` random digits of each class are held out (fixed seed)."""
    rng = np.random.default_rng(SPLIT_SEED)
    held_out = []
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(np.asarray(labels) == digit)
        held_out.append(rng.choice(members, HELD_OUT_PER_CLASS, replace=False))
    out = np.sort(np.concatenate(held_out))
    held_in = np.setdiff1d(np.arange(len(labels)), out)
    return held_in, out


def builtin_digits(split: str = "heldin") -> tuple[Tensor, Tensor]:
    """The built-in digits of one split ("heldin", "heldout" or "all") as (x float32
    [N, 1, 32, 32] in [-1, 1], labels int64 [N])."""
    from .config import DataConfig
    from .data import load_dataset

    dataset = load_dataset(DataConfig(dataset="digits", image_size=IMAGE_SIZE, channels=1))
    images, labels = dataset.images, dataset.labels
    held_in, held_out = digit_splits(labels.numpy())
    splits = {"heldin": held_in, "heldout": held_out, "all": np.arange(len(labels))}
    if split not in splits:
        raise ValueError(f"unknown split '{split}'; {did_you_mean(split, splits)}use heldin, "
                         f"heldout or all")
    index = splits[split]
    chosen = torch.from_numpy(index)
    return uint8_to_float(images[chosen]), labels[chosen]


def weights_file():
    """The packaged weights (an importlib.resources Traversable)."""
    return resources.files("pixeldiffusion") / "assets" / WEIGHTS_NAME


@cache
def weights_digest() -> str:
    """First 12 hex digits of the packaged weights' SHA-256: part of every cache key."""
    return hashlib.sha256(weights_file().read_bytes()).hexdigest()[:12]


def weights_metadata() -> dict[str, str]:
    """The metadata the training script stored with the weights (accuracy, split, seed, ...)."""
    from safetensors import safe_open

    with resources.as_file(weights_file()) as path, \
            safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_digit_classifier(device: torch.device | str = "cpu") -> DigitClassifier:
    """The shipped classifier in eval mode on ``device``."""
    resource = weights_file()
    if not resource.is_file():
        raise CheckpointError(f"the digit classifier weights '{WEIGHTS_NAME}' are missing from the "
                              f"installed package; reinstall pixeldiffusion or run "
                              f"scripts/train_digit_classifier.py")
    with resources.as_file(resource) as path:
        state = load_file(str(path))
    model = DigitClassifier()
    model.load_state_dict(state)
    return model.to(device).eval()


def to_digit_input(images: Tensor, *, resize: bool = True) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] -> [N, 1, 32, 32]: RGB to luma (BT.601), bilinear resize
    when H or W is not 32 (only with ``resize``; otherwise a ValueError)."""
    x = images.float()
    if x.shape[1] == 3:
        weights = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device)
        x = (x * weights[:, None, None]).sum(dim=1, keepdim=True)
    elif x.shape[1] != 1:
        raise ValueError(f"the digit classifier reads 1- or 3-channel images; got {x.shape[1]}")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        if not resize:
            raise ValueError(f"the digit classifier reads 32x32 images; got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
    return x


@torch.no_grad()
def digit_outputs(model: DigitClassifier, images: Tensor, *,
                  batch: int = 500) -> tuple[Tensor, Tensor]:
    """(features float32 [N, 64], logits float32 [N, 10]) of images [N, 1, 32, 32] in [-1, 1]."""
    device = next(model.parameters()).device
    feats, logits = [], []
    for chunk in images.split(batch):
        f = model.features(chunk.to(device))
        feats.append(f.cpu())
        logits.append(model.fc2(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def describe() -> str:
    """One line for provenance: what the extractor is and which weights."""
    meta = weights_metadata()
    info = json.loads(meta.get("info", "{}"))
    accuracy = info.get("heldout_accuracy")
    extra = f", held-out accuracy {accuracy:.1%}" if isinstance(accuracy, float) else ""
    return f"digit-cnn penultimate {FEATURE_DIM}-d (weights sha256 {weights_digest()}{extra})"
