"""Training and sampling throughput (images/s) of pixeldiffusion's UNet on this machine.

    python benchmarks/throughput.py                 # default digits + CIFAR-10 configs, fp32
    python benchmarks/throughput.py --bf16          # also bf16 autocast rows
    python benchmarks/throughput.py --device cuda

Training = forward + backward + AdamW step + EMA update on one batch (the loop of train.py);
sampling = one denoising model call (one NFE) on a batch, so images/s per NFE. Each row is
the median of --repeats timed runs after --warmup untimed ones.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

from pixeldiffusion.config import load_config
from pixeldiffusion.device import resolve_device
from pixeldiffusion.diffusion import training_loss
from pixeldiffusion.generate import alphas_cumprod_of
from pixeldiffusion.train import ema_update
from pixeldiffusion.unet import build_unet, count_parameters

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(config: str, batch: int, sample_batch: int, device: torch.device, dtype,
          warmup: int, repeats: int) -> dict:
    cfg = load_config(CONFIGS / config)
    torch.manual_seed(0)
    c, s = cfg.data.channels, cfg.data.image_size
    model = build_unet(cfg.model, in_channels=c, image_size=s).to(
        device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=device.type == "cuda")
    ac = alphas_cumprod_of(cfg).float().to(device)
    x = torch.randn(batch, c, s, s, device=device).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def train_step():
        with autocast:
            loss = training_loss(model, x, ac)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.999)

    xs = torch.randn(sample_batch, c, s, s, device=device).contiguous(
        memory_format=torch.channels_last)
    ts = torch.full((sample_batch,), 500, device=device)

    @torch.inference_mode()
    def sample_step():
        with autocast:
            ema(xs, ts)

    train_s = _median_seconds(train_step, device, warmup, repeats)
    sample_s = _median_seconds(sample_step, device, warmup, repeats)
    return {"params": count_parameters(model), "train": batch / train_s,
            "sample": sample_batch / sample_s}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="add bf16 autocast rows")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    plan = [("mnist.yaml", 128 if gpu else 32, 512 if gpu else 64),
            ("cifar10.yaml", 128 if gpu else 8, 512 if gpu else 32)]
    precisions = [("fp32", None)] + ([("bf16", torch.bfloat16)] if args.bf16 else [])
    name = torch.cuda.get_device_name(device) if gpu else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"pixeldiffusion throughput on {device} ({name}); torch {torch.__version__}; "
          f"median of {args.repeats}")
    print("| config | params | precision | train batch | train img/s | "
          "sample batch | sample img/s per NFE |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for config, batch, sample_batch in plan:
        for precision, dtype in precisions:
            r = bench(config, batch, sample_batch, device, dtype, args.warmup, args.repeats)
            print(f"| {config} | {r['params'] / 1e6:.2f}M | {precision} | {batch} | "
                  f"{r['train']:.1f} | {sample_batch} | {r['sample']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
