"""The digit-FID scorer and the real-digit floor that the digits benchmarks share
(quality_per_minute.py, few_step.py): the offline digit extractor against the 4,000 held-in
built-in digits, and the held-out digits (never seen by the digit classifier) as the floor."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pixeldiffusion import evaluate
from pixeldiffusion.digit_classifier import builtin_digits
from pixeldiffusion.features import digit_extractor
from pixeldiffusion.image_sets import Images
from pixeldiffusion.reference import reference_features


def digit_fid_scorer() -> tuple[Callable[[torch.Tensor], float], str]:
    """(digit_fid(images [N, 1, 32, 32] in [-1, 1]) -> float, the extractor's description)."""
    extractor = digit_extractor()
    reference = reference_features("digits", extractor, resolution=32, channels=1)

    def digit_fid(x: torch.Tensor) -> float:
        return evaluate.score(Images(x, None, ""), reference, extractor,
                              kid_subsets=10)[0]["digit_fid"]

    return digit_fid, extractor.description


def held_out_digits() -> torch.Tensor:
    """The 1,000 held-out built-in digits in a fixed random order (they are stored sorted by
    class): the floor takes the first n."""
    held_out, _ = builtin_digits("heldout")
    return held_out[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))]
