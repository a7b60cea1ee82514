"""Choosing the torch device: ``auto`` = CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

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
