"""Guidance that keeps diversity: classifier-free guidance, its limited interval, and
autoguidance on a class-conditional digits model, scored on the whole distribution.

    python benchmarks/guidance_diversity.py runs/cond --guide runs/cond/checkpoints/step-0001000
    python benchmarks/guidance_diversity.py runs/cond --guide OLD --settings cfg=1.5 \
        "cfg=2@0.3-5" auto=2 "auto=3@0.3-5" --samples 5000 --core 1

Each setting is ``KIND=W`` or ``KIND=W@SIGMA_LO-SIGMA_HI`` (guide only at noise levels in
(lo, hi], Kynkaanniemi et al. 2024): ``cfg`` is classifier-free guidance (Ho & Salimans 2022,
the model's own null-label half), ``auto`` is autoguidance (Karras et al. 2024) by the ``--guide``
checkpoint, a worse version of the same model (an earlier step, a shorter EMA, a smaller net).
``auto=W+cfg=W2`` adds classifier-free guidance of weight W2 on top of autoguidance
(``sample.autoguidance_cfg``).
The unguided model (w = 1) is always the first row. Every row draws ``--samples`` images (seed 0,
one uniformly random digit per image, the checkpoint's own sampler and steps) and is scored with
the offline digit extractor against the 4,000 held-in built-in digits: digit-FID, precision,
recall, and class accuracy (how often the shipped digit classifier reads the digit that was
asked for). The table gives each row's digit-FID as a multiple of the unguided one, so the
question "does a setting reach 99% class accuracy at no more than 1.5x the unguided digit-FID"
can be read off one column each. Runs on one core with one thread (``--core``); writes each
row's first 64 images as a grid under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from digits_score import held_out_digits

from pixeldiffusion import evaluate
from pixeldiffusion.checkpoint import load_checkpoint
from pixeldiffusion.config import apply_overrides
from pixeldiffusion.errors import PixelDiffusionError
from pixeldiffusion.features import digit_extractor
from pixeldiffusion.guidance import load_guidance_model
from pixeldiffusion.image_sets import Images
from pixeldiffusion.images import save_grid
from pixeldiffusion.reference import reference_features

KINDS = ("cfg", "auto")


Setting = tuple[str, float, tuple[float, ...], float]


def parse_setting(text: str) -> Setting:
    """``auto=2@0.3-5`` -> ("auto", 2.0, (0.3, 5.0), 1.0); ``cfg=1.5`` -> ("cfg", 1.5, (), 1.0);
    ``auto=1.5+cfg=1.1`` -> ("auto", 1.5, (), 1.1): the last is the classifier-free weight added
    on top of autoguidance."""
    try:
        head, plus, extra = text.partition("+")
        kind, rest = head.split("=", 1)
        weight, _, interval = rest.partition("@")
        bounds = tuple(float(v) for v in interval.split("-")) if interval else ()
        on_top = 1.0
        if plus:
            extra_kind, extra_weight = extra.split("=", 1)
            if kind != "auto" or extra_kind != "cfg":
                raise ValueError
            on_top = float(extra_weight)
        if kind not in KINDS or len(bounds) not in (0, 2):
            raise ValueError
        return kind, float(weight), bounds, on_top
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"setting {text!r}: write KIND=W or KIND=W@SIGMA_LO-SIGMA_HI with KIND in "
            f"{', '.join(KINDS)}, or auto=W+cfg=W2, e.g. cfg=1.5, auto=2@0.3-5 or "
            f"auto=1.5+cfg=1.1") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a class-conditional checkpoint (run or file)")
    parser.add_argument("--guide", help="the worse version of it, for the auto settings")
    parser.add_argument("--settings", nargs="+", type=parse_setting,
                        default=[parse_setting(s) for s in ("cfg=1.5", "auto=2", "auto=3")])
    parser.add_argument("--samples", type=int, default=5000, help="images per row")
    parser.add_argument("--core", type=int, help="the one core to run on (default: all)")
    parser.add_argument("--out", type=Path, default=Path("guidance_diversity"))
    args = parser.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
        torch.set_num_threads(1)
    if any(setting[0] == "auto" for setting in args.settings) and not args.guide:
        parser.error("the auto settings need --guide CHECKPOINT (a worse version of the model)")
    args.out.mkdir(parents=True, exist_ok=True)

    try:
        loaded = load_checkpoint(args.checkpoint, device="cpu")
        guide = load_guidance_model(args.guide, loaded.config) if args.guide else None
    except PixelDiffusionError as err:  # a missing, corrupt or mismatched checkpoint: one line
        parser.error(str(err))
    if not loaded.config.model.num_classes:
        parser.error(f"{args.checkpoint} is unconditional; class accuracy needs a "
                     "class-conditional model (e.g. configs/mnist_cond_cosine.yaml)")
    extractor = digit_extractor()
    reference = reference_features("digits", extractor, resolution=32, channels=1)
    floor = evaluate.score(Images(held_out_digits()[:args.samples], None, ""), reference,
                           extractor)[0]["digit_fid"]

    rows = []
    for kind, weight, interval, on_top in [("cfg", 1.0, (), 1.0), *args.settings]:
        cfg = apply_overrides(loaded.config, [
            ("sample.n_samples", str(args.samples)), ("sample.seed", "0"),
            ("sample.class_label", "random"), ("sample.guidance", str(weight)),
            ("sample.guidance_interval", ",".join(map(str, interval)) or "[]"),
            ("sample.autoguidance_cfg", str(on_top))])
        start = time.perf_counter()
        images, nfe = evaluate.sample_images(loaded, cfg, torch.device("cpu"), micro_batch=250,
                                             guidance_model=guide if kind == "auto" else None)
        results, _ = evaluate.score(images, reference, extractor)
        name = f"{kind} w={weight:g}" + (f" + cfg w={on_top:g}" if on_top != 1.0 else "") + (
            f" sigma in ({interval[0]:g}, {interval[1]:g}]" if interval else "")
        if weight == 1.0 and not rows:
            name = "unguided (w = 1)"
        save_grid(images.x[:64], args.out / f"{name.replace(' ', '_')}.png", nrow=8)
        rows.append((name, nfe, results, time.perf_counter() - start))

    print(f"{args.samples} samples per row, {loaded.config.sample.sampler} "
          f"{loaded.config.sample.steps} steps, random digit per image; checkpoint {loaded.path}"
          + (f", guide {args.guide}" if args.guide else "")
          + f"; held-out real digits (floor) {floor:.2f}\n")
    print_table(rows)


def print_table(rows: list[tuple[str, int, dict[str, float], float]]) -> None:
    """The markdown table of (name, NFE, results, seconds) rows, the unguided one first."""
    # digit-FID_inf (Chong & Forsyth 2020; from 650 samples): the ratio without the small-sample
    # bias that inflates both digit-FIDs and so pulls their ratio towards 1
    inf = all("digit_fid_inf" in r for _, _, r, _ in rows)
    extra = (" digit-FID inf | x unguided inf |", "---:|---:|") if inf else ("", "")
    print(f"| setting | NFE | digit-FID | x unguided |{extra[0]} precision | recall | "
          f"class accuracy | s |")
    print(f"|---|---:|---:|---:|{extra[1]}---:|---:|---:|---:|")
    unguided = rows[0][2]
    for name, nfe, r, seconds in rows:
        cells = (f" {r['digit_fid_inf']:.2f} | "
                 f"{_ratio(r['digit_fid_inf'], unguided['digit_fid_inf'])} |") if inf else ""
        print(f"| {name} | {nfe} | {r['digit_fid']:.2f} | "
              f"{r['digit_fid'] / unguided['digit_fid']:.2f} |{cells} {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['class_accuracy']:.1%} | {seconds:.0f} |")


def _ratio(value: float, unguided: float) -> str:
    """value / unguided, or "n/a" where the unguided extrapolation is not above 0."""
    return f"{value / unguided:.2f}" if unguided > 0 else "n/a"


if __name__ == "__main__":
    main()
