"""Drawing pictures from a trained model: final samples, or the chain as x_t (denoise) or as the
predicted x0 (progressive), plus the files a user asked for (grid PNG, single PNGs, samples.npz)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import CONSISTENCY_SAMPLER, Config, ConsistencyConfig, SampleConfig, from_dict
from .device import conv_width, make_generator, resolve_precision, use_fast_kernels
from .errors import PixelDiffusionError
from .files import atomic_write
from .formulations import VPBridge, bridge_for
from .guidance import guided_model, guided_network, sampling_labels
from .images import atomic_save, make_grid, save_gif, to_pil, to_uint8
from .optimal_steps import calibrated_timesteps
from .optimal_steps import check_steps as check_optimal_steps
from .samplers import check_sampler, default_spacing, make_denoiser, option_names, sample
from .schedule import sampling_timesteps

MODES = ("sample", "denoise", "progressive")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Generated:
    images: Tensor              # [N, C, H, W] in [-1, 1], the final x_0
    frames: Tensor | None       # [N, F, C, H, W] in [-1, 1] along the chain (denoise/progressive)
    labels: Tensor | None = None  # [N] int64 class of each image (class-conditional models)
    timesteps: Tensor | None = None  # float64 [steps], the fitted "optimal" spacing, else None


def sampling_network(model: torch.nn.Module, device: torch.device, *, precision: str = "auto",
                     compile: bool = False) -> Callable[..., Tensor]:
    """``model`` on the fast sampling path, called as the samplers call it: (x_t, t, ...) ->
    float32 output of x_t's shape. Every sampling command (``generate``, interpolation,
    inpainting) goes through here, so this is the one place that sets the path up.

    On CPU and CUDA the weights are put in channels-last (in place) and each x_t handed to the
    model too (a no-op copy check when it already is), which runs oneDNN's convolutions faster
    (docs/performance.md); on CUDA cuDNN also autotunes its algorithms
    (``device.use_fast_kernels``). ``precision`` bf16 / fp16 runs each call under
    ``torch.autocast`` (the sampler's own arithmetic stays float32); ``auto`` picks bf16 where
    the device runs it natively and the model is wide enough to gain, else fp32
    (``device.resolve_precision``). ``compile`` wraps the model
    in ``torch.compile``, on CUDA with mode "reduce-overhead": each batch shape is captured once
    as a CUDA graph and replayed, so a small UNet is no longer bound by kernel launches. Graph
    outputs live in buffers that the next replay overwrites, so they are cloned before a
    multistep sampler keeps them.
    """
    use_fast_kernels(device)
    layout = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
    model.to(memory_format=layout)
    net: Callable[..., Tensor] = model
    cuda_graphs = compile and device.type == "cuda"
    if compile:
        # a fresh wrapper per call is cheap: dynamo caches the compiled graphs on the model
        net = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    dtype = AUTOCAST_DTYPES.get(resolve_precision(precision, device, conv_width(model)).precision)

    def call(x_t: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = net(x_t.contiguous(memory_format=layout), t, *args, **kwargs)
        if out.dtype != torch.float32:
            return out.float()  # a new tensor, so also safe from the next graph replay
        return out.clone() if cuda_graphs else out
    return call


@torch.inference_mode()
def generate(model: torch.nn.Module, cfg: Config, device: torch.device, *,
             mode: str = "sample", micro_batch: int | None = None,
             interval: int | None = None, guidance: float | None = None,
             class_label: str | int | None = None,
             callback: Callable[[dict[str, Any]], None] | None = None,
             guidance_model: torch.nn.Module | None = None) -> Generated:
    """Sample ``cfg.sample.n_samples`` images with ``cfg.sample``'s sampler and seed.

    mode "denoise" records x_t and "progressive" the predicted x0 every ``interval`` steps
    (default: about 10 frames), ending with the final image, through the sampler's callback.

    The model runs on ``sampling_network``'s fast path (channels-last, ``cfg.sample.precision``,
    ``cfg.sample.compile``) under ``torch.inference_mode``, through its formulation's bridge
    (``formulations.bridge_for(cfg.diffusion)``: the identity for DDPM; EDM's preconditioning or
    flow's velocity as an x0 model for the others), over the bridge's VP table.

    Class-conditional models: ``class_label`` (an index, a name such as "cat", "all" for
    ``nrow`` images of each class in class order, or "random") and the classifier-free guidance
    weight ``guidance`` (0 unconditional, 1 conditional, > 1 guided; see guidance.py) default to
    ``cfg.sample.class_label`` / ``cfg.sample.guidance``; the labels come back in ``labels``.

    ``guidance_model``: autoguidance (guidance.py, ``autoguided_model``): a worse version of
    ``model`` (``guidance.load_guidance_model`` loads and checks one) guides it with weight
    ``guidance``, unconditional models included; both networks get the class labels.

    ``callback``, if given, is called after every model call with the sampler's dict
    {"i", "t", "x_t", "x0"} (tensors on ``device``) plus "start", the index of the micro batch's
    first image in ``images``; the browser UI (serve.py) streams its live frames from it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; use one of {MODES}")
    if cfg.sample.sampler == CONSISTENCY_SAMPLER:
        if guidance_model is not None:
            raise PixelDiffusionError("--guidance_model (autoguidance) guides a diffusion model's "
                                      "denoiser; a consistency model takes --guidance with "
                                      "--class only")
        _check_autoguidance_cfg(cfg.sample.autoguidance_cfg, False, False)
        return generate_consistency(model, cfg, device, mode=mode, micro_batch=micro_batch,
                                    interval=interval, guidance=guidance,
                                    class_label=class_label, callback=callback)
    s = cfg.sample
    micro_batch = micro_batch or s.batch_size
    interval = interval or max(1, s.steps // 10)
    bridge = bridge_for(cfg.diffusion)
    alphas_cumprod = bridge.alphas_cumprod
    generator = make_generator(device, s.seed)
    spacing = _checked_spacing(s, alphas_cumprod)
    optimal = spacing == "optimal"  # fitted to this model below, once, before the first batch
    options = sampler_options(s)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    # the guide is wrapped like the model: autoguidance mixes two denoisers of one formulation
    fast, guide = (None if net is None else bridge.wrap(sampling_network(
        net, device, precision=s.precision, compile=s.compile)) for net in (model, guidance_model))
    labels, w = sampling_labels(cfg, guidance, class_label, autoguidance=guide is not None)
    _check_autoguidance_cfg(s.autoguidance_cfg, guide is not None, labels is not None)
    n_samples = s.n_samples if labels is None else len(labels)
    images, frames = [], []
    timesteps: Tensor | None = None
    record = _Frames(mode, interval, callback)
    for start in range(0, n_samples, micro_batch):
        record.batch(start)
        x_T = torch.randn((min(micro_batch, n_samples - start), *shape),
                          generator=generator, device=device)
        net = guided_network(
            fast, None if labels is None else labels[start:start + len(x_T)], w, guide=guide,
            alphas_cumprod=alphas_cumprod, interval=s.guidance_interval,
            null_class=cfg.model.num_classes, autoguidance_cfg=s.autoguidance_cfg)
        if optimal and timesteps is None:
            timesteps = _fit_optimal(fast, cfg, x_T, labels, w, bridge, guide)
        x0 = sample(net, x_T, alphas_cumprod, sampler=s.sampler, steps=s.steps,
                    spacing=spacing if timesteps is None else timesteps,
                    prediction=bridge.prediction,
                    clip_x0=s.clip_x0, dynamic_threshold=s.dynamic_threshold, generator=generator,
                    callback=record if mode != "sample" or callback else None,
                    **options).float().cpu()
        images.append(x0)
        if mode != "sample":
            frames.append(record.frames_ending_with(x0))
    return Generated(torch.cat(images), torch.cat(frames) if frames else None, labels, timesteps)


def _check_autoguidance_cfg(weight: float, autoguidance: bool, conditional: bool) -> None:
    """A PixelDiffusionError naming the fix where ``sample.autoguidance_cfg`` (a classifier-free
    weight added to autoguidance) cannot apply: no guidance model, or no class labels."""
    if weight == 1.0:
        return
    if not autoguidance:
        raise PixelDiffusionError(f"sample.autoguidance_cfg {weight:g} adds classifier-free "
                                  f"guidance to autoguidance, but no --guidance_model was given; "
                                  f"without one, --guidance is the classifier-free weight")
    if not conditional:
        raise PixelDiffusionError(f"sample.autoguidance_cfg {weight:g} needs a class-conditional "
                                  f"model (its null-label half); this one is unconditional, so "
                                  f"leave it at 1")


def with_mid_sigmas(cfg: Config, text: str | None) -> Config:
    """``cfg`` with ``text`` ("2.5", or "10,2.5,0.5") as its consistency.mid_sigmas, checked by
    the config's rules (``--mid_sigmas`` of sample and eval, eval's ``--sweep mid_sigmas=``);
    None leaves it as it is. A diffusion checkpoint is one PixelDiffusionError; a count that does
    not fit the steps is refused by ``consistency_sigmas_of``."""
    from .config import apply_overrides

    if text is None:
        return cfg
    if cfg.consistency.method == "none":
        raise PixelDiffusionError("--mid_sigmas sets a consistency model's intermediate noise "
                                  "levels; this checkpoint is a diffusion model (tune one with "
                                  "pixeldiffusion distill, or drop --mid_sigmas)")
    return apply_overrides(cfg, [("consistency.mid_sigmas", text)])


def consistency_sigmas_of(c: ConsistencyConfig, steps: int) -> list[float]:
    """The noise levels of ``steps``-call sampling of a consistency model with section ``c``
    (``consistency.consistency_sigmas``); steps that its ``mid_sigmas`` do not fit are the
    user's, one PixelDiffusionError sentence naming the key."""
    from .consistency import consistency_sigmas

    try:
        return consistency_sigmas(steps, sigma_max=c.sigma_max, sigma_min=c.sigma_min,
                                  mid_sigmas=c.mid_sigmas or None)
    except ValueError as err:
        raise PixelDiffusionError(f"{err} (config key consistency.mid_sigmas)") from None


def generate_consistency(model: torch.nn.Module, cfg: Config, device: torch.device, *,
                         mode: str = "sample", micro_batch: int | None = None,
                         interval: int | None = None, guidance: float | None = None,
                         class_label: str | int | None = None,
                         callback: Callable[[dict[str, Any]], None] | None = None) -> Generated:
    """``generate`` for a consistency model (``cfg.consistency``, made by ``pixeldiffusion
    distill``): multistep consistency sampling (Song et al. 2023, Alg. 1) in ``cfg.sample.steps``
    calls at ``consistency.consistency_sigmas``, from the same noise images ``generate`` draws,
    with classifier-free guidance wrapped around f. Frames and ``callback`` get x_t in the
    samplers' VP scaling, x / sqrt(1 + sigma^2), and t = sigma."""
    from .consistency import consistency_sample, student_function
    from .formulations import bridge_for

    s, c = cfg.sample, cfg.consistency
    if c.method == "none":
        raise PixelDiffusionError("sampler 'consistency' needs a consistency model; tune one "
                                  "with pixeldiffusion distill, or pick a diffusion sampler")
    sigmas = consistency_sigmas_of(c, s.steps)
    micro_batch, interval = micro_batch or s.batch_size, interval or 1
    fast = sampling_network(model, device, precision=s.precision, compile=s.compile)
    f = student_function(fast, bridge_for(cfg.diffusion), sigma_min=c.sigma_min,
                         sigma_data=c.sigma_data)
    labels, w = sampling_labels(cfg, guidance, class_label)
    n_samples = s.n_samples if labels is None else len(labels)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    generator = make_generator(device, s.seed)
    images, frames = [], []
    record = _Frames(mode, interval, callback, vp_scale=True)
    for start in range(0, n_samples, micro_batch):
        record.batch(start)
        z = torch.randn((min(micro_batch, n_samples - start), *shape), generator=generator,
                        device=device)
        f_batch = f if labels is None else guided_model(
            f, labels[start:start + len(z)], w, null_class=cfg.model.num_classes)
        x0 = consistency_sample(f_batch, z, sigmas, sigma_min=c.sigma_min, generator=generator,
                                callback=record).float()
        x0 = (x0.clamp(-1, 1) if s.clip_x0 else x0).cpu()
        images.append(x0)
        if mode != "sample":
            frames.append(record.frames_ending_with(x0))
    return Generated(torch.cat(images), torch.cat(frames) if frames else None, labels)


class _Frames:
    """The samplers' callback for one ``generate`` call: forwards each step's dict (plus "start",
    the micro batch's first image index) to the caller's ``callback``, and keeps x_t ("denoise")
    or the predicted x0 ("progressive") every ``interval`` steps of the current micro batch.
    ``vp_scale``: x_t comes in EDM's scale (x0 + sigma eps, sigma = "t") and is shown divided by
    sqrt(1 + sigma^2), as the VP samplers' x_t is."""

    def __init__(self, mode: str, interval: int, callback: Callable[[dict[str, Any]], None] | None,
                 *, vp_scale: bool = False) -> None:
        self.mode, self.interval, self.callback, self.vp_scale = mode, interval, callback, vp_scale
        self.start, self.chunk = 0, []

    def batch(self, start: int) -> None:
        """A new micro batch, whose first image is ``images[start]``."""
        self.start, self.chunk = start, []

    def __call__(self, info: dict[str, Any]) -> None:
        if self.vp_scale:
            info = {**info, "x_t": info["x_t"] / (1 + info["t"] ** 2) ** 0.5}
        if self.callback is not None:
            self.callback({**info, "start": self.start})
        if self.mode != "sample" and info["i"] % self.interval == 0:
            kept = info["x_t"] if self.mode == "denoise" else info["x0"]
            self.chunk.append(kept.float().cpu())

    def frames_ending_with(self, x0: Tensor) -> Tensor:
        """The kept frames and the final ``x0``: [N, frames, C, H, W]."""
        return torch.stack([*self.chunk, x0], dim=1)


def _checked_spacing(s: SampleConfig, alphas_cumprod: Tensor) -> str:
    """The spacing ``s`` samples with (the sampler's own when unset). The sampler, spacing and
    steps are checked here, before any model call: a bad one is the user's, one clear sentence."""
    spacing = s.spacing or default_spacing(s.sampler)
    try:
        check_sampler(s.sampler)
        if spacing == "optimal":
            check_optimal_steps(len(alphas_cumprod), s.steps)
        else:
            sampling_timesteps(len(alphas_cumprod), s.steps, spacing, alphas_cumprod)
    except ValueError as err:
        raise PixelDiffusionError(str(err)) from None
    return spacing


def _fit_optimal(model: Callable[..., Tensor], cfg: Config, x_T: Tensor, labels: Tensor | None,
                 w: float, bridge: VPBridge,
                 guide: Callable[..., Tensor] | None = None) -> Tensor:
    """The "optimal" timesteps of ``model`` (already bridged: ``bridge.wrap``) as it samples here
    (same guidance and clipping), fitted on min(32, n_samples) calibration noise images drawn
    with seed + 1, so not the images' own noise (optimal_steps.calibrated_timesteps)."""
    s, alphas_cumprod = cfg.sample, bridge.alphas_cumprod
    n = min(32, s.n_samples)
    net = guided_network(
        model, None if labels is None else labels[torch.arange(n, device=labels.device)
                                                  % len(labels)], w, guide=guide,
        alphas_cumprod=alphas_cumprod, interval=s.guidance_interval,
        null_class=cfg.model.num_classes, autoguidance_cfg=s.autoguidance_cfg)
    denoise = make_denoiser(net, alphas_cumprod, prediction=bridge.prediction,
                            clip_x0=s.clip_x0, dynamic_threshold=s.dynamic_threshold)
    return calibrated_timesteps(denoise, x_T, alphas_cumprod, s.steps, sampler=s.sampler,
                                options=sampler_options(s), samples=n, seed=s.seed + 1)


def save_grid_of(generated: Generated, path: str | Path, *, nrow: int,
                 grayscale: bool = False) -> Path:
    """The grid PNG: images row by row, or one row per sample along the chain."""
    if generated.frames is None:
        pictures, ncol = to_uint8(generated.images), nrow
    else:
        pictures = to_uint8(generated.frames.flatten(0, 1))
        ncol = generated.frames.shape[1]
    return atomic_save(to_pil(make_grid(pictures, ncol), grayscale), path)


def save_each(images: Tensor, save_dir: str | Path, *, grayscale: bool = False,
              labels: Tensor | None = None) -> Path:
    """Each image as ``save_dir/000000.png`` and all of them as ``samples.npz`` (``images`` uint8
    [N, H, W, C]; ``labels`` int64 [N] when given). Returns the npz path."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    pictures = to_uint8(images)
    for k, picture in enumerate(pictures):
        atomic_save(to_pil(picture, grayscale), save_dir / f"{k:06d}.png")
    arrays = {"images": pictures}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)
    with atomic_write(save_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return save_dir / "samples.npz"


def sampler_options(s: SampleConfig) -> dict[str, Any]:
    """The options ``s.sampler`` takes (``samplers.option_names``, e.g. ``eta`` for ddim,
    euler_ancestral and dpmpp_2m_sde), from the sample section's fields of the same name; unset
    (None) fields are left out, so the sampler keeps its own default."""
    return {name: getattr(s, name) for name in option_names(s.sampler)
            if getattr(s, name, None) is not None}


def with_sample_options(cfg: Config, **chosen: Any) -> Config:
    """``cfg`` with the sample-section values ``chosen`` on top (None values are left out),
    checked like a config file: a bad value is a PixelDiffusionError naming the fix."""
    chosen = {key: value for key, value in chosen.items() if value is not None}
    steps, T = chosen.get("steps", cfg.sample.steps), cfg.diffusion.timesteps
    if steps > T:
        raise PixelDiffusionError(f"--steps {steps} is more than the model's {T} timesteps; use "
                                  f"--steps {T} or fewer")
    return from_dict({"sample": chosen}, base=cfg)


def spacing_text(timesteps: Tensor) -> str:
    """Timesteps as the text ``--spacing`` takes, each rounded to 0.01: "999,512.3,80"."""
    return ",".join(f"{t:.2f}".rstrip("0").rstrip(".") for t in timesteps.tolist())


def save_outputs(generated: Generated, save_path: str | Path, *, nrow: int, chain: bool = False,
                 gif: str | Path | None = None, save_dir: str | Path | None = None,
                 grayscale: bool = False) -> list[Path]:
    """Write what ``pixeldiffusion sample`` writes: the grid (of the chain when ``chain``, else
    of the final images), the chain as a GIF at ``gif``, each image and samples.npz in
    ``save_dir``. Returns the paths written, the grid first."""
    grid = generated if chain else replace(generated, frames=None)
    written = [save_grid_of(grid, save_path, nrow=nrow, grayscale=grayscale)]
    if gif:
        written.append(save_gif(generated.frames, gif, nrow=nrow, grayscale=grayscale))
    if save_dir:
        written.append(save_each(generated.images, save_dir, grayscale=grayscale,
                                 labels=generated.labels))
    return written
