"""Editing with a trained model: RePaint inpainting and spherical interpolation of noises.

* ``repaint`` (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic
  Models", Alg. 1 with the jump schedule of Sec. 4.2 / App. B): an unconditional DDPM fills the
  unknown region while the known region is replaced, at every step, by the known image noised to
  the same level; going back ``jump_length`` steps and denoising them again (``jump_n_sample``
  times in all) lets the two regions agree. It follows the sampler contract of samplers.py.
* ``slerp`` (Shoemake 1985) between two Gaussian noises, sampled deterministically with DDIM
  (eta = 0), gives a smooth walk between two images (Song et al. 2021, DDIM, Sec. 5.3).

``inpaint`` and ``interpolate`` are the ``pixeldiffusion inpaint`` / ``interpolate`` commands
after argument parsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import LoadedCheckpoint
from .data import load_image
from .device import make_generator
from .errors import PixelDiffusionError
from .formulations import bridge_for
from .generate import sampling_network
from .images import atomic_save, make_grid, to_pil, to_uint8
from .optimal_steps import calibrated_timesteps
from .samplers import (
    Callback,
    Denoiser,
    check_var_type,
    ddpm_posterior,
    default_spacing,
    make_denoiser,
    sample,
)
from .schedule import sampling_timesteps


def jump_schedule(steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """RePaint's walk over step indices (``get_schedule_jump`` of the paper's code, App. B).

    Index ``k`` in [0, steps - 1] means the k-th smallest sampling timestep and -1 the data.
    Starting at ``steps - 1``, the walk goes down one index at a time; at every multiple of
    ``jump_length`` below ``steps - jump_length`` it goes back up ``jump_length`` indices,
    ``jump_n_sample - 1`` times, so those steps are denoised ``jump_n_sample`` times in all.
    Returns the visited indices, ending with -1.
    """
    if steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ValueError("steps, jump_length and jump_n_sample must all be at least 1")
    jumps = {k: jump_n_sample - 1 for k in range(0, steps - jump_length, jump_length)}
    k, walk = steps, []
    while k >= 1:
        k -= 1
        walk.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            for _ in range(jump_length):
                k += 1
                walk.append(k)
    return walk + [-1]


@torch.inference_mode()
def repaint(denoise: Denoiser, x_T: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
            x0_known: Tensor, known: Tensor, jump_length: int = 10, jump_n_sample: int = 10,
            var_type: str = "fixed_small", generator: torch.Generator | None = None,
            callback: Callback | None = None) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1) on the sampling ``timesteps`` (descending, as for
    every sampler); one model call per downward step of ``jump_schedule``.

    x_T: [N, C, H, W] noise. x0_known: [N, C, H, W] in [-1, 1], the image to complete.
    known: [N or 1, 1 or C, H, W] with 1 where ``x0_known`` is kept and 0 where it is filled.
    Downward step t -> t_prev (abar_prev = 1 at the data, t_prev = -1):
      x_known   = sqrt(abar_prev) x0_known + sqrt(1 - abar_prev) eps       (Alg. 1 line 5, eq. 8)
      x_unknown ~ q(x_prev | x_t, x0) with the model's x0 (samplers.ddpm_posterior; line 7)
      x_prev    = known * x_known + (1 - known) * x_unknown                 (line 8)
    Upward jump t_prev -> t: x_t ~ q(x_t | x_prev) = N(sqrt(abar_t/abar_prev) x_prev,
    (1 - abar_t/abar_prev) I)                                               (line 10)
    Returns x_0 [N, C, H, W]; where ``known`` is 1 it equals ``x0_known`` exactly.
    """
    check_var_type(var_type)
    ts = [int(t) for t in timesteps.flip(0)]  # ascending: index k -> timestep ts[k]
    known = known.to(x_T.dtype)

    def abar(k: int) -> float:
        return 1.0 if k < 0 else float(alphas_cumprod[ts[k]])

    def noise() -> Tensor:
        return torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype)

    walk = jump_schedule(len(ts), jump_length, jump_n_sample)
    x, calls = x_T, 0
    for k, k_next in zip(walk[:-1], walk[1:], strict=True):
        abar_t, abar_prev = abar(max(k, k_next)), abar(min(k, k_next))
        if k_next > k:  # jump back up one step: forward process q(x_t | x_prev)
            x = math.sqrt(abar_t / abar_prev) * x + math.sqrt(1 - abar_t / abar_prev) * noise()
            continue
        x0, _ = denoise(x, ts[k])
        if callback is not None:
            callback({"i": calls, "t": ts[k], "x_t": x, "x0": x0})
        calls += 1
        x_unknown, var = ddpm_posterior(x0, x, abar_t, abar_prev, var_type)
        if k_next >= 0:
            x_unknown = x_unknown + math.sqrt(var) * noise()
            x_known = math.sqrt(abar_prev) * x0_known + math.sqrt(1 - abar_prev) * noise()
        else:
            x_known = x0_known
        x = torch.where(known > 0.5, x_known, x_unknown)
    return x


def slerp(a: Tensor, b: Tensor, alpha: Tensor) -> Tensor:
    """Spherical interpolation (Shoemake 1985) between noises a and b ([C, H, W] each) at the
    fractions ``alpha`` ([F] in [0, 1]): sin((1 - alpha) theta)/sin(theta) a + sin(alpha theta)/
    sin(theta) b with cos(theta) = <a, b>/(|a| |b|). Returns [F, C, H, W]; linear if a || b."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos_theta = (a64 @ b64 / (a64.norm() * b64.norm())).clamp(-1, 1)
    theta = torch.arccos(cos_theta)
    alpha = alpha.double()[:, None]
    if float(theta.sin()) < 1e-6:
        mixed = (1 - alpha) * a64 + alpha * b64
    else:
        mixed = (torch.sin((1 - alpha) * theta) * a64 + torch.sin(alpha * theta) * b64) \
            / theta.sin()
    return mixed.to(a.dtype).reshape(-1, *a.shape)


# --------------------------------------------------------------------------- the commands


@dataclass
class Inpainted:
    images: Tensor     # [N, C, H, W] in [-1, 1]: samples * (1 - known) + image * known
    masked: Tensor     # [1, C, H, W] in [-1, 1]: the input with the unknown region greyed out
    known: Tensor      # [1, 1, H, W], 1 = kept from the input


def load_mask(path: str | Path, size: int) -> Tensor:
    """A mask picture -> known [1, 1, size, size]: white (> 50% grey) = fill, black = keep."""
    fill = load_image(Path(path), size, 1) > 0
    if not bool(fill.any()):
        raise PixelDiffusionError(f"the mask '{path}' has no white pixels, so there is nothing "
                                  "to fill; paint the region to fill white on black")
    return (~fill).float()[None]


def inpaint(loaded: LoadedCheckpoint, image: str | Path, mask: str | Path, *, n_samples: int,
            steps: int, jump_length: int, jump_n_sample: int, seed: int,
            device: torch.device, var_type: str | None = None,
            clip_x0: bool | None = None) -> Inpainted:
    """Fill the white region of ``mask`` in ``image`` with ``n_samples`` RePaint samples."""
    cfg = loaded.config
    for path in (image, mask):
        if not Path(path).is_file():
            raise PixelDiffusionError(f"'{path}' does not exist; pass an image file")
    size, channels = cfg.data.image_size, cfg.data.channels
    T = cfg.diffusion.timesteps
    if not 1 <= steps <= T:
        raise PixelDiffusionError(f"--steps {steps} must be between 1 and the model's {T} "
                                  "timesteps")
    x0_known = load_image(Path(image), size, channels)[None].to(device)
    known = load_mask(mask, size).to(device)
    bridge = bridge_for(cfg.diffusion)  # the checkpoint's formulation, as a VP model
    alphas_cumprod = bridge.alphas_cumprod
    generator = make_generator(device, seed)
    x_T = torch.randn((n_samples, channels, size, size), generator=generator, device=device)
    clip = cfg.sample.clip_x0 if clip_x0 is None else clip_x0
    net = bridge.wrap(sampling_network(loaded.model, device, precision=cfg.sample.precision,
                                       compile=cfg.sample.compile))
    denoise = make_denoiser(net, alphas_cumprod, prediction=bridge.prediction, clip_x0=clip)
    try:  # RePaint walks DDPM's timesteps: the checkpoint's spacing, else ddpm's own
        timesteps = sampling_timesteps(T, steps, cfg.sample.spacing or default_spacing("ddpm"),
                                       alphas_cumprod)
    except ValueError as err:
        raise PixelDiffusionError(f"{err} (the checkpoint's sample.spacing)") from None
    var_type = var_type or cfg.sample.var_type
    images = repaint(denoise, x_T, timesteps, alphas_cumprod, x0_known=x0_known, known=known,
                     jump_length=jump_length, jump_n_sample=jump_n_sample, generator=generator,
                     **({"var_type": var_type} if var_type else {}))
    masked = torch.where(known > 0.5, x0_known, torch.zeros_like(x0_known))
    return Inpainted(images.float().cpu(), masked.float().cpu(), known.float().cpu())


def save_inpainted(result: Inpainted, path: str | Path, *, nrow: int) -> Path:
    """One grid: the masked input first, then the samples."""
    pictures = to_uint8(torch.cat([result.masked, result.images]))
    return atomic_save(to_pil(make_grid(pictures, nrow)), path)


@torch.inference_mode()
def interpolate(loaded: LoadedCheckpoint, *, n_frames: int, seeds: tuple[int, int],
                steps: int, device: torch.device, sampler: str = "ddim",
                options: dict[str, Any] | None = None) -> Tensor:
    """Images along the great circle between the noises of ``seeds``: [n_frames, C, H, W] in
    [-1, 1]. With ``sampler="ddim"`` (eta 0) the map noise -> image is deterministic."""
    cfg = loaded.config
    if n_frames < 2:
        raise PixelDiffusionError(f"--n_frames {n_frames}: an interpolation needs at least 2")
    T = cfg.diffusion.timesteps
    if not 1 <= steps <= T:
        raise PixelDiffusionError(f"--steps {steps} must be between 1 and the model's {T} "
                                  "timesteps")
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    ends = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    x_T = slerp(ends[0], ends[1], torch.linspace(0, 1, n_frames)).to(device)
    generator = make_generator(device, seeds[0])
    bridge = bridge_for(cfg.diffusion)  # the checkpoint's formulation, as a VP model
    net = bridge.wrap(sampling_network(loaded.model, device, precision=cfg.sample.precision,
                                       compile=cfg.sample.compile))
    alphas_cumprod = bridge.alphas_cumprod
    spacing: str | Tensor | None = cfg.sample.spacing
    if spacing == "optimal":  # fitted to the model first, as ``generate`` does
        denoise = make_denoiser(net, alphas_cumprod, prediction=bridge.prediction,
                                clip_x0=cfg.sample.clip_x0)
        spacing = calibrated_timesteps(denoise, x_T, alphas_cumprod, steps, sampler=sampler,
                                       options=options)
    x0 = sample(net, x_T, alphas_cumprod, sampler=sampler, steps=steps, spacing=spacing,
                prediction=bridge.prediction, clip_x0=cfg.sample.clip_x0,
                generator=generator, **(options or {}))
    return x0.float().cpu()


def save_interpolation(frames: Tensor, path: str | Path, *, frame_ms: int = 120) -> Path:
    """``.gif``: an animation that goes there and back; anything else: a one-row strip PNG."""
    pictures = to_uint8(frames)
    path = Path(path)
    if path.suffix.lower() == ".gif":
        images = [to_pil(picture) for picture in pictures]
        images = images + images[-2:0:-1]  # there and back
        return atomic_save(images[0], path, save_all=True, append_images=images[1:],
                           duration=frame_ms, loop=0)
    return atomic_save(to_pil(make_grid(pictures, len(pictures))), path)
