"""Classifier-free guidance on the built-in digits: class accuracy and quality/diversity per w.

    python benchmarks/guidance.py runs/mnist_cond [--per_class 20] [--weights 0,1,2,3,5]

For each guidance weight w the class-conditional checkpoint draws ``per_class`` samples of
every digit (``--class all``, the checkpoint's sampler and steps, one seed for all w) and the
shipped digit classifier (``digit_classifier.py``, never trained on the held-out digits) reads
them. Printed, one row per w:

- accuracy: share of samples the classifier assigns the requested digit;
- p(class): its mean softmax probability of the requested digit;
- precision / recall: improved precision and recall (Kynkäänniemi et al. 2019) of the samples'
  classifier features against 500 held-out real digits (50 per class): precision ~ quality
  (samples that look like real digits), recall ~ diversity (real digits the samples cover);
- digit-FD: Fréchet distance of the same features (Heusel et al. 2017, eq. 6), lower is better;
- spread: mean distance between two samples of the same digit in feature space, divided by the
  same for real held-out digits (1.00 = as varied as real digits of a class).

A "real" row scores other held-out digits (``per_class`` of each) the same way, the ceiling
at this sample size. ``--picture`` writes one row per class at the most accurate w.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pixeldiffusion.checkpoint import load_checkpoint
from pixeldiffusion.digit_classifier import (
    builtin_digits,
    describe,
    digit_outputs,
    load_digit_classifier,
)
from pixeldiffusion.generate import generate
from pixeldiffusion.images import atomic_save, make_grid, to_pil, to_uint8
from pixeldiffusion.metrics import frechet_distance, gaussian_stats, precision_recall

REFERENCE_PER_CLASS = 50


def within_class_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance between feature vectors [N, D] of the same label, averaged over
    the labels present."""
    spreads = []
    for label in labels.unique():
        members = features[labels == label].double()
        if len(members) > 1:
            distances = torch.cdist(members, members)
            spreads.append(float(distances.sum() / (len(members) * (len(members) - 1))))
    return sum(spreads) / len(spreads)


def split_held_out(per_class: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                            tuple[torch.Tensor, torch.Tensor]]:
    """The 1,000 held-out digits as (reference: 50 per class, real row: ``per_class`` of the
    others per class), each as (x [N, 1, 32, 32] in [-1, 1], labels [N])."""
    x, y = builtin_digits("heldout")
    ref, rest = [], []
    for digit in range(10):
        index = torch.nonzero(y == digit).flatten()
        ref.append(index[:REFERENCE_PER_CLASS])
        rest.append(index[REFERENCE_PER_CLASS:REFERENCE_PER_CLASS + per_class])
    ref_i, rest_i = torch.cat(ref), torch.cat(rest)
    return (x[ref_i], y[ref_i]), (x[rest_i], y[rest_i])


def score(classifier, images: torch.Tensor, labels: torch.Tensor, reference) -> dict[str, float]:
    """The row of the table for images [N, 1, 32, 32] in [-1, 1] drawn for ``labels`` [N]."""
    ref_features, ref_spread = reference
    features, logits = digit_outputs(classifier, images)
    probs = logits.softmax(dim=1)
    precision, recall = precision_recall(ref_features, features, k=3)
    return {
        "accuracy": float((logits.argmax(dim=1) == labels).double().mean()),
        "p_class": float(probs[torch.arange(len(labels)), labels].double().mean()),
        "precision": precision, "recall": recall,
        "fd": frechet_distance(gaussian_stats(features), gaussian_stats(ref_features)),
        "spread": within_class_spread(features, labels) / ref_spread,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run directory or checkpoint of a conditional model")
    parser.add_argument("--weights", default="0,1,2,3,5", help="guidance weights w")
    parser.add_argument("--per_class", type=int, default=20, help="samples of each digit per w")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picture", help="PNG: one row per class at the most accurate w")
    parser.add_argument("--columns", type=int, default=10, help="images per row of --picture")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    loaded = load_checkpoint(args.checkpoint, device=device)
    cfg = loaded.config
    if cfg.model.num_classes != 10 or cfg.data.dataset not in ("digits", "mnist"):
        print("this benchmark needs a 10-class digits model (configs/mnist_cond.yaml)",
              file=sys.stderr)
        return 2
    sample_cfg = replace(cfg.sample, nrow=args.per_class, seed=args.seed,
                         steps=args.steps or cfg.sample.steps)
    cfg = replace(cfg, sample=sample_cfg)
    classifier = load_digit_classifier(device)
    (ref_x, ref_y), (real_x, real_y) = split_held_out(args.per_class)
    ref_features, _ = digit_outputs(classifier, ref_x)
    reference = (ref_features, within_class_spread(ref_features, ref_y))

    print(f"checkpoint {loaded.path} (step {loaded.step}); sampler {sample_cfg.sampler}, "
          f"{sample_cfg.steps} steps; {args.per_class} samples per digit per w; classifier: "
          f"{describe()}; {torch.get_num_threads()} CPU threads", flush=True)
    rows: list[tuple[str, dict[str, float], float]] = [
        ("real", score(classifier, real_x, real_y, reference), 0.0)]
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None
    for w in (float(v) for v in args.weights.split(",")):
        start = time.perf_counter()
        out = generate(loaded.model, cfg, device, class_label="all", guidance=w)
        seconds = time.perf_counter() - start
        row = score(classifier, out.images, out.labels, reference)
        rows.append((f"{w:g}", row, seconds))
        print(f"  w={w:g}: accuracy {row['accuracy']:.1%} in {seconds:.0f} s", flush=True)
        if best is None or row["accuracy"] > best[0]:
            best = (row["accuracy"], w, out.images, out.labels)

    print("\n| w | class accuracy | p(class) | precision | recall | digit-FD | spread | "
          "sampling s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row, seconds in rows:
        print(f"| {name} | {row['accuracy']:.1%} | {row['p_class']:.3f} | "
              f"{row['precision']:.2f} | {row['recall']:.2f} | {row['fd']:.1f} | "
              f"{row['spread']:.2f} | {seconds:.0f} |" if name != "real" else
              f"| real digits | {row['accuracy']:.1%} | {row['p_class']:.3f} | "
              f"{row['precision']:.2f} | {row['recall']:.2f} | {row['fd']:.1f} | "
              f"{row['spread']:.2f} | |")
    if args.picture and best is not None:
        _, w, images, labels = best
        columns = min(args.columns, args.per_class)
        keep = torch.cat([torch.nonzero(labels == d).flatten()[:columns] for d in range(10)])
        path = atomic_save(to_pil(make_grid(to_uint8(images[keep]), columns)),
                           Path(args.picture))
        print(f"\npicture (w={w:g}, one row per digit 0..9): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
