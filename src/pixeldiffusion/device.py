"""Choosing the torch device (``auto`` = CUDA, then Apple MPS, then CPU) and the precision of the
model calls (``auto`` = bf16 where the device runs it natively and the model is wide enough to
gain, else fp32)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import PixelDiffusionError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` -> a usable torch.device, or a clear
    error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PixelDiffusionError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PixelDiffusionError(
                f"--device {name} was asked for, but PyTorch {torch.__version__} sees no CUDA GPU; "
                "use --device cpu (or auto), or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PixelDiffusionError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                                      f"device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PixelDiffusionError(f"--device {name} was asked for, but Apple MPS is not available "
                                  "here; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise PixelDiffusionError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or "
                                  "mps")
    return device


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator living on ``device`` (noise drawn on the GPU needs a GPU generator)."""
    return torch.Generator(device=device).manual_seed(seed)


def use_fast_kernels(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the
    fastest (``torch.backends.cudnn.benchmark``). The UNet sees the same few shapes for a whole
    training run or sampling loop, so the one-off timing pays back within a few steps; the
    arithmetic stays fp32 (or the autocast dtype) either way. A no-op on other devices."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# bf16 autocast pays only once the convolutions are wide: below this many output channels in the
# widest one, bf16 sampling measured no faster than fp32 on a native-bf16 CPU (docs/precision.md:
# the digits model, widest 64, 1.02x; the CIFAR-10 model, widest 256, 1.69x).
AUTO_BF16_MIN_WIDTH = 128

# ONEDNN_MAX_CPU_ISA values that still let oneDNN run bf16 convolutions natively (the AVX-512-BF16,
# AVX-512-FP16, AVX10 and AMX levels, and no cap at all); any lower cap makes bf16 emulated.
_NATIVE_BF16_ISA_MARKS = ("BF16", "FP16", "AMX", "AVX10", "ALL", "DEFAULT")


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` (or an explicit precision) became on one device, and why, for one line of
    output such as ``precision: auto -> bf16 (native AVX-512-BF16)``."""

    requested: str  # auto | fp32 | bf16 | fp16
    precision: str  # fp32 | bf16 | fp16: the autocast dtype of the model calls
    reason: str

    def __str__(self) -> str:
        return f"precision: {self.requested} -> {self.precision} ({self.reason})"


def onednn_isa_cap() -> str | None:
    """The instruction-set cap the user put on oneDNN (``ONEDNN_MAX_CPU_ISA``, or its older name
    ``DNNL_MAX_CPU_ISA``), upper-cased, or None when there is none."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return (cap.strip().upper() or None) if cap else None


def cpu_bf16_isa() -> str | None:
    """The CPU's native bf16 instructions that oneDNN may use ("AMX" or "AVX-512-BF16"), from
    torch's own capability queries, or None where bf16 would be emulated (an AVX2-only CPU, a
    build without oneDNN, or ``ONEDNN_MAX_CPU_ISA`` capped below AVX512_CORE_BF16)."""
    if not torch.backends.mkldnn.is_available():
        return None
    cap = onednn_isa_cap()
    if cap is not None and not any(mark in cap for mark in _NATIVE_BF16_ISA_MARKS):
        return None
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX-512-BF16"
    return None


def native_bf16(device: torch.device) -> str | None:
    """What runs bf16 natively on ``device`` (e.g. "AVX-512-BF16", "CUDA bf16"), or None where
    bf16 is emulated or unsupported (AVX2-only CPUs, pre-Ampere GPUs, Apple MPS)."""
    if device.type == "cpu":
        return cpu_bf16_isa()
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "CUDA bf16"
    return None


def conv_width(model: torch.nn.Module) -> int:
    """Output channels of the widest spatial (k x k, k > 1) convolution in ``model``, 0 if it has
    none: the UNet's ``channels * max(channel_mult)``. 1x1 convolutions (skip projections,
    attention's q/k/v) are left out: they are not where bf16 gains."""
    return max((m.out_channels for m in model.modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)), default=0)


def resolve_precision(requested: str, device: torch.device, width: int) -> PrecisionChoice:
    """``requested`` precision -> the one to run. ``auto`` is bf16 where ``device`` runs bf16
    natively and the model's widest convolution has at least ``AUTO_BF16_MIN_WIDTH`` channels
    (narrower ones measured no faster in bf16), else fp32; any other value is kept as given."""
    if requested != "auto":
        return PrecisionChoice(requested, requested, "as asked")
    native = native_bf16(device)
    if native is None:
        return PrecisionChoice("auto", "fp32", f"no native bf16 on {device.type}")
    if width < AUTO_BF16_MIN_WIDTH:
        return PrecisionChoice("auto", "fp32", f"native {native}, but a model this narrow ("
                               f"{width} < {AUTO_BF16_MIN_WIDTH} channels) gains nothing from "
                               f"bf16")
    return PrecisionChoice("auto", "bf16", f"native {native}")


def precision_rule(device: torch.device) -> str:
    """One line saying what ``auto`` gives on ``device`` for any model, for a server that loads
    its models later: ``precision: auto -> bf16 (native AVX-512-BF16) for models ...``."""
    wide = resolve_precision("auto", device, AUTO_BF16_MIN_WIDTH)
    if wide.precision == "fp32":
        return str(wide)
    return (f"{wide} for models whose widest convolution has >= {AUTO_BF16_MIN_WIDTH} "
            f"channels, fp32 for narrower ones")
