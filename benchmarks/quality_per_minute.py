"""Quality per CPU minute: our default digits run against a diffusers recipe, same wall clock.

    pip install -e ".[bench]"                                  # diffusers, for this script only
    python benchmarks/quality_per_minute.py                     # ours 20 min, diffusers 20 + 60
    python benchmarks/quality_per_minute.py --minutes 1 --samples 100    # a smoke test

* ours: ``pixeldiffusion train`` with the default config (configs/mnist.yaml) and
  ``--train.steps`` raised so that the clock, not the step count, ends it: after the given
  minutes the script sends SIGINT, and the run saves its current step (the documented Ctrl-C
  behaviour). Samples: the config's own sampler (DDPM ancestral, 100 steps), EMA weights.
* diffusers: what a user writes from diffusers' ``examples/unconditional_image_generation/
  train_unconditional.py``: ``UNet2DModel`` of the same widths (benchmarks/throughput.py's
  ``diffusers_unet``, same parameter count), ``DDPMScheduler`` (1000 steps, linear betas),
  AdamW (lr 1e-4, weight decay 1e-6, the example's defaults) with 500 warm-up steps, batch 16,
  ``EMAModel`` (max decay 0.9999, power 3/4), the plain MSE loss; sampled with ``DDIMScheduler``
  at 50 steps (eta 0) from the EMA weights.
* floor: the 1,000 held-out real digits (never seen by the digit classifier) scored the same way.

Each model draws ``--samples`` images (seed 0), scored by ``evaluate.score`` with the offline
digit extractor against the 4,000 held-in built-in digits. Prints one table (digit-FID, the
ratio to the floor, steps, minutes) and writes each recipe's 64-image grid plus one picture with
the grids side by side to ``--out``. The machine must be otherwise idle for a fair comparison.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pixeldiffusion import evaluate
from pixeldiffusion.checkpoint import load_checkpoint
from pixeldiffusion.config import load_config
from pixeldiffusion.digit_classifier import builtin_digits
from pixeldiffusion.generate import generate
from pixeldiffusion.images import save_grid

REPO = Path(__file__).resolve().parents[1]


def train_ours(minutes: float, run_dir: Path) -> tuple[Path, int]:
    """Train the default config for ``minutes`` of wall clock; returns (checkpoint, steps)."""
    command = [sys.executable, "-m", "pixeldiffusion", "train", "-e", str(run_dir),
               "--train.steps", "10000000", "--train.eval_samples", "0", "--no_progress"]
    process = subprocess.Popen(command, cwd=REPO)
    try:
        process.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # the run saves its current step, then exits 130
        process.wait()
    loaded = load_checkpoint(run_dir, device="cpu")
    return loaded.path, loaded.step


def train_diffusers(minutes: float, seed: int = 0):
    """The diffusers recipe for ``minutes`` of wall clock; returns (EMA UNet, steps)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import diffusers_unet

    torch.manual_seed(seed)
    cfg = load_config(None)
    model = diffusers_unet(cfg)
    x_all, _ = builtin_digits("all")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999),
                                  weight_decay=1e-6, eps=1e-8)
    # the example's cosine schedule over its planned run; a 60-minute run is ~1,200 steps here
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, 500, 100_000)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=3 / 4, model_cls=type(model), model_config=model.config)
    deadline, steps = time.monotonic() + minutes * 60, 0
    model.train()
    while time.monotonic() < deadline:
        x0 = x_all[torch.randint(len(x_all), (16,))]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (16,))
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        steps += 1
    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model.parameters())
    return ema_model.eval(), steps


@torch.no_grad()
def sample_diffusers(model, n: int, batch: int = 250, seed: int = 0) -> torch.Tensor:
    """DDIM-50 (eta 0) samples of a diffusers UNet: [n, 1, 32, 32] in [-1, 1]."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, n, batch):
        x = torch.randn((min(batch, n - start), 1, 32, 32), generator=generator)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x, eta=0.0).prev_sample
        images.append(x.clamp(-1, 1))
    return torch.cat(images)


def sample_ours(checkpoint: Path, n: int, seed: int = 0) -> torch.Tensor:
    """The config's own sampler (DDPM, 100 steps) from the EMA weights: [n, 1, 32, 32]."""
    from dataclasses import replace

    loaded = load_checkpoint(checkpoint, device="cpu")
    cfg = replace(loaded.config, sample=replace(loaded.config.sample, n_samples=n, seed=seed))
    return generate(loaded.model, cfg, torch.device("cpu"), micro_batch=250).images


def side_by_side(grids: list[Path], path: Path) -> Path:
    """The grid PNGs next to each other, 8 px apart, on white."""
    pictures = [np.asarray(Image.open(g).convert("L")) for g in grids]
    height = max(p.shape[0] for p in pictures)
    gap = np.full((height, 8), 255, np.uint8)
    row = []
    for p in pictures:
        row += [np.pad(p, ((0, height - p.shape[0]), (0, 0)), constant_values=255), gap]
    Image.fromarray(np.concatenate(row[:-1], axis=1)).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, help="one budget for every run (smoke tests)")
    parser.add_argument("--ours_minutes", type=float, nargs="+", default=[20.0])
    parser.add_argument("--diffusers_minutes", type=float, nargs="+", default=[20.0, 60.0])
    parser.add_argument("--samples", type=int, default=1000, help="images per model")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "quality_per_minute"))
    args = parser.parse_args()
    if args.minutes is not None:
        args.ours_minutes = args.diffusers_minutes = [args.minutes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extractor = evaluate.digit_extractor()
    reference = evaluate.reference_features("digits", extractor, resolution=32, channels=1)

    def digit_fid(x: torch.Tensor) -> float:
        return evaluate.score(evaluate.Images(x, None, ""), reference, extractor,
                              kid_subsets=10)[0]["digit_fid"]

    held_out, _ = builtin_digits("heldout")  # sorted by class: take a random subset
    held_out = held_out[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))]
    floor = digit_fid(held_out[:args.samples])
    rows = [("held-out real digits (floor)", "", "", floor)]
    grids = [save_grid(held_out[:64], out / "real.png")]
    for minutes in args.ours_minutes:
        run_dir = out / f"ours-{minutes:g}min"
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists; remove it or pass another --out")
        checkpoint, steps = train_ours(minutes, run_dir)
        images = sample_ours(checkpoint, args.samples)
        grids.append(save_grid(images[:64], out / f"ours-{minutes:g}min.png"))
        rows.append(("pixeldiffusion default, DDPM-100", minutes, steps, digit_fid(images)))
    for minutes in args.diffusers_minutes:
        model, steps = train_diffusers(minutes)
        images = sample_diffusers(model, args.samples)
        grids.append(save_grid(images[:64], out / f"diffusers-{minutes:g}min.png"))
        rows.append(("diffusers UNet2DModel recipe, DDIM-50", minutes, steps, digit_fid(images)))
    side_by_side(grids, out / "side_by_side.png")
    print(f"\n{os.cpu_count()} CPU(s), torch {torch.__version__}; {args.samples} samples per "
          f"row, digit-FID vs the 4,000 held-in built-in digits ({extractor.description})")
    print("| recipe | minutes | optimizer steps | digit-FID | x floor |\n|---|---:|---:|---:|---:|")
    for name, minutes, steps, value in rows:
        print(f"| {name} | {minutes} | {steps} | {value:.2f} | {value / floor:.1f} |")
    print(f"grids: {out / 'side_by_side.png'} (real, then the rows above in order)")


if __name__ == "__main__":
    main()
