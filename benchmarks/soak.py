"""Soak test: SIGKILL a real training run at random moments, resume it each time, and check that
the final weights equal, bit for bit, those of a run that was never interrupted.

    python benchmarks/soak.py --kills 8 --steps 40 --save_every 2

Each round starts ``pixeldiffusion train -e DIR --resume auto`` (the first one starts the run),
waits until it has written a checkpoint (so that every round makes progress, however busy the
machine), sleeps a random time and sends SIGKILL, the signal that cannot be caught: no handler
runs, files are left as they are, possibly in the middle of a checkpoint write. A last round
trains to the end. The table shows what each kill left behind; the verdict compares every
tensor of the final checkpoint (raw and EMA weights) with the uninterrupted run's. Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = ["--model.channels", "8", "--model.channel_mult", "1,2", "--model.num_res_blocks", "1",
        "--model.attn_resolutions", "16", "--model.norm_groups", "4", "--model.dropout", "0.1",
        "--diffusion.timesteps", "50", "--train.batch_size", "4", "--train.log_every", "2",
        "--train.sample_every", "0", "--train.warmup_steps", "2", "--train.tensorboard", "false",
        "--data.random_flip", "true", "--sample.steps", "3", "--sample.n_samples", "4",
        "--sample.nrow", "2", "--sample.batch_size", "4", "--train.eval_samples", "0",
        "--device", "cpu"]
SOURCE = Path(__file__).resolve().parent.parent / "src" / "pixeldiffusion"


def train_args(run: Path, steps: int, save_every: int, resume: bool) -> list[str]:
    args = [sys.executable, "-m", "pixeldiffusion", "train", "-e", str(run), *TINY,
            "--train.steps", str(steps),
            "--train.save_every", str(save_every), "--no_progress"]
    return args + (["--resume", "auto"] if resume else [])


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "weights.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8, help="SIGKILLs before the last round")
    parser.add_argument("--steps", type=int, default=40, help="training steps in all")
    parser.add_argument("--save_every", type=int, default=2, help="checkpoint interval")
    parser.add_argument("--max_delay", type=float, default=3.0,
                        help="kill at a uniform random time in [0, max_delay] s after the round's "
                             "first checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="pixeldiffusion-soak-"))
    # every round runs the same frozen copy of the package, even if the tree is edited meanwhile
    shutil.copytree(SOURCE, work / "src" / "pixeldiffusion",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(work / "src")}
    started = time.time()

    reference = work / "uninterrupted"
    subprocess.run(train_args(reference, args.steps, args.save_every, False), check=True,
                   capture_output=True, env=env)

    run = work / "killed"
    print("| kill | after a save (s) | newest checkpoint left | half-written .tmp left |")
    print("|---:|---:|---|---|")
    kills = 0
    for round_ in range(args.kills):
        proc = subprocess.Popen(train_args(run, args.steps, args.save_every, round_ > 0),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=env)
        pointer = run / "checkpoints" / "latest"
        before = pointer.read_text() if pointer.exists() else None
        # on a busy machine a fixed delay may never reach a save: wait for this round's first
        # checkpoint, then kill at a random moment after it
        while proc.poll() is None and (pointer.read_text() if pointer.exists() else None) \
                == before:
            time.sleep(0.01)
        delay = rng.uniform(0.0, args.max_delay)
        time.sleep(delay)
        if proc.poll() is not None:  # it finished before the kill: nothing left to interrupt
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        newest = pointer.read_text().strip() if pointer.exists() else "none yet"
        debris = sorted(p.name for p in (run / "checkpoints").glob(".*.tmp")) \
            if (run / "checkpoints").is_dir() else []
        print(f"| {kills} | {delay:.2f} | {newest} | {', '.join(debris) or 'no'} |", flush=True)
    done = subprocess.run(train_args(run, args.steps, args.save_every, True),
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"the last round failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
        return 1

    expected, got = final_weights(reference), final_weights(run)
    same_keys = expected.keys() == got.keys()
    max_diff = max((float((expected[k] - got[k]).abs().max()) for k in expected), default=0.0) \
        if same_keys else float("nan")
    exact = same_keys and all(torch.equal(expected[k], got[k]) for k in expected)
    print(f"\n{kills} SIGKILLs, {args.steps} steps, checkpoint every {args.save_every}: final "
          f"weights ({len(expected)} tensors) {'bit-exact' if exact else 'DIFFER'} vs the "
          f"uninterrupted run (max |diff| {max_diff:.3g}); {time.time() - started:.0f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"run directories: {work}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
