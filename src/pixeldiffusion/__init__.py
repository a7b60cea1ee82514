"""pixeldiffusion: pixel-space diffusion models (DDPM, EDM, flow matching) in PyTorch.

    import pixeldiffusion as pd
    ckpt = pd.load_checkpoint("runs/exp-...")
    bridge = pd.bridge_for(ckpt.config.diffusion)   # the formulation's table and denoiser
    x0 = pd.sample(bridge.wrap(ckpt.model), torch.randn(16, 1, 32, 32), bridge.alphas_cumprod,
                   prediction=bridge.prediction, sampler="unipc", steps=10)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.2.0"

# public name -> module that defines it; imported on first use so `import pixeldiffusion` is cheap
_EXPORTS = {
    "sample": "samplers", "SAMPLERS": "samplers", "make_denoiser": "samplers",
    "load_checkpoint": "checkpoint", "load_config": "config", "Config": "config",
    "train": "run", "alphas_cumprod_of": "schedule", "generate": "generate",
    "UNet": "unet", "build_unet": "unet", "bridge_for": "formulations",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pixeldiffusion' has no attribute '{name}'")


class _Package(types.ModuleType):
    """This package's module type. Importing a submodule binds it as an attribute of its
    package, so once ``pixeldiffusion.generate`` (or ``.train``) is imported, ``pd.generate``
    would be that module and ``__getattr__`` never asked again. A public name shared with a
    submodule keeps meaning the function: the binding is refused. The submodule itself stays
    reachable as ``importlib.import_module("pixeldiffusion.generate")``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
