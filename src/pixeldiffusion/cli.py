"""``pixeldiffusion train | sample``: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import PixelDiffusionError

SAMPLE_HELP = """examples:
  pixeldiffusion sample -cp runs/exp-XXX                      # newest checkpoint, EMA weights
  pixeldiffusion sample -cp runs/exp-XXX --sampler ddpm --steps 1000 --var_type fixed_large
  pixeldiffusion sample -cp ckpt.safetensors --mode progressive -bs 8 --interval 10
"""

TRAIN_HELP = """Any config key can be overridden as --section.key value, e.g.
  pixeldiffusion train --train.steps 500 --model.channels 32 --diffusion.beta_schedule cosine
  pixeldiffusion train -c configs/cifar10.yaml -e runs/cifar --train.mixed_precision bf16
  pixeldiffusion train -e runs/cifar --resume auto          # continue where it stopped
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
    _add_sample(commands)
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


def _add_sample(commands: argparse._SubParsersAction) -> None:
    s = commands.add_parser("sample", help="draw images from a checkpoint", epilog=SAMPLE_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-cp", "--checkpoint", required=True,
                   help=".safetensors file, checkpoint directory or run directory")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: the checkpoint's config")
    s.add_argument("--steps", type=_positive, help="model calls; fewer than T skips steps")
    s.add_argument("--eta", type=float, help="DDIM noise; 0 deterministic, 1 = DDPM posterior")
    s.add_argument("--var_type", choices=("fixed_small", "fixed_large"), help="DDPM variance")
    s.add_argument("--skip_type", choices=("uniform", "quadratic"), help="timestep spacing")
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
    s.set_defaults(run=_sample)


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_config
    from .train import train

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
    train(cfg, args.exp_dir, resume=args.resume, progress=not args.no_progress)
    return 0


def _sample(args: argparse.Namespace, overrides: list[str]) -> int:
    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .generate import run_from_args

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, use_ema=args.load_ema, device=device)
    for path in run_from_args(loaded, args, device):
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
