"""Training and sampling throughput (images/s): pixeldiffusion's UNet beside diffusers' UNet2DModel.

    pip install -e ".[bench]"                        # diffusers, for this script only
    python benchmarks/throughput.py                  # both configs, fp32 and bf16, this machine
    python benchmarks/throughput.py --precisions fp32 --configs mnist --repeats 3   # quick look
    python benchmarks/throughput.py --device cuda    # the same table on a GPU, plus MFU
    python benchmarks/throughput.py --compile        # also ours under torch.compile
    python benchmarks/throughput.py --default-vs-auto --repeats 15   # fp32 vs precision auto
    python benchmarks/throughput.py --default-vs-auto --cpu-time     # the same, 1 thread, CPU s

Every run first prints the machine: the CPU's name, its avx2 / avx512f / avx512_bf16 /
avx512_fp16 / amx flags, torch's CPU capability, whether bf16 is native (``device.native_bf16``),
any ``ONEDNN_MAX_CPU_ISA`` cap and the load average, so a quoted table says what it ran on.
``--default-vs-auto`` times only our sampling, the old default (fp32) beside the new one
(``precision auto``) and, where bf16 is native, forced bf16, in turn on one model
(docs/precision.md). ``ONEDNN_MAX_CPU_ISA=AVX2`` emulates an AVX2-only CPU's bf16 on a
native one.

For each config (configs/mnist.yaml: the default digits model, 1x32x32; configs/cifar10.yaml: the
DDPM paper's 35.7M-parameter CIFAR-10 model, 3x32x32) diffusers' ``UNet2DModel`` is built with the
same block widths, ResBlocks per level, attention resolutions, heads, GroupNorm groups and epsilon,
dropout and timestep embedding, and both parameter counts are printed: the two networks compute the
same function (Ho et al. 2020, App. B) with the same number of weights.

* training = one step of each library's own training loop: draw t and eps, q(x_t | x0) (DDPM
  eq. 4), forward, the simple loss (eq. 14), backward, gradient clipping where the config has
  it, AdamW, EMA update. Ours is ``train.py``'s step (``training_loss``, AdamW as train.py builds
  it, ``ema_update``, channels-last); diffusers' is ``examples/unconditional_image_generation/
  train_unconditional.py``'s (``DDPMScheduler.add_noise``, ``F.mse_loss``, ``torch.optim.AdamW``,
  ``EMAModel``), each as its users get it by default.
* sampling = one model call (one NFE) on a batch of x_t with the EMA weights, so images/s per
  NFE: ours through ``generate.sampling_network`` (what ``pixeldiffusion sample`` calls:
  channels-last, ``torch.inference_mode``, autocast per call, CUDA graphs with ``--compile`` on
  CUDA), diffusers' under ``torch.no_grad`` as in its ``DDPMPipeline``.

Ours and diffusers' run alternately (ours, diffusers, ours, ...) in every repeat, so load from
other processes hits both alike; each number is the median of ``--repeats`` after ``--warmup``
untimed steps, and the ratio is ours / diffusers. bf16 rows run under ``torch.autocast``; an
``auto`` row runs what ``precision auto`` picks here.
On CUDA the script adds the model FLOPs utilisation (MFU) of the CIFAR-10 training step in bf16:
FLOPs of one forward + backward counted by ``torch.utils.flop_counter.FlopCounterMode``, divided
by the step time and the GPU's peak dense bf16 rate (``PEAK_BF16_TFLOPS``, or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pixeldiffusion.config import Config, load_config
from pixeldiffusion.device import (
    conv_width,
    native_bf16,
    onednn_isa_cap,
    resolve_device,
    resolve_precision,
    use_fast_kernels,
)
from pixeldiffusion.diffusion import training_loss
from pixeldiffusion.generate import AUTOCAST_DTYPES, sampling_network
from pixeldiffusion.schedule import alphas_cumprod_of
from pixeldiffusion.train import FUSED_ADAMW, ema_update
from pixeldiffusion.unet import build_unet, count_parameters

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Peak dense (no sparsity) bf16 tensor-core rate in TFLOP/s, from the vendors' data sheets; the
# first key found in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.4,
    "H200": 989.4,
    "H100": 989.4,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
}

# (train batch, sample batch) per config and device type. CPU: the digits config's own training
# batch, and sampling batches past which images/s stops growing on 2 cores; GPU: large enough to
# fill an H100 at 32x32.
BATCHES = {
    ("mnist", "cpu"): (32, 64),
    ("cifar10", "cpu"): (8, 32),
    ("mnist", "cuda"): (256, 1024),
    ("cifar10", "cuda"): (128, 512),
}

Step = Callable[[], None]


def diffusers_unet(cfg: Config):
    """diffusers' ``UNet2DModel`` with the architecture of ``cfg.model`` (same parameter count).

    Each level of ``channels * channel_mult`` gets a ``DownBlock2D`` (``AttnDownBlock2D`` at the
    attention resolutions) with ``num_res_blocks`` ResBlocks and an ``Up`` block with one more;
    ``attention_head_dim`` is the width divided by ``num_heads`` (None = one head per block, which
    is what diffusers' mid block gets too).
    """
    from diffusers import UNet2DModel

    m, size = cfg.model, cfg.data.image_size
    widths = [m.channels * mult for mult in m.channel_mult]
    resolutions = [size // 2**level for level in range(len(widths))]
    head_dims = {width // m.num_heads for width, res in zip(widths, resolutions, strict=True)
                 if res in m.attn_resolutions} | {widths[-1] // m.num_heads}
    if m.num_heads != 1 and len(head_dims) != 1:
        raise SystemExit(f"diffusers' UNet2DModel has one attention_head_dim for all blocks; "
                         f"model.num_heads {m.num_heads} gives {sorted(head_dims)}")
    return UNet2DModel(
        sample_size=size, in_channels=cfg.data.channels, out_channels=cfg.data.channels,
        block_out_channels=tuple(widths), layers_per_block=m.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if r in m.attn_resolutions else "DownBlock2D"
                               for r in resolutions),
        up_block_types=tuple("AttnUpBlock2D" if r in m.attn_resolutions else "UpBlock2D"
                             for r in reversed(resolutions)),
        attention_head_dim=None if m.num_heads == 1 else head_dims.pop(),
        norm_num_groups=m.norm_groups, norm_eps=m.norm_eps, dropout=m.dropout,
        flip_sin_to_cos=m.flip_sin_to_cos, freq_shift=m.freq_shift,
        downsample_padding=m.downsample_padding)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def ours_steps(cfg: Config, batch: int, sample_batch: int, device: torch.device,
               dtype: torch.dtype | None, compile_model: bool = False) -> tuple[Step, Step, int]:
    """(train step, sample step, parameters) of pixeldiffusion, set up as ``train.py`` does."""
    c, s, tc = cfg.data.channels, cfg.data.image_size, cfg.train
    torch.manual_seed(0)
    model = build_unet(cfg.model, in_channels=c, image_size=s).to(
        device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=device.type in FUSED_ADAMW)
    alphas_cumprod = alphas_cumprod_of(cfg).float().to(device)
    forward = torch.compile(model) if compile_model else model  # as train.compile does
    # what generate() samples through: channels-last, autocast, CUDA graphs when compiled on CUDA
    precision = next((name for name, d in AUTOCAST_DTYPES.items() if d == dtype), "fp32")
    ema_forward = sampling_network(ema, device, compile=compile_model, precision=precision)
    x0 = torch.randn(batch, c, s, s, device=device).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(sample_batch, c, s, s, device=device).contiguous(
        memory_format=torch.channels_last)
    t = torch.full((sample_batch,), 500, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def train_step() -> None:
        with _autocast(device, dtype):
            loss = training_loss(forward, x0, alphas_cumprod, prediction=cfg.diffusion.prediction,
                                 loss=cfg.diffusion.loss,
                                 min_snr_gamma=cfg.diffusion.min_snr_gamma, generator=generator)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, model, tc.ema_decay)

    @torch.inference_mode()
    def sample_step() -> None:
        ema_forward(x_t, t)

    return train_step, sample_step, count_parameters(model)


def diffusers_steps(cfg: Config, batch: int, sample_batch: int, device: torch.device,
                    dtype: torch.dtype | None) -> tuple[Step, Step, int]:
    """(train step, sample step, parameters) of diffusers, as ``train_unconditional.py`` does."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    c, s, tc = cfg.data.channels, cfg.data.image_size, cfg.train
    torch.manual_seed(0)
    unet = diffusers_unet(cfg).to(device)
    ema = EMAModel(unet.parameters(), decay=tc.ema_decay)
    ema_unet = copy.deepcopy(unet).requires_grad_(False).eval()  # what ema.copy_to() fills
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if cfg.diffusion.beta_schedule != "linear":
        raise SystemExit("the benchmark configs use linear betas (as diffusers' DDPMScheduler "
                         f"here); got '{cfg.diffusion.beta_schedule}'")
    scheduler = DDPMScheduler(num_train_timesteps=cfg.diffusion.timesteps,
                              beta_schedule="linear", beta_start=cfg.diffusion.beta_start,
                              beta_end=cfg.diffusion.beta_end)
    x0 = torch.randn(batch, c, s, s, device=device)
    x_t = torch.randn(sample_batch, c, s, s, device=device)
    t = torch.full((sample_batch,), 500, device=device)

    def train_step() -> None:
        noise = torch.randn(x0.shape, device=device)
        timesteps = torch.randint(0, cfg.diffusion.timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        with _autocast(device, dtype):
            loss = F.mse_loss(unet(noisy, timesteps).sample.float(), noise.float())
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    @torch.no_grad()
    def sample_step() -> None:
        with _autocast(device, dtype):
            ema_unet(x_t, t).sample  # noqa: B018 -- the model call is what is timed

    return train_step, sample_step, count_parameters(unet)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Step, device: torch.device,
           clock: Callable[[], float] = time.perf_counter) -> float:
    _sync(device)
    start = clock()
    step()
    _sync(device)
    return clock() - start


def interleaved_times(steps: list[Step], device: torch.device, warmup: int, repeats: int,
                      clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds of each step in each repeat, timed in turn (a, b, a, b, ...) ``repeats`` times,
    by ``clock`` (wall time, or ``time.process_time`` for CPU time)."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times, strict=True):
            record.append(_timed(step, device, clock))
    return times


def interleaved_medians(steps: list[Step], device: torch.device, warmup: int,
                        repeats: int) -> list[float]:
    """Median seconds of each step, timed in turn (a, b, a, b, ...) ``repeats`` times."""
    return [statistics.median(record)
            for record in interleaved_times(steps, device, warmup, repeats)]


def training_mfu(cfg: Config, batch: int, device: torch.device, warmup: int,
                 repeats: int, peak_tflops: float) -> tuple[float, float]:
    """(TFLOP/s achieved, MFU) of our bf16 training step: FLOPs of forward + backward counted by
    ``FlopCounterMode`` over the step time (optimizer and EMA included in the time only)."""
    from torch.utils.flop_counter import FlopCounterMode

    train_step, _, _ = ours_steps(cfg, batch, 1, device, torch.bfloat16)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step()
    (seconds,) = interleaved_medians([train_step], device, warmup, repeats)
    achieved = counter.get_total_flops() / seconds / 1e12
    return achieved, achieved / peak_tflops


def peak_bf16_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name``, if ``PEAK_BF16_TFLOPS`` knows it."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    """Which of ``CPU_FLAGS`` the CPU reports (Linux /proc/cpuinfo); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    return [flag for flag in CPU_FLAGS if flag in present]


def machine_header(device: torch.device) -> str:
    """What a quoted table ran on: the CPU's name, its bf16/AVX-512/AMX flags, torch's own
    reading of them, any oneDNN ISA cap, what ``precision auto`` does here, and the load."""
    cap = onednn_isa_cap()
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"machine: CPU {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"threads; flags: {' '.join(cpu_flags()) or 'unknown'}; torch "
            f"{torch.__version__} CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16: {native_bf16(device) or 'no'}"
            f"{f', ONEDNN_MAX_CPU_ISA={cap}' if cap else ''}{gpu}; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def one_nfe(net: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor) -> Step:
    """One model call of ``net`` on (x_t, t) under ``torch.inference_mode``, as a step."""
    @torch.inference_mode()
    def step() -> None:
        net(x_t, t)
    return step


def default_vs_auto(configs: list[str], device: torch.device, warmup: int, repeats: int,
                    clock: Callable[[], float] = time.perf_counter) -> list[str]:
    """Rows of sampling img/s per NFE of ours with the old default (fp32) beside the new one
    (auto), one model call each in turn on the same model and x_t; the speed-up is the median
    fp32 time over the median auto time, with the range of the per-repeat ratios. Where bf16 is
    native, forced bf16 runs in the same turns too (the evidence for auto's width rule)."""
    rows = []
    for config in configs:
        cfg = load_config(CONFIGS / f"{config}.yaml")
        c, s = cfg.data.channels, cfg.data.image_size
        sample_batch = BATCHES[(config, "cuda" if device.type == "cuda" else "cpu")][1]
        torch.manual_seed(0)
        model = build_unet(cfg.model, in_channels=c, image_size=s).to(device).eval()
        choice = resolve_precision("auto", device, conv_width(model))
        precisions = ("fp32", "auto", "bf16") if native_bf16(device) else ("fp32", "auto")
        x_t = torch.randn(sample_batch, c, s, s, device=device)
        t = torch.full((sample_batch,), 500, device=device)
        steps = [one_nfe(sampling_network(model, device, precision=p), x_t, t)
                 for p in precisions]
        fp32_s, auto_s, *bf16_s = interleaved_times(steps, device, warmup, repeats, clock)
        ratios = sorted(a / b for a, b in zip(fp32_s, auto_s, strict=True))
        fp32_med, auto_med = statistics.median(fp32_s), statistics.median(auto_s)
        bf16 = "emulated: not run"
        if bf16_s:
            bf16_med = statistics.median(bf16_s[0])
            bf16 = f"{sample_batch / bf16_med:.1f} ({fp32_med / bf16_med:.2f}x)"
        row = (f"| {config} | {sample_batch} | {choice.precision} ({choice.reason}) | "
               f"{sample_batch / fp32_med:.1f} | {sample_batch / auto_med:.1f} | "
               f"{fp32_med / auto_med:.2f}x | {ratios[0]:.2f}-{ratios[-1]:.2f}x | {bf16} |")
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--configs", default="mnist,cifar10",
                        help="comma-separated names of configs/*.yaml")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="fp32, bf16 (autocast) and/or auto (what it picks here)")
    parser.add_argument("--default-vs-auto", action="store_true",
                        help="only ours' sampling, old default fp32 beside new default auto, "
                             "side by side in one run (needs no diffusers)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="with --default-vs-auto on a CPU: one thread, timed by the "
                             "process's CPU time, which other processes' load does not inflate")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16-repeats", type=int, default=None,
                        help="repeats of the bf16 rows (default --repeats; on CPUs without "
                             "native bf16, where it is emulated and ~12x slower, at most 3 after "
                             "1 warm-up, at a quarter of the fp32 batch)")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours under torch.compile (and print compile seconds)")
    parser.add_argument("--mfu-batches", default="128,256,512",
                        help="CUDA only: CIFAR-10 bf16 training batches to measure MFU at")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's peak dense bf16 TFLOP/s, if not in PEAK_BF16_TFLOPS")
    args = parser.parse_args()

    device = resolve_device(args.device)
    use_fast_kernels(device)  # cudnn.benchmark on CUDA, for both libraries alike
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    cpu_time = args.cpu_time and device.type == "cpu"
    if cpu_time:
        torch.set_num_threads(1)  # CPU time of one thread is its work, however loaded the box
    print(machine_header(device), flush=True)
    if args.default_vs_auto:
        print(f"sampling of ours, old default fp32 beside new default auto; median of "
              f"{args.repeats} interleaved repeats after {args.warmup} warm-ups; "
              f"{'CPU time of 1 thread' if cpu_time else 'wall time'}", flush=True)
        rows = default_vs_auto(args.configs.split(","), device, args.warmup, args.repeats,
                               time.process_time if cpu_time else time.perf_counter)
        print("\n| config | sample batch | auto -> | fp32 img/s per NFE | auto img/s per NFE | "
              "auto / fp32 | per-repeat range | bf16 img/s (/ fp32) |\n"
              "|---|---:|---|---:|---:|---:|---:|---:|")
        print("\n".join(rows))
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    import diffusers

    emulated = native_bf16(device) is None
    print(f"throughput on {device} ({name}); torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}; median of {args.repeats} interleaved repeats after "
          f"{args.warmup} warm-ups"
          f"{' (emulated bf16: at most 3 after 1, a quarter of the batch)' if emulated else ''}"
          f"; ratio = ours / diffusers", flush=True)
    rows = []
    for config in args.configs.split(","):
        cfg = load_config(CONFIGS / f"{config}.yaml")
        with torch.device("meta"):  # the architecture only: no weights are allocated
            width = conv_width(build_unet(cfg.model, in_channels=cfg.data.channels,
                                          image_size=cfg.data.image_size))
        for requested in args.precisions.split(","):
            precision = resolve_precision(requested, device, width).precision
            dtype = AUTOCAST_DTYPES.get(precision)
            batch, sample_batch = BATCHES[(config, "cuda" if gpu else "cpu")]
            warmup, repeats = args.warmup, args.repeats
            if dtype is not None and args.bf16_repeats is not None:
                repeats = args.bf16_repeats
            if dtype is not None and emulated:  # ~12x slower, so less of it
                batch, sample_batch = max(batch // 4, 1), max(sample_batch // 4, 1)
                warmup, repeats = min(warmup, 1), min(repeats, 3)
            variants = [("ours", ours_steps(cfg, batch, sample_batch, device, dtype))]
            if args.compile:
                start = time.perf_counter()
                steps = ours_steps(cfg, batch, sample_batch, device, dtype, compile_model=True)
                for step in steps[:2]:
                    step()
                _sync(device)
                print(f"{config} {precision}: torch.compile of ours (train + sample) took "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
                variants.append(("ours compiled", steps))
            variants.append(("diffusers", diffusers_steps(cfg, batch, sample_batch, device,
                                                         dtype)))
            train_s = interleaved_medians([v[1][0] for v in variants], device, warmup, repeats)
            sample_s = interleaved_medians([v[1][1] for v in variants], device, warmup, repeats)
            theirs = len(variants) - 1
            for i, (label, (_, _, params)) in enumerate(variants[:-1]):
                row = (
                    f"| {config} | {label} | {params:,} / {variants[-1][1][2]:,} | "
                    f"{precision if requested == precision else f'{requested} -> {precision}'} "
                    f"| {batch} | {batch / train_s[i]:.1f} | {batch / train_s[theirs]:.1f} | "
                    f"{train_s[theirs] / train_s[i]:.2f}x | {sample_batch} | "
                    f"{sample_batch / sample_s[i]:.1f} | {sample_batch / sample_s[theirs]:.1f} | "
                    f"{sample_s[theirs] / sample_s[i]:.2f}x |")
                rows.append(row)
                print(row, flush=True)
            del variants
    print()
    print("| config | ours | params ours / diffusers | precision | train batch | train img/s "
          "ours | diffusers | ratio | sample batch | sample img/s per NFE ours | diffusers | "
          "ratio |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))

    if gpu:
        peak = args.peak_tflops or peak_bf16_tflops(name)
        if peak is None:
            raise SystemExit(f"no peak bf16 rate known for '{name}'; pass --peak-tflops")
        cfg = load_config(CONFIGS / "cifar10.yaml")
        print(f"\nMFU of the cifar10 bf16 training step (peak {peak:g} TFLOP/s dense bf16):")
        print("| batch | TFLOP/s | MFU |\n|---:|---:|---:|")
        for batch in map(int, args.mfu_batches.split(",")):
            achieved, mfu = training_mfu(cfg, batch, device, args.warmup, args.repeats, peak)
            print(f"| {batch} | {achieved:.1f} | {100 * mfu:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
