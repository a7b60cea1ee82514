"""pixeldiffusion: pixel-space denoising diffusion models (DDPM, DDIM) in PyTorch.

    import pixeldiffusion as pd
    ckpt = pd.load_checkpoint("runs/exp-...")
    x0 = pd.sample(ckpt.model, torch.randn(16, 1, 32, 32), pd.alphas_cumprod_of(ckpt.config))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; imported on first use so `import pixeldiffusion` is cheap
_EXPORTS = {
    "sample": "samplers", "SAMPLERS": "samplers", "make_denoiser": "samplers",
    "load_checkpoint": "checkpoint", "load_config": "config", "Config": "config",
    "train": "run", "alphas_cumprod_of": "schedule", "generate": "generate",
    "UNet": "unet", "build_unet": "unet",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pixeldiffusion' has no attribute '{name}'")
