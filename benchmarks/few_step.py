"""Few-step generation: a consistency model tuned from a teacher (``pixeldiffusion distill``)
against the teacher's best training-free sampler at the same number of model calls.

    python benchmarks/few_step.py runs/digits                       # 20 core-minutes, 5,000 images
    python benchmarks/few_step.py runs/digits --minutes 0.2 --samples 100   # a smoke test

Everything runs on one core with one thread (``--core``, taskset-style affinity plus
torch.set_num_threads(1)), so a minute is a core-minute:

* tuned: ``pixeldiffusion distill -cp TEACHER`` for ``--minutes`` of wall clock at most, then
  SIGINT (the run saves its current step, the documented Ctrl-C behaviour). Defaults are the
  run measured in docs/consistency.md (``--train.steps 5600 --train.lr 2e-4`` on distill's
  defaults: ECT's q = 2 with Delta t halved every steps / 8, the teacher's dropout) unless
  ``--distill`` overrides set them (``--distill "--method cd"`` for consistency distillation);
  sampled at ``--steps`` (1, 2, 4) from the EMA weights. ``--distill "--method pd ..."``
  (progressive distillation) samples each step count from the stage that ended there (its
  stage file under RUN/progressive).
* teacher: every ``--teacher_samplers`` SAMPLER:SPACING at each ``--nfe`` (1, 2, 4, 10, 20 model
  calls); the table keeps the best digit-FID per NFE and names its sampler.
* floor: held-out real digits (never seen by the digit classifier), as many as the samples.

Each setting draws ``--samples`` images (seed 0), scored by ``evaluate.score`` with the offline
digit extractor against the 4,000 held-in built-in digits; images per second is the sampling
throughput on that one core. Prints one table and writes ``--out``/same_noise.png: the same
noise through the teacher at 2 calls and the tuned model at 1 and 2 steps, one row each.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from digits_score import digit_fid_scorer, held_out_digits

from pixeldiffusion.checkpoint import LoadedCheckpoint, load_checkpoint
from pixeldiffusion.config import Config, from_dict
from pixeldiffusion.generate import generate
from pixeldiffusion.images import save_grid
from pixeldiffusion.progressive import student_file
from pixeldiffusion.samplers import nfe_of

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")
# 5,600 steps: about 18 minutes on one core of the AVX-512 EPYC (0.19 s a step)
TUNING = ["--train.steps", "5600", "--train.lr", "2e-4"]


def pin(core: int) -> None:
    """Run this process (and its children) on one core with one thread."""
    os.sched_setaffinity(0, {core})
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def tune(teacher: str, minutes: float, run_dir: Path, overrides: list[str]) -> tuple[Path, int]:
    """``pixeldiffusion distill`` for ``minutes`` of wall clock; (checkpoint, optimizer steps)."""
    given = {o for o in overrides if o.startswith("--")}
    defaults = [a for k, v in zip(TUNING[::2], TUNING[1::2], strict=True)
                if k not in given for a in (k, v)]
    command = [sys.executable, "-m", "pixeldiffusion", "distill", "-cp", teacher, "-e",
               str(run_dir), "--no_progress", "--train.eval_samples", "0",
               "--train.sample_every", "0", "--train.save_every", "0", *defaults, *overrides]
    process = subprocess.Popen(command, cwd=REPO)
    try:
        process.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait()
    loaded = load_checkpoint(run_dir)
    return loaded.path, loaded.step


def stage_student(student: LoadedCheckpoint, run_dir: Path, steps: int) -> torch.nn.Module | None:
    """The tuned network that samples in ``steps`` steps: a consistency model's own; for
    progressive distillation the student of the stage that ended at ``steps``
    (``progressive.student_file``), or the final checkpoint at ``to_steps``; None where no stage
    ended there."""
    p = student.config.progressive
    if not p.teacher or steps == p.to_steps:
        return student.model
    path = student_file(run_dir, p, steps)
    return None if path is None else load_checkpoint(path).model


def draw(model: torch.nn.Module, cfg: Config, n: int, **sample: object) -> tuple[torch.Tensor,
                                                                                  float]:
    """n images (seed 0) with the sample-section values ``sample``; (images, images/second).
    A class-conditional model draws a random digit per image at w = 1, so that the metric sees
    the whole distribution whatever rows its own grid shows."""
    labels = {"class_label": "random", "guidance": 1.0} if cfg.model.num_classes else {}
    cfg = from_dict({"sample": {"n_samples": n, "batch_size": 250, "seed": 0, **labels,
                                **sample}}, base=cfg)
    start = time.perf_counter()
    images = generate(model, cfg, DEVICE).images
    return images, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", help="the teacher checkpoint (run directory or file)")
    parser.add_argument("--minutes", type=float, default=20.0, help="core-minutes of tuning")
    parser.add_argument("--samples", type=int, default=5000, help="images per setting")
    parser.add_argument("--steps", default="1,2,4", help="the tuned model's steps")
    parser.add_argument("--nfe", default="1,2,4,10,20", help="the teacher's model calls")
    parser.add_argument("--teacher_samplers",
                        default="dpmpp_2m:logsnr,dpmpp_2m_sde:uniform,unipc:logsnr,ddim:uniform",
                        help="SAMPLER:SPACING pairs tried for the teacher")
    parser.add_argument("--distill", default="", help="extra distill overrides, quoted")
    parser.add_argument("--core", type=int, default=0, help="the one core to run on")
    parser.add_argument("--out", type=Path, default=Path("few_step"))
    args = parser.parse_args()
    pin(args.core)
    args.out.mkdir(parents=True, exist_ok=True)

    digit_fid, _ = digit_fid_scorer()
    held_out = held_out_digits()
    rows = [("held-out real digits (floor)", "", digit_fid(held_out[:args.samples]), "")]

    checkpoint, steps = tune(args.teacher, args.minutes, args.out / "tuned",
                             shlex.split(args.distill))
    student = load_checkpoint(checkpoint)
    teacher = load_checkpoint(args.teacher)
    progressive = student.config.progressive
    method = "PD" if progressive.teacher else student.config.consistency.method.upper()
    pictures = {}
    for n_steps in (int(s) for s in args.steps.split(",")):
        model = stage_student(student, args.out / "tuned", n_steps)
        if model is None:
            print(f"no {n_steps}-step student: progressive distillation from "
                  f"{progressive.from_steps} to {progressive.to_steps} steps made none")
            continue
        images, speed = draw(model, student.config, args.samples, steps=n_steps)
        pictures[f"tuned {n_steps}"] = images[:8]
        rows.append((f"tuned ({steps} steps of {method}), {n_steps} step(s)", n_steps,
                     digit_fid(images), f"{speed:.0f}"))
    for nfe in (int(s) for s in args.nfe.split(",")):
        best = None
        for pair in args.teacher_samplers.split(","):
            sampler, spacing = pair.split(":")
            if nfe_of(sampler, nfe) != nfe:
                continue
            images, speed = draw(teacher.model, teacher.config, args.samples, sampler=sampler,
                                 steps=nfe, spacing=spacing, eta=None)
            fid = digit_fid(images)
            if best is None or fid < best[0]:
                best = (fid, f"teacher, {sampler} {spacing}", speed, images[:8])
        if best is not None:
            rows.append((best[1], nfe, best[0], f"{best[2]:.0f}"))
            pictures[f"teacher {nfe}"] = best[3]

    print(f"Few-step digits: {args.samples} samples per row, one core "
          f"({os.cpu_count()} on the machine), {args.minutes:g} minutes of tuning\n")
    print("| model | NFE | digit-FID | images/s |\n|---|---:|---:|---:|")
    for name, nfe, fid, speed in rows:
        print(f"| {name} | {nfe} | {fid:.2f} | {speed} |")
    chosen = [pictures[k] for k in ("teacher 2", "tuned 1", "tuned 2") if k in pictures]
    if chosen:
        grid = save_grid(torch.cat(chosen), args.out / "same_noise.png", nrow=8)
        print(f"\nrows: teacher at 2 calls, tuned at 1 and 2 steps (same noise): {grid}")


if __name__ == "__main__":
    main()
