"""pixeldiffusion: pixel-space denoising diffusion models (DDPM, DDIM) in PyTorch."""

__version__ = "0.1.0"
