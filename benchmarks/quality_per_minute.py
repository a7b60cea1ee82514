"""Quality per CPU minute: our digits recipes against a diffusers recipe, same CPU time.

    pip install -e ".[bench]"                                  # diffusers, for this script only
    python benchmarks/quality_per_minute.py                     # ours 20 min, diffusers 20 + 60
    python benchmarks/quality_per_minute.py --minutes 1 --samples 100    # a smoke test
    python benchmarks/quality_per_minute.py --ours default= \
        --ours "wide=--model.channels 32 --train.lr_schedule cosine --train.steps 2400"
    python benchmarks/quality_per_minute.py --ours "cond=-c configs/mnist_cond_cosine.yaml" \
        --diffusers_minutes                                     # the floor-goal recipe alone
    python benchmarks/quality_per_minute.py --ours "edm=-c configs/mnist_edm.yaml" \
        --ours "flow=-c configs/mnist_flow.yaml" --diffusers_minutes  # the other formulations
    python benchmarks/quality_per_minute.py --ours "ddpm=-c configs/mnist_cosine_8k.yaml" \
        --diffusers_minutes --samples 5000 --autoguidance 2000:2   # the best recipe, autoguided

Each recipe gets one CPU core and one thread (``--cores 2``, the default on a machine with two
or more): the diffusers run on core 1 for the longest of ``--diffusers_minutes``, keeping its EMA
weights at each shorter mark, while our recipes train one after another on core 0 (``--core``
swaps them; with ``--diffusers_minutes`` empty, two runs on cores 0 and 1 tune two recipes at
once). So a "minute" here is one core-minute, the same for both, and the whole benchmark takes
about the longest diffusers budget plus sampling. ``--cores 1`` runs everything one after
another on all cores instead.

* ours: ``pixeldiffusion train`` with the default config plus each ``--ours NAME=OVERRIDES``
  (``--section.key value`` pairs, or ``-c CONFIG`` first), ``--train.steps`` raised unless the
  overrides set it or name a config file (``-c configs/mnist_cosine.yaml``), and no
  grids, checkpoints or evaluation during the run (the diffusers loop does none either). After
  the given minutes the script sends SIGINT and the run saves its current step (the documented
  Ctrl-C behaviour). Samples: the checkpoint's own ``sample`` config, EMA weights, through
  its formulation's bridge (``generate``; DDPM, EDM or flow matching, as the run trained).
* diffusers: what a user writes from diffusers' ``examples/unconditional_image_generation/
  train_unconditional.py``: ``UNet2DModel`` of the same widths (benchmarks/throughput.py's
  ``diffusers_unet``, same parameter count), ``DDPMScheduler`` (1000 steps, linear betas),
  AdamW (lr 1e-4, weight decay 1e-6, the example's defaults) with 500 warm-up steps, batch 16,
  ``EMAModel`` (max decay 0.9999, power 3/4), the plain MSE loss; sampled with ``DDIMScheduler``
  at 50 steps (eta 0) from the EMA weights.
* autoguided (``--autoguidance STEP:W``): each of our recipes once more, guided (Karras et
  al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself") by its own early self:
  the power-function EMA of sigma_rel 0.05 at step STEP, rebuilt from the run's post-hoc EMA
  snapshots (so the recipes must record them, ``--train.posthoc_ema_every K`` with K <= STEP;
  checked before any training), at weight W; twice the model calls of the unguided row.
* floor: held-out real digits (never seen by the digit classifier), as many as the samples,
  scored the same way.

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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from digits_score import digit_fid_scorer, held_out_digits
from PIL import Image

from pixeldiffusion.checkpoint import load_checkpoint
from pixeldiffusion.config import Config, load_config
from pixeldiffusion.digit_classifier import builtin_digits
from pixeldiffusion.ema_snapshots import reconstruct_run, save_reconstruction
from pixeldiffusion.errors import PixelDiffusionError
from pixeldiffusion.generate import generate
from pixeldiffusion.guidance import load_guidance_model
from pixeldiffusion.images import save_grid

REPO = Path(__file__).resolve().parents[1]
GUIDE_SIGMA_REL = 0.05  # the guide's EMA length: EDM2's shorter tracked profile


def pin(core: int | None) -> None:
    """Run this process (and its children) on one core with one thread; None = leave as is."""
    if core is not None:
        os.sched_setaffinity(0, {core})
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def train_ours(minutes: float, run_dir: Path, overrides: list[str]) -> tuple[Path, int]:
    """Train the default config + ``overrides`` for ``minutes`` of wall clock; returns
    (checkpoint, optimizer steps)."""
    command = [sys.executable, "-m", "pixeldiffusion", "train", "-e", str(run_dir), "--no_progress",
               "--train.eval_samples", "0", "--train.sample_every", "0", "--train.save_every", "0",
               *overrides]
    if "--train.steps" not in overrides and not {"-c", "--config"} & set(overrides):
        command += ["--train.steps", "10000000"]  # a config file (-c) keeps its own steps
    process = subprocess.Popen(command, cwd=REPO)
    try:
        process.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # the run saves its current step, then exits 130
        process.wait()
    loaded = load_checkpoint(run_dir, device="cpu")
    return loaded.path, loaded.step


def train_diffusers(marks: list[float], seed: int = 0) -> list[tuple[dict, int]]:
    """The diffusers recipe for ``max(marks)`` minutes of wall clock; returns its EMA weights
    and optimizer steps at each mark."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = _diffusers_unet()
    x_all, _ = builtin_digits("all")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999),
                                  weight_decay=1e-6, eps=1e-8)
    # the example's cosine schedule over its planned run; a 60-minute run is ~1,200 steps here
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, 500, 100_000)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=3 / 4, model_cls=type(model), model_config=model.config)
    start, steps, kept = time.monotonic(), 0, []
    model.train()
    for mark in sorted(marks):
        while time.monotonic() < start + mark * 60:
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
        kept.append((ema_model.state_dict(), steps))
    return kept


def _diffusers_unet():
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import diffusers_unet

    return diffusers_unet(load_config(None))


def _machine() -> str:
    """throughput.py's line naming the CPU, its flags and the load, for the quoted table."""
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import machine_header

    return machine_header(torch.device("cpu"))


@torch.no_grad()
def sample_diffusers(weights: dict, n: int, batch: int = 250, seed: int = 0) -> torch.Tensor:
    """DDIM-50 (eta 0) samples of the diffusers UNet with ``weights``: [n, 1, 32, 32] in [-1, 1]."""
    from diffusers import DDIMScheduler

    model = _diffusers_unet()
    model.load_state_dict(weights)
    model.eval()
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


def sample_ours(checkpoint: Path, n: int, seed: int = 0, *, guide: Path | None = None,
                guidance: float | None = None) -> tuple[torch.Tensor, Config]:
    """The checkpoint's own sampler config from the EMA weights: ([n, 1, 32, 32] in [-1, 1],
    the checkpoint's config); autoguided by the checkpoint ``guide`` at weight ``guidance``
    when given."""
    from dataclasses import replace

    loaded = load_checkpoint(checkpoint, device="cpu")
    cfg = replace(loaded.config, sample=replace(loaded.config.sample, n_samples=n, seed=seed))
    guide_model = None if guide is None else load_guidance_model(guide, cfg)
    return generate(loaded.model, cfg, torch.device("cpu"), micro_batch=250, guidance=guidance,
                    guidance_model=guide_model).images, loaded.config


def parse_autoguidance(text: str) -> tuple[int, float]:
    """``STEP:W`` -> (the snapshot step of the guide, the autoguidance weight)."""
    step, _, weight = text.partition(":")
    try:
        return int(step), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected STEP:W, e.g. 2000:2 (the run's own post-hoc EMA at step 2000 "
            f"guides it at weight 2)") from None


def check_snapshots(recipes: list[tuple[str, list[str]]], step: int) -> None:
    """Before any training: every recipe must record post-hoc EMA snapshots by ``step``, the
    guide autoguidance rebuilds from them."""
    for name, overrides in recipes:
        has_file = overrides[:1] in (["-c"], ["--config"])
        path, rest = (overrides[1], overrides[2:]) if has_file else (None, overrides)
        every = load_config(path, rest).train.posthoc_ema_every
        if not 0 < every <= step:
            raise SystemExit(f"--autoguidance rebuilds each run's guide at step {step} from its "
                             f"post-hoc EMA snapshots, but recipe {name!r} records none by then "
                             f"(train.posthoc_ema_every {every}); add --train.posthoc_ema_every "
                             f"K with K <= {step} to its overrides")


def rebuild_guide(run_dir: Path, step: int, out: Path) -> tuple[Path, int]:
    """The run's power-function EMA (sigma_rel 0.05, EDM2's short profile) at the last
    snapshot at or before ``step``, written as a checkpoint: (the guide of autoguidance, its
    step)."""
    try:
        rebuilt = reconstruct_run(run_dir, GUIDE_SIGMA_REL, step)
    except PixelDiffusionError as err:  # e.g. a run stopped by its minutes before the snapshot
        raise SystemExit(f"no autoguidance guide for {run_dir}: {err}") from None
    return save_reconstruction(rebuilt, out), rebuilt.step


def diffusers_worker(args: argparse.Namespace) -> None:
    """Train the diffusers recipe, sample at every mark; writes diffusers-<m>min.npz files."""
    pin(args.core)
    for minutes, (weights, steps) in zip(sorted(args.diffusers_minutes),
                                         train_diffusers(args.diffusers_minutes), strict=True):
        images = sample_diffusers(weights, args.samples)
        np.savez(Path(args.out) / f"diffusers-{minutes:g}min.npz",
                 images=images.numpy().astype(np.float32), steps=steps)


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


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """``NAME=--section.key value ...`` -> (NAME, override tokens)."""
    name, _, overrides = text.partition("=")
    if not name:
        raise SystemExit(f"--ours {text!r}: expected NAME=OVERRIDES, "
                         f"e.g. 'wide=--model.channels 32'")
    return name, overrides.split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, help="one budget for every run (smoke tests)")
    parser.add_argument("--ours", action="append", type=parse_recipe,
                        help="NAME=OVERRIDES, repeatable (default: 'default=', the defaults)")
    parser.add_argument("--ours_minutes", type=float, default=20.0)
    parser.add_argument("--diffusers_minutes", type=float, nargs="*", default=[20.0, 60.0],
                        help="budgets of the diffusers recipe; none = only our recipes")
    parser.add_argument("--samples", type=int, default=1000, help="images per model")
    parser.add_argument("--cores", type=int, choices=(1, 2),
                        default=2 if len(os.sched_getaffinity(0)) >= 2 else 1,
                        help="2: diffusers on core 1 while ours run on core 0, one thread each")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "quality_per_minute"))
    parser.add_argument("--autoguidance", type=parse_autoguidance, metavar="STEP:W",
                        help="also score each recipe autoguided (Karras et al. 2024) by its own "
                             "post-hoc EMA at step STEP, weight W; the recipes must record "
                             "snapshots (--train.posthoc_ema_every)")
    parser.add_argument("--worker", choices=("diffusers",), help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=0,
                        help="with --cores 2, the core our recipes run on (default 0); two runs "
                             "with no diffusers budget can then train two recipes at once")
    args = parser.parse_args()
    if args.minutes is not None:
        args.ours_minutes, args.diffusers_minutes = args.minutes, [args.minutes]
    return args


def score_ours(args: argparse.Namespace, recipes: list[tuple[str, list[str]]], out: Path,
               digit_fid: Callable[[torch.Tensor], float]) -> tuple[list[tuple], list[Path]]:
    """Train and score each of our recipes (and, with ``--autoguidance``, each autoguided
    by its own early post-hoc EMA): (table rows, grid PNGs)."""
    rows, grids = [], []
    for name, overrides in recipes:
        began = time.monotonic()
        checkpoint, steps = train_ours(args.ours_minutes, out / f"ours-{name}", overrides)
        trained = f"{(time.monotonic() - began) / 60:.1f}"
        images, config = sample_ours(checkpoint, args.samples)
        sampling = f"{config.sample.sampler}-{config.sample.steps}"
        if config.model.num_classes:  # say how the labels were drawn: it changes the task
            sampling += f", class {config.sample.class_label}, w {config.sample.guidance:g}"
        grids.append(save_grid(images[:64], out / f"ours-{name}.png"))
        label = f"pixeldiffusion {name} ({' '.join(overrides) or 'the defaults'}), {sampling}"
        rows.append((label, trained, steps, digit_fid(images)))
        if args.autoguidance:
            (step, weight), run_dir = args.autoguidance, out / f"ours-{name}"
            guide, at = rebuild_guide(run_dir, step, out / f"ours-{name}-guide.safetensors")
            images, _ = sample_ours(checkpoint, args.samples, guide=guide, guidance=weight)
            grids.append(save_grid(images[:64], out / f"ours-{name}-autoguided.png"))
            rows.append((f"{label}, autoguided by its own step-{at} post-hoc EMA (sigma_rel "
                         f"{GUIDE_SIGMA_REL:g}), w {weight:g}, twice the model calls",
                         trained, steps, digit_fid(images)))
    return rows, grids


def main() -> None:
    args = parse_args()
    if args.worker == "diffusers":
        return diffusers_worker(args)
    recipes = args.ours or [("default", [])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, _ in recipes:
        if (out / f"ours-{name}").exists():
            raise SystemExit(f"{out / f'ours-{name}'} exists; remove it or pass another --out")
    if args.autoguidance:
        check_snapshots(recipes, args.autoguidance[0])

    worker = [sys.executable, __file__, "--worker", "diffusers", "--out", str(out),
              "--samples", str(args.samples), "--diffusers_minutes",
              *map(str, args.diffusers_minutes)]
    background = None
    if args.cores == 2 and args.diffusers_minutes:
        background = subprocess.Popen([*worker, "--core", str(1 - args.core)])
    if args.cores == 2:
        pin(args.core)

    digit_fid, extractor_description = digit_fid_scorer()
    held_out = held_out_digits()
    floor = digit_fid(held_out[:args.samples])
    rows = [("held-out real digits (floor)", "", "", floor)]
    grids = [save_grid(held_out[:64], out / "real.png")]
    ours_rows, ours_grids = score_ours(args, recipes, out, digit_fid)
    rows, grids = rows + ours_rows, grids + ours_grids
    if background is not None:
        if background.wait() != 0:
            raise SystemExit("the diffusers run failed (its error is above)")
    elif args.diffusers_minutes:
        subprocess.run(worker, check=True)
    for minutes in sorted(args.diffusers_minutes):
        saved = np.load(out / f"diffusers-{minutes:g}min.npz")
        images = torch.from_numpy(saved["images"])
        grids.append(save_grid(images[:64], out / f"diffusers-{minutes:g}min.png"))
        rows.append(("diffusers UNet2DModel recipe, DDIM-50", f"{minutes:g}", int(saved["steps"]),
                     digit_fid(images)))
    side_by_side(grids, out / "side_by_side.png")
    cores = "one core and one thread per recipe" if args.cores == 2 else "all cores, in turn"
    print(f"\n{_machine()}")
    print(f"{os.cpu_count()} CPU(s) ({cores}), torch {torch.__version__}; {args.samples} "
          f"samples per row, digit-FID vs the 4,000 held-in built-in digits "
          f"({extractor_description})")
    print("| recipe | minutes | optimizer steps | digit-FID | x floor |\n|---|---:|---:|---:|---:|")
    for name, minutes, steps, value in rows:
        print(f"| {name} | {minutes} | {steps} | {value:.2f} | {value / floor:.1f} |")
    print(f"grids: {out / 'side_by_side.png'} (real, then the rows above in order)")


if __name__ == "__main__":
    main()
