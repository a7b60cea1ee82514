"""``pixeldiffusion train | sample``: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PixelDiffusionError

if TYPE_CHECKING:
    from .evaluate import EvalOptions

SAMPLE_HELP = """examples:
  pixeldiffusion sample -cp runs/exp-XXX                      # newest checkpoint, EMA weights
  pixeldiffusion sample -cp runs/exp-XXX --sampler ddpm --steps 1000 --var_type fixed_large
  pixeldiffusion sample -cp ckpt.safetensors --mode progressive -bs 8 --interval 10
  pixeldiffusion sample -cp runs/cond --class 7 --guidance 3    # class-conditional models
  pixeldiffusion sample -cp runs/exp-XXX --guidance_model runs/exp-XXX/checkpoints/step-0000400 \
      --guidance 2                                            # autoguidance by an earlier ckpt
"""

TRAIN_HELP = """Any config key can be overridden as --section.key value, e.g.
  pixeldiffusion train --train.steps 500 --model.channels 32 --diffusion.beta_schedule cosine
  pixeldiffusion train -c configs/cifar10.yaml -e runs/cifar --train.mixed_precision bf16
  pixeldiffusion train -e runs/cifar --resume auto          # continue where it stopped
  pixeldiffusion train --train.logger wandb --train.wandb_project digits   # pip install wandb
"""


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixeldiffusion",
                                     description="Pixel-space denoising diffusion models.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"pixeldiffusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    # One _add_<command> per subcommand; each sets ``run`` (and ``takes_overrides`` when unknown
    # arguments are config overrides). Keep the list in the order of ``pixeldiffusion --help``.
    _add_train(commands)
    _add_distill(commands)
    _add_sample(commands)
    _add_eval(commands)
    _add_inpaint(commands)
    _add_interpolate(commands)
    _add_convert(commands)
    _add_ema(commands)
    _add_serve(commands)
    return parser


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (default: the built-in digits)",
                                epilog=TRAIN_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("-c", "--config", help="YAML config (default: built-in digits config)")
    train.add_argument("-e", "--exp_dir", help="run directory (default: runs/exp-<time>)")
    train.add_argument("--resume", help="'auto' (newest checkpoint of -e) or a checkpoint path")
    train.add_argument("--device", help="shortcut for --train.device (auto|cpu|cuda|mps)")
    train.add_argument("--no_progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train, takes_overrides=True)


DISTILL_HELP = """Tunes a trained checkpoint of any formulation into a consistency model that
samples in 1, 2 or 4 model calls (Easy Consistency Tuning; docs/consistency.md), or with
--method pd into a DDIM model of progressive.to_steps steps. Config keys override as
--section.key value, e.g.
  pixeldiffusion distill -cp runs/digits -e runs/digits-ect --train.steps 2000
  pixeldiffusion distill -e runs/digits-ect --resume auto     # continue where it stopped
  pixeldiffusion sample -cp runs/digits-ect --steps 1
  pixeldiffusion distill -cp runs/digits-v -e runs/digits-pd --method pd \
      --progressive.from_steps 64 --progressive.to_steps 2 --train.steps 5000   # v-pred teacher
"""


def _add_distill(commands: argparse._SubParsersAction) -> None:
    d = commands.add_parser("distill", help="tune a checkpoint into a few-step model "
                            "(consistency model or progressive distillation)",
                            epilog=DISTILL_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("-cp", "--checkpoint", help="the teacher: .safetensors file, checkpoint "
                   "directory or run directory (not needed with --resume)")
    d.add_argument("-e", "--exp_dir", help="run directory (default: runs/exp-<time>)")
    d.add_argument("--method", default="ect", choices=("ect", "cd", "pd"),
                   help="ect: Easy Consistency Tuning (Geng et al. 2024); cd: consistency "
                        "distillation (Song et al. 2023) on ECT's schedule, the target at the "
                        "teacher's ODE step (--consistency.solver euler|heun); pd: progressive "
                        "distillation (Salimans & Ho 2022), DDIM steps halved per stage from "
                        "--progressive.from_steps (64) to --progressive.to_steps (1)")
    d.add_argument("--resume", help="'auto' (newest checkpoint of -e) or a checkpoint path")
    d.add_argument("--device", help="shortcut for --train.device (auto|cpu|cuda|mps)")
    d.add_argument("--no_progress", action="store_true", help="no progress bar")
    d.set_defaults(run=_distill, takes_overrides=True)


def _distill(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_config
    from .distill import student_config, tune

    if args.device:
        overrides = [*overrides, "--train.device", args.device]
    saved = Path(args.exp_dir) / "config.yaml" if args.exp_dir else None
    if args.resume and saved is not None and saved.is_file():
        cfg = load_config(saved, overrides)
    elif args.resume:
        raise PixelDiffusionError("--resume needs -e EXP_DIR, the distill run to continue")
    elif args.checkpoint is None:
        raise PixelDiffusionError("distill needs a teacher: -cp CHECKPOINT (a trained run, "
                                  "checkpoint directory or .safetensors file)")
    else:
        cfg = student_config(args.checkpoint, overrides, method=args.method)
    tune(cfg, args.exp_dir, resume=args.resume, progress=not args.no_progress)
    return 0


def _add_sample(commands: argparse._SubParsersAction) -> None:
    s = commands.add_parser("sample", help="draw images from a checkpoint", epilog=SAMPLE_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-cp", "--checkpoint", required=True,
                   help=".safetensors file, checkpoint directory or run directory")
    s.add_argument("--sampler", help="a sampler, e.g. ddpm, ddim or unipc (default: the "
                   "checkpoint's config; a wrong name lists them all; docs/samplers.md)")
    s.add_argument("--steps", type=_positive, help="model calls; fewer than T skips steps")
    s.add_argument("--eta", type=float, help="noise of the samplers that take it (ddim, "
                   "euler_ancestral, dpmpp_2m_sde): 0 deterministic (default: the sampler's own)")
    s.add_argument("--var_type", choices=("fixed_small", "fixed_large"), help="DDPM variance")
    s.add_argument("--spacing", "--skip_type", dest="spacing",
                   help="timesteps: uniform (trailing), leading, linspace, quadratic, karras, "
                        "logsnr, optimal (fitted to this model first: about 200 extra model "
                        "calls on up to 32 images; printed for reuse), or a list such as "
                        "999,600,300,100")
    s.add_argument("--order", type=int, choices=(1, 2, 3), help="unipc order (default 3)")
    s.add_argument("--variant", choices=("bh1", "bh2"), help="unipc B(h) variant (default bh2)")
    s.add_argument("--dynamic_threshold", type=float, metavar="P",
                   help="Imagen dynamic thresholding quantile, e.g. 0.995 (replaces --clip_x0)")
    s.add_argument("--gif", metavar="PATH", help="also write the chain (x_t, or the predicted x0 "
                   "with --mode progressive) as an animated GIF")
    s.add_argument("-bs", "--n_samples", "--batch_size", dest="n_samples", type=_positive,
                   help="number of images")
    s.add_argument("--micro_batch", type=_positive, help="images per model call")
    s.add_argument("--nrow", type=_positive, help="images per grid row")
    s.add_argument("--seed", type=int, help="random seed (default: the config's)")
    s.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda")
    s.add_argument("--mode", choices=("sample", "denoise", "progressive"), default="sample",
                   help="sample: final images; denoise: x_t along the chain; "
                        "progressive: predicted x0 along the chain (one row per sample)")
    s.add_argument("--result_only", action="store_true", help="same as --mode sample")
    s.add_argument("--interval", type=_positive, help="denoise/progressive: a frame every N steps")
    s.add_argument("-sp", "--save_path", default="samples.png", help="grid PNG path")
    s.add_argument("--save_dir", help="also write each image as PNG plus samples.npz here")
    s.add_argument("--to_grayscale", action="store_true", help="save grayscale pictures")
    s.add_argument("--show", action="store_true", help="open the grid in an image viewer")
    s.add_argument("--load_ema", type=_bool, default=True, help="EMA weights (default true)")
    s.add_argument("--clip_x0", type=_bool, help="clip predicted x0 to [-1, 1]")
    s.add_argument("--class", dest="class_label", metavar="CLASS",
                   help="conditional models: a class index (3) or name (cat), 'all' (one grid "
                        "row of --nrow images per class) or 'random'")
    s.add_argument("--guidance", type=float, metavar="W",
                   help="classifier-free guidance weight: 0 unconditional, 1 conditional, "
                        ">1 guided (default: the checkpoint's sample.guidance); with "
                        "--guidance_model the autoguidance weight")
    _add_guidance_model(s)
    s.add_argument("--autoguidance_cfg", type=float, metavar="W",
                   help="with --guidance_model on a class-conditional model: a classifier-free "
                        "weight added on top of autoguidance (1 = none; docs/guidance.md)")
    s.add_argument("--mid_sigmas", metavar="SIGMAS",
                   help="consistency models: the --steps - 1 intermediate noise levels, "
                        "descending, comma-separated, e.g. 2.5 for 2 steps (default: the "
                        "checkpoint's consistency.mid_sigmas; empty there = ECT's 0.821)")
    s.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype of the model calls (default: the checkpoint's, auto = "
                        "bf16 where the device runs it natively and the model is wide enough, "
                        "else fp32)")
    s.add_argument("--compile", type=_bool, metavar="BOOL",
                   help="torch.compile the UNet first (on CUDA: CUDA graphs); pays for many "
                        "images")
    s.set_defaults(run=_sample)


def _add_guidance_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guidance_model", metavar="CKPT",
                        help="autoguidance (Karras et al. 2024): guide with this worse version "
                             "of the model (an earlier checkpoint, a shorter EMA, a smaller "
                             "model of the same data and formulation) at weight --guidance; "
                             "unconditional models too")


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_config
    from .run import train

    if args.resume and args.resume != "auto" and not args.exp_dir:
        resume_path = Path(args.resume)
        args.exp_dir = str(resume_path.parent.parent if resume_path.parent.name == "checkpoints"
                           else resume_path)
    if args.resume and not args.exp_dir:
        raise PixelDiffusionError("--resume auto needs -e EXP_DIR, the run to continue")
    config_path = args.config
    if config_path is None and args.resume and args.exp_dir and \
            (Path(args.exp_dir) / "config.yaml").is_file():
        config_path = Path(args.exp_dir) / "config.yaml"
    if args.device:
        overrides = [*overrides, "--train.device", args.device]
    cfg = load_config(config_path, overrides)
    finished = False
    try:
        from .distill import is_distill_run, tune

        if is_distill_run(cfg):  # a distill run, resumed as its Ctrl-C message says
            tune(cfg, args.exp_dir, resume=args.resume, progress=not args.no_progress)
        else:
            train(cfg, args.exp_dir, resume=args.resume, progress=not args.no_progress)
        finished = True
    finally:
        _end_process_group(finished)
    return 0


def _end_process_group(finished: bool) -> None:
    """Under torchrun / accelerate launch: shut the process group down before the interpreter
    exits, so that gloo's threads are not torn down mid-flight (an abort at exit otherwise).
    After a run that ``finished`` on this rank, a gloo group first meets the other ranks at a
    barrier (at most ``EXIT_BARRIER_S``), so that no rank closes its connections while another
    still has a message in flight to it (a rank aborting with "terminate called without an
    active exception" in loaded test runs was the symptom this guards against)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished and dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=EXIT_BARRIER_S))
        except RuntimeError:  # another rank failed or is gone; its own error says why
            pass
    dist.destroy_process_group()


EXIT_BARRIER_S = 120  # a finished rank waits this long for the others before it exits


# the sample section's keys that ``pixeldiffusion sample`` takes as --KEY
SAMPLE_KEYS = ("sampler", "steps", "eta", "var_type", "spacing", "order", "variant",
               "dynamic_threshold", "n_samples", "nrow", "seed", "clip_x0", "precision", "compile",
               "autoguidance_cfg")


def _sample(args: argparse.Namespace, overrides: list[str]) -> int:
    from .checkpoint import load_checkpoint
    from .device import conv_width, resolve_device, resolve_precision
    from .generate import (
        generate,
        save_outputs,
        spacing_text,
        with_mid_sigmas,
        with_sample_options,
    )
    from .guidance import load_guidance_model

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, use_ema=args.load_ema, device=device)
    cfg = with_sample_options(loaded.config, **{key: getattr(args, key) for key in SAMPLE_KEYS})
    cfg = with_mid_sigmas(cfg, args.mid_sigmas)
    guide = None if args.guidance_model is None else load_guidance_model(
        args.guidance_model, loaded.config, device=device, use_ema=args.load_ema)
    mode = "sample" if args.result_only else args.mode
    # a GIF needs the chain: x_t, or the predicted x0 with --mode progressive
    chain = ("progressive" if mode == "progressive" else "denoise") if args.gif else mode
    generated = generate(loaded.model, cfg, device, mode=chain, micro_batch=args.micro_batch,
                         interval=args.interval or (1 if args.gif else None),
                         guidance=args.guidance, class_label=args.class_label,
                         guidance_model=guide)
    if generated.timesteps is not None:
        print(f"optimal timesteps (fitted to this checkpoint; pass them to skip the fit next "
              f"time): --spacing {spacing_text(generated.timesteps)}", file=sys.stderr)
    written = save_outputs(generated, args.save_path, nrow=cfg.sample.nrow,
                           chain=mode != "sample", gif=args.gif, save_dir=args.save_dir,
                           grayscale=args.to_grayscale)
    print(resolve_precision(cfg.sample.precision, device, conv_width(loaded.model)),
          file=sys.stderr)
    if args.show:
        from PIL import Image
        Image.open(written[0]).show()
    for path in written:
        print(path)
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="browser UI: pick a checkpoint and sampler, watch images denoise",
        description="Serve a local web page (needs the [ui] extra) where you choose a checkpoint, "
                    "sampler, steps, seed, batch, class and guidance, press Generate and watch "
                    "the images denoise live. Requests run one at a time.")
    serve.add_argument("-cp", "--checkpoint", nargs="+", default=[], metavar="CKPT",
                       help="checkpoints to offer (file, checkpoint or run directory); "
                            "default: every run under runs/")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1, this machine only); any other "
                            "address requires the random token the server prints at start")
    serve.add_argument("--allow_host", action="append", default=[], metavar="NAME",
                       help="also answer requests addressed to this host name (the Host "
                            "header), e.g. the machine's DNS name; repeatable")
    serve.add_argument("--port", type=_positive, default=7860, help="port (default 7860)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    serve.add_argument("--load_ema", type=_bool, default=True, help="EMA weights (default true)")
    serve.add_argument("--max_steps", type=_positive, default=1000,
                       help="most sampling steps one request may ask for (default 1000)")
    serve.add_argument("--max_batch", type=_positive, default=64,
                       help="most images one request may ask for (default 64)")
    serve.add_argument("--max_queue", type=_positive, default=8,
                       help="most requests waiting at once; more get 'busy' (default 8)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace, overrides: list[str]) -> int:
    from .device import resolve_device
    from .serve import Limits, serve

    limits = Limits(max_steps=args.max_steps, max_batch=args.max_batch, max_queue=args.max_queue)
    serve(args.checkpoint, host=args.host, port=args.port, device=resolve_device(args.device),
          limits=limits, use_ema=args.load_ema, allow_hosts=args.allow_host)
    return 0


def _add_inpaint(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "inpaint", help="fill the white region of a mask (RePaint)",
        description="Fill the white region of --mask in --image with an unconditional model, "
                    "keeping the rest exactly (RePaint, Lugmayr et al. 2022). The grid shows the "
                    "masked input, then --n_samples fillings.")
    p.add_argument("-cp", "--checkpoint", required=True,
                   help=".safetensors file, checkpoint directory or run directory")
    p.add_argument("--image", required=True, help="picture to complete (resized/cropped to the "
                                                  "model's size)")
    p.add_argument("--mask", required=True, help="same-size picture: white = fill, black = keep")
    p.add_argument("-bs", "--n_samples", type=_positive, default=4, help="fillings (default 4)")
    p.add_argument("--steps", type=_positive, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--jump", "--jump_length", dest="jump_length", type=_positive, default=10,
                   help="RePaint j: steps to go back at each resampling (default 10)")
    p.add_argument("--resample", "--jump_n_sample", dest="jump_n_sample", type=_positive,
                   default=10, help="RePaint r: times each stretch is denoised (default 10; "
                                    "1 = no resampling)")
    p.add_argument("--var_type", choices=("fixed_small", "fixed_large"), help="DDPM variance")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--load_ema", type=_bool, default=True, help="EMA weights (default true)")
    p.add_argument("-sp", "--save_path", default="inpainted.png", help="grid PNG path")
    p.set_defaults(run=_inpaint)


def _inpaint(args: argparse.Namespace, overrides: list[str]) -> int:
    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .edit import inpaint, save_inpainted

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, use_ema=args.load_ema, device=device)
    result = inpaint(loaded, args.image, args.mask, n_samples=args.n_samples,
                     steps=args.steps or loaded.config.sample.steps,
                     jump_length=args.jump_length, jump_n_sample=args.jump_n_sample,
                     seed=args.seed, device=device, var_type=args.var_type)
    print(save_inpainted(result, args.save_path, nrow=args.n_samples + 1))
    return 0


def _add_interpolate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "interpolate", help="images along a spherical path between two noises (strip or GIF)",
        description="Sample deterministically (DDIM, eta 0) from noises on the great circle "
                    "between the noises of two seeds; a .gif path gives an animation.")
    p.add_argument("-cp", "--checkpoint", required=True,
                   help=".safetensors file, checkpoint directory or run directory")
    p.add_argument("--seeds", type=int, nargs=2, default=(0, 1), metavar=("A", "B"),
                   help="seeds of the two end noises (default 0 1)")
    p.add_argument("--n_frames", type=_positive, default=8, help="images (default 8)")
    p.add_argument("--steps", type=_positive, default=50, help="DDIM steps (default 50)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--load_ema", type=_bool, default=True, help="EMA weights (default true)")
    p.add_argument("-sp", "--save_path", default="interpolation.png",
                   help="strip PNG, or .gif for an animation")
    p.set_defaults(run=_interpolate)


def _interpolate(args: argparse.Namespace, overrides: list[str]) -> int:
    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .edit import interpolate, save_interpolation

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, use_ema=args.load_ema, device=device)
    frames = interpolate(loaded, n_frames=args.n_frames, seeds=tuple(args.seeds),
                         steps=args.steps, device=device, options={"eta": 0.0})
    print(save_interpolation(frames, args.save_path))
    return 0


def _add_convert(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "convert", help="export to / import from a diffusers UNet2DModel + scheduler folder",
        description="--to-diffusers writes a folder diffusers.DiffusionPipeline.from_pretrained "
                    "loads, with the scheduler of the checkpoint's formulation (ddpm: "
                    "DDPMScheduler, edm: EDMEulerScheduler, flow: "
                    "FlowMatchEulerDiscreteScheduler); --from-diffusers turns a diffusers "
                    "UNet2DModel + scheduler folder (DDPM layout, e.g. google/ddpm-cifar10-32) "
                    "into a .safetensors file that pixeldiffusion sample accepts.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-diffusers", "--to_diffusers", dest="to_diffusers", nargs=2,
                     metavar=("CKPT", "OUT_DIR"))
    way.add_argument("--from-diffusers", "--from_diffusers", dest="from_diffusers", nargs=2,
                     metavar=("DIR", "OUT.safetensors"))
    p.add_argument("--load_ema", type=_bool, default=True,
                   help="--to-diffusers: export the EMA weights (default true)")
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace, overrides: list[str]) -> int:
    from .convert import from_diffusers, to_diffusers

    if args.to_diffusers:
        print(to_diffusers(*args.to_diffusers, use_ema=args.load_ema))
    else:
        print(from_diffusers(*args.from_diffusers))
    return 0


EMA_HELP = """examples:
  pixeldiffusion train --train.posthoc_ema_every 500 -e runs/digits    # record snapshots
  pixeldiffusion ema runs/digits --sigma_rel 0.07 -o ema-0.07.safetensors
  pixeldiffusion sample -cp ema-0.07.safetensors
  pixeldiffusion eval -cp runs/digits --sweep sigma_rel=0.03,0.05,0.1   # pick the best length
"""


def _add_ema(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "ema", help="post-hoc EMA: rebuild an EMA of any length from a run's snapshots",
        description="Rebuild the power-function EMA of relative width --sigma_rel (EDM2, Karras "
                    "et al. 2024, Sec. 3) from the snapshots a run recorded with "
                    "train.posthoc_ema_every, and write it as a checkpoint that sample, eval, "
                    "serve and convert take.", epilog=EMA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="run directory with ema_snapshots/")
    p.add_argument("--sigma_rel", type=float, required=True,
                   help="EMA length relative to training time, in (0, 0.2887] (e.g. 0.05)")
    p.add_argument("--step", type=_positive, metavar="N",
                   help="use the snapshots up to step N (default: all); the EMA is the one at "
                        "the last of them")
    p.add_argument("-o", "--out", required=True, metavar="OUT.safetensors",
                   help="checkpoint file to write")
    p.set_defaults(run=_ema)


def _ema(args: argparse.Namespace, overrides: list[str]) -> int:
    from .ema_snapshots import describe, reconstruct_run, save_reconstruction

    rebuilt = reconstruct_run(args.run_dir, args.sigma_rel, args.step)
    print(describe(rebuilt), file=sys.stderr)
    print(save_reconstruction(rebuilt, args.out))
    return 0


EVAL_HELP = """examples:
  pixeldiffusion eval -cp runs/digits                         # 1,000 samples, digit-FID
  pixeldiffusion eval -cp runs/digits --sweep sampler=ddim,dpmpp_2m nfe=10,20,50 --plot nfe.png
  pixeldiffusion eval samples/ --ref digits                    # a folder of PNGs (or samples.npz)
  pixeldiffusion eval samples.npz --ref real.npz               # two image sets compared
  pixeldiffusion eval -cp runs/cifar10 --extractor inception -n 50000 --ref cifar10
Sampling options of the checkpoint's config can be overridden as --sample.KEY value.
"""


def _add_eval(commands: argparse._SubParsersAction) -> None:
    e = commands.add_parser("eval", help="score samples: digit-FID, FID/IS/KID, precision/recall",
                            epilog=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("input", nargs="?", help="checkpoint, image folder or samples.npz")
    e.add_argument("-cp", "--checkpoint", help="checkpoint or run directory to sample from")
    e.add_argument("--ref", help="reference: digits, digits-heldout, mnist, cifar10, celeba64, an "
                                 "image folder, an images .npz (like samples.npz) or a statistics "
                                 ".npz from --save_stats (default: the checkpoint's data set, "
                                 "else digits)")
    e.add_argument("--extractor", choices=("digits", "inception"), default="digits",
                   help="digits: offline digit classifier (digit-FID); inception: torch-fidelity "
                        "Inception-v3 (FID, IS, KID; needs the [fid] extra)")
    e.add_argument("--inception-weights", "--inception_weights", dest="inception_weights",
                   metavar="PATH", help="local Inception weights (.pth) for offline machines "
                                        "(or set PIXELDIFFUSION_INCEPTION_WEIGHTS)")
    e.add_argument("-n", "--n_samples", type=_positive, default=1000,
                   help="images to sample per setting (default 1000)")
    e.add_argument("--micro_batch", type=_positive, default=250, help="images per model call")
    e.add_argument("--sampler", help="sampler (default: the checkpoint's)")
    e.add_argument("--steps", type=_positive, help="sampling steps (default: the checkpoint's)")
    e.add_argument("--guidance", type=float, help="classifier-free guidance weight (with "
                   "--guidance_model: the autoguidance weight)")
    _add_guidance_model(e)
    e.add_argument("--mid_sigmas", metavar="SIGMAS",
                   help="consistency models: the --steps - 1 intermediate noise levels, e.g. "
                        "2.5 with --steps 2; sweep them with --sweep mid_sigmas=1.5,2.5 (several "
                        "levels of one point joined by /, e.g. 10/2.5/0.5 for 4 steps)")
    e.add_argument("--class", dest="class_label", metavar="CLASS",
                   help="conditional models: class index or name, 'all' or 'random'")
    e.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2",
                   help="evaluate every combination, e.g. sampler=ddpm,ddim steps=10,20,50 "
                        "(sampler=all: every sampler; nfe=10,20 picks steps per sampler; "
                        "sigma_rel=0.03,0.05,0.1: post-hoc EMA lengths rebuilt from the run's "
                        "snapshots, see pixeldiffusion ema)")
    e.add_argument("--seed", type=int, help="sampling seed (default: the checkpoint's)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    e.add_argument("--load_ema", type=_bool, default=True, help="EMA weights (default true)")
    e.add_argument("--out", default="eval", help="folder for results.csv/.md/.json and grids")
    e.add_argument("--plot", metavar="PNG", help="also plot the metric against NFE (matplotlib)")
    e.add_argument("--save_stats", metavar="NPZ", help="also write the reference statistics")
    e.add_argument("--no_cache", action="store_true", help="recompute reference statistics")
    e.add_argument("--data_root", default="data", help="where mnist/cifar10/celeba64 live")
    e.add_argument("--no_progress", action="store_true", help="no progress bar")
    e.set_defaults(run=_eval, takes_overrides=True)


def _reattach(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """argparse hands the value of the first ``--sample.KEY VALUE`` override to the optional
    INPUT positional when INPUT is absent; give it back to the key that is missing a value."""
    for i, item in enumerate(extra):
        dangling = item.startswith("--") and "=" not in item and \
            (i + 1 == len(extra) or extra[i + 1].startswith("--"))
        if dangling and args.input is not None:
            extra.insert(i + 1, args.input)
            args.input = None
            break
    return extra


def _unknown_arguments(extra: list[str]) -> tuple[list[str], list[str]]:
    """(unknown options, stray positionals) among the arguments argparse did not know;
    ``--section.key value`` / ``--section.key=value`` pairs are neither."""
    options, stray, i = [], [], 0
    while i < len(extra):
        item = extra[i]
        if item.startswith("--") and "." in item.split("=", 1)[0]:
            i += 1 if "=" in item else 2
            continue
        (options if item.startswith("-") else stray).append(item)
        i += 1
    return options, stray


def _eval_sample_options(args: argparse.Namespace, extra: list[str]) -> dict[str, str]:
    """``--sample.KEY value`` overrides among the arguments argparse did not know, as
    {KEY: text}; anything else is an error that says what eval takes."""
    from .config import parse_overrides

    extra = _reattach(args, list(extra))
    unknown, stray = _unknown_arguments(extra)
    if unknown:
        raise PixelDiffusionError(f"eval has no option '{unknown[0]}'; pixeldiffusion eval "
                                  f"--help lists them (sampling config keys are given as "
                                  f"--sample.KEY value)")
    if stray:
        first = args.input or "INPUT"
        raise PixelDiffusionError(f"eval takes one INPUT (a checkpoint, an image folder or a "
                                  f"samples.npz) but got another, '{stray[0]}'; to compare two "
                                  f"image sets give the second as the reference: "
                                  f"pixeldiffusion eval {first} --ref {stray[0]}")
    options = {}
    for key, value in parse_overrides(extra):
        section, _, name = key.partition(".")
        if section != "sample":
            raise PixelDiffusionError(f"eval takes only sampling overrides (--sample.KEY value); "
                                      f"got --{key}")
        options[name] = value
    return options


def _eval_options(args: argparse.Namespace, extra: list[str]) -> EvalOptions:
    """The parsed ``eval`` arguments as the library's EvalOptions."""
    from .evaluate import EvalOptions

    sample_options = _eval_sample_options(args, extra)
    source = args.checkpoint or args.input
    if source is None:
        raise PixelDiffusionError("eval needs something to score: a checkpoint (-cp RUN_DIR), an "
                                  "image folder or a samples.npz")
    if args.checkpoint and args.input:
        raise PixelDiffusionError("give either INPUT or -cp CHECKPOINT, not both")
    return EvalOptions(
        source=Path(source), from_checkpoint=bool(args.checkpoint), ref=args.ref,
        extractor=args.extractor, inception_weights=args.inception_weights,
        n_samples=args.n_samples, micro_batch=args.micro_batch, sampler=args.sampler,
        steps=args.steps, guidance=args.guidance, class_label=args.class_label,
        guidance_model=Path(args.guidance_model) if args.guidance_model else None,
        mid_sigmas=args.mid_sigmas, sample_options=sample_options,
        sweep=list(args.sweep or []), seed=args.seed,
        device=args.device, use_ema=args.load_ema, out_dir=Path(args.out),
        plot=Path(args.plot) if args.plot else None,
        save_stats=Path(args.save_stats) if args.save_stats else None,
        use_cache=not args.no_cache, data_root=args.data_root, progress=not args.no_progress)


def _eval(args: argparse.Namespace, extra: list[str]) -> int:
    from dataclasses import replace

    from .evaluate import run_eval
    from .results import describe, plain_table

    report = run_eval(_eval_options(args, extra))
    for warning in dict.fromkeys(w for r in report.rows for w in r.provenance.warnings):
        print(f"pixeldiffusion: warning: {warning}", file=sys.stderr)
    print(plain_table(report.rows))
    print(describe(replace(report.rows[0].provenance, warnings=[])))
    if report.stats_file is not None:
        print(f"reference statistics: {report.stats_file}")
    for path in [*report.written, *([report.plot] if report.plot else [])]:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra and not getattr(args, "takes_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.run(args, extra)
    except PixelDiffusionError as err:
        print(f"pixeldiffusion: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("pixeldiffusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
