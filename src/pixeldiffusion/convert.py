"""diffusers interop: our checkpoints <-> diffusers folders (``UNet2DModel`` + a scheduler),
written and read without importing diffusers.

Our UNet and diffusers' ``UNet2DModel`` with ``DownBlock2D`` / ``AttnDownBlock2D`` levels are
both the DDPM-paper network (Ho et al. 2020, App. B), so the conversion is a renaming of
parameters plus two reshapes in the attention blocks: our fused 1x1-conv ``qkv`` is diffusers'
three linear layers ``to_q``, ``to_k``, ``to_v`` stacked, and our 1x1-conv ``proj_out`` is
``to_out.0``. Layout details in which published models differ (the timestep embedding's
``flip_sin_to_cos`` / ``freq_shift``, ``norm_eps``, ``downsample_padding``) are model config keys
of ours with the same names. A folder of another layout is refused with a message naming the
block type or config key we cannot express.

Folder written by ``to_diffusers``::

    OUT_DIR/model_index.json
    OUT_DIR/unet/config.json, OUT_DIR/unet/diffusion_pytorch_model.safetensors
    OUT_DIR/scheduler/scheduler_config.json

The scheduler is the one that calls the network exactly as our formulation does
(``diffusion.formulation``), and ``model_index.json`` names a pipeline whose loop applies it:

- ddpm: ``DDPMScheduler`` in a ``DDPMPipeline`` (integer t, eps / x0 / v output).
- edm: ``EDMEulerScheduler`` (Karras et al. 2022, Table 1: c_in = 1 / sqrt(sigma^2 + sd^2),
  c_noise = ln(sigma) / 4, c_skip, c_out = sigma sd / sqrt(sigma^2 + sd^2), which diffusers calls
  ``prediction_type`` "epsilon"; sigma_min, sigma_max, sigma_data as trained, rho 7) in a
  ``ConsistencyModelPipeline``, an unconditional ``UNet2DModel`` pipeline whose loop is this one
  (no diffusers pipeline is made for EDM); by hand (``EDMDPMSolverMultistepScheduler`` takes the
  same config)::

      unet = UNet2DModel.from_pretrained(OUT_DIR, subfolder="unet")
      scheduler = EDMEulerScheduler.from_pretrained(OUT_DIR, subfolder="scheduler")
      scheduler.set_timesteps(18)                        # karras (rho = 7) sigmas, then 0
      x = torch.randn(16, C, H, W) * scheduler.init_noise_sigma
      for t in scheduler.timesteps:                      # t = c_noise = ln(sigma) / 4
          x_in = scheduler.scale_model_input(x, t)       # c_in x
          x = scheduler.step(unet(x_in, t).sample, t, x).prev_sample   # c_skip, c_out, Euler
      images = (x / 2 + 0.5).clamp(0, 1)

- flow (v-prediction): ``FlowMatchEulerDiscreteScheduler`` (x_t = (1 - t) x0 + t eps, the
  network at timestep 1000 t, ``x_next = x + (t_next - t) v``; ``shift`` as trained) in a
  ``DDPMPipeline``, whose loop (pure noise, ``step`` on the raw output) is flow's Euler.

``from_diffusers`` reads that layout, or the flat one of the hub's ``google/ddpm-*`` repositories
(``config.json``, ``diffusion_pytorch_model.{safetensors,bin}``, ``scheduler_config.json`` side by
side), including the attention key names of diffusers < 0.15 (``query``, ``key``, ``value``,
``proj_attn``). The scheduler's class says the formulation: a beta-schedule scheduler is ddpm,
the EDM ones edm, ``FlowMatchEulerDiscreteScheduler`` flow; any other is refused.

Refused on export, with the reason: flow x0-prediction (diffusers' flow schedulers step with the
output as the velocity), class-conditional models, and consistency models (their own sampler).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .checkpoint import load_checkpoint, load_state_checked, load_torch_file, save_ema_weights
from .config import Config, from_dict
from .consistency import KARRAS_RHO
from .errors import CheckpointError
from .files import atomic_write, write_text_atomic
from .formulations import FLOW_TIME_SCALE
from .samplers import option_defaults
from .schedule import cosine_betas, linear_betas, make_betas, sigmoid_betas
from .unet import build_unet

DIFFUSERS_VERSION = "0.27.0"  # written as _diffusers_version; tested with diffusers 0.42
FLOW_DIFFUSERS_VERSION = "0.29.0"  # the first with FlowMatchEulerDiscreteScheduler
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
PREDICTION_FROM_DIFFUSERS = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}
VAR_TYPE_FROM_DIFFUSERS = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                           "fixed_large": "fixed_large", "fixed_large_log": "fixed_large"}
# model_index.json's pipeline per formulation: one whose loop applies its scheduler (docstring).
PIPELINE_OF = {"ddpm": "DDPMPipeline", "edm": "ConsistencyModelPipeline", "flow": "DDPMPipeline"}
# Schedulers read on import: beta schedules (ddpm; diffusers' KarrasDiffusionSchedulers less
# EDMEulerScheduler), EDM's preconditioning (edm) and flow matching's Euler (flow).
BETA_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                   "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                   "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                   "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                   "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler",
                   "UniPCMultistepScheduler", "DPMSolverSDEScheduler")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
EDM_SPACING_FROM_DIFFUSERS = {"karras": "karras", "exponential": "logsnr"}
IMPORTED_STEPS = 50  # sample.steps of an imported edm or flow model (ddpm: 100)
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
RESBLOCK_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
                  "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"}

# (our module, diffusers module, kind): kind "same" copies weight and bias, "linear" is a 1x1
# conv of ours = a linear layer of theirs, "qkv" is our fused qkv = their to_q, to_k, to_v.
Pair = tuple[str, str, str]


# --------------------------------------------------------------------------- parameter names


def _resblock(ours: str, theirs: str) -> list[Pair]:
    return [(f"{ours}.{a}", f"{theirs}.{b}", "same") for a, b in RESBLOCK_NAMES.items()]


def _attnblock(ours: str, theirs: str) -> list[Pair]:
    return [(f"{ours}.norm", f"{theirs}.group_norm", "same"), (f"{ours}.qkv", theirs, "qkv"),
            (f"{ours}.proj_out", f"{theirs}.to_out.0", "linear")]


def module_pairs(cfg: Config) -> list[Pair]:
    """Every parameterised module of our UNet for ``cfg`` with its diffusers counterpart, in the
    order of ``UNet.__init__`` (down path level by level, middle, up path)."""
    m = cfg.model
    levels, blocks = len(m.channel_mult), m.num_res_blocks

    def attn(level: int) -> bool:
        return cfg.data.image_size // 2**level in m.attn_resolutions

    pairs: list[Pair] = [("conv_in", "conv_in", "same"),
                         ("temb.0", "time_embedding.linear_1", "same"),
                         ("temb.2", "time_embedding.linear_2", "same")]
    k = 0
    for level in range(levels):
        for j in range(blocks):
            pairs += _resblock(f"down.{k}.0", f"down_blocks.{level}.resnets.{j}")
            if attn(level):
                pairs += _attnblock(f"down.{k}.1", f"down_blocks.{level}.attentions.{j}")
            k += 1
        if level != levels - 1:
            pairs.append((f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "same"))
            k += 1
    pairs += _resblock("mid.0", "mid_block.resnets.0") + \
        _attnblock("mid.1", "mid_block.attentions.0") + _resblock("mid.2", "mid_block.resnets.1")
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            pairs += _resblock(f"up.{k}.0", f"up_blocks.{i}.resnets.{j}")
            if attn(level):
                pairs += _attnblock(f"up.{k}.1", f"up_blocks.{i}.attentions.{j}")
            if level != 0 and j == blocks:
                pairs.append((f"up.{k}.{2 if attn(level) else 1}.conv",
                              f"up_blocks.{i}.upsamplers.0.conv", "same"))
            k += 1
    return pairs + [("norm_out", "conv_norm_out", "same"), ("conv_out", "conv_out", "same")]


def state_to_diffusers(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """Our UNet state dict -> a ``UNet2DModel`` state dict (same tensors, renamed/reshaped)."""
    out: dict[str, Tensor] = {}
    for ours, theirs, kind in module_pairs(cfg):
        for suffix in ("weight", "bias"):
            key = f"{ours}.{suffix}"
            if key not in state:  # a ResBlock without a 1x1 skip convolution
                continue
            value = state[key]
            if kind == "qkv":  # [3C, C, 1, 1] -> three [C, C] (bias: [3C] -> three [C])
                for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3), strict=True):
                    out[f"{theirs}.{name}.{suffix}"] = part.flatten(1) if part.ndim > 1 else part
            elif kind == "linear":  # [C, C, 1, 1] -> [C, C]
                out[f"{theirs}.{suffix}"] = value.flatten(1) if value.ndim > 1 else value
            else:
                out[f"{theirs}.{suffix}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def state_from_diffusers(theirs: dict[str, Tensor], cfg: Config, source: str) -> dict[str, Tensor]:
    """A ``UNet2DModel`` state dict -> ours. Keys of theirs left over mean a layout we cannot
    express and raise a CheckpointError naming them."""
    theirs = {_new_attention_name(k): v for k, v in theirs.items()}
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for ours, prefix, kind in module_pairs(cfg):
        for suffix in ("weight", "bias"):
            if kind == "qkv":
                names = [f"{prefix}.{n}.{suffix}" for n in ("to_q", "to_k", "to_v")]
                if not all(n in theirs for n in names):
                    continue
                value = torch.cat([theirs[n] for n in names])
                out[f"{ours}.{suffix}"] = value[:, :, None, None] if suffix == "weight" else value
            else:
                names = [f"{prefix}.{suffix}"]
                if names[0] not in theirs:
                    continue
                value = theirs[names[0]]
                if kind == "linear" and suffix == "weight":
                    value = value[:, :, None, None]
                out[f"{ours}.{suffix}"] = value
            used.update(names)
    left = sorted(set(theirs) - used)
    if left:
        more = f" (+{len(left) - 5} more)" if len(left) > 5 else ""
        raise CheckpointError(f"'{source}' has weights pixeldiffusion's UNet has no place for: "
                              f"{', '.join(left[:5])}{more}; its layout is not the DDPM one")
    return {k: v.float().contiguous() for k, v in out.items()}


def _new_attention_name(key: str) -> str:
    """diffusers < 0.15 attention names (``...attentions.0.query.weight``) -> current ones."""
    parts = key.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in OLD_ATTENTION_NAMES:
        return ".".join([*parts[:-2], OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key


# --------------------------------------------------------------------------- configs


def _attention_head_dim(cfg: Config) -> int | None:
    """diffusers' ``attention_head_dim`` for our ``num_heads``: it fixes the head width, so every
    attention layer (attn levels and the middle) must have the same channels per head."""
    m = cfg.model
    if m.num_heads == 1:
        return None  # diffusers: one head of all channels
    levels = [level for level in range(len(m.channel_mult))
              if cfg.data.image_size // 2**level in m.attn_resolutions]
    widths = {m.channels * m.channel_mult[level] for level in [*levels, len(m.channel_mult) - 1]}
    if len(widths) != 1:
        raise CheckpointError(f"model.num_heads {m.num_heads} at attention widths {sorted(widths)} "
                              "gives heads of different sizes, which diffusers' UNet2DModel "
                              "(one attention_head_dim) cannot express; use num_heads 1")
    return widths.pop() // m.num_heads


def unet_config(cfg: Config) -> dict[str, Any]:
    """The ``UNet2DModel`` config.json of our model config."""
    m, levels = cfg.model, range(len(cfg.model.channel_mult))
    if m.num_classes:
        raise CheckpointError("a class-conditional model cannot be exported: "
                              "diffusers.DDPMPipeline samples unconditionally; export an "
                              "unconditional model (model.num_classes 0)")
    attn = [cfg.data.image_size // 2**level in m.attn_resolutions for level in levels]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.data.image_size, "in_channels": cfg.data.channels,
        "out_channels": cfg.data.channels, "center_input_sample": False,
        "time_embedding_type": "positional", "flip_sin_to_cos": m.flip_sin_to_cos,
        "freq_shift": m.freq_shift,
        "down_block_types": [DOWN_TYPES[a] for a in attn],
        "up_block_types": [UP_TYPES[a] for a in reversed(attn)],
        "block_out_channels": [m.channels * mult for mult in m.channel_mult],
        "layers_per_block": m.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": m.downsample_padding, "downsample_type": "conv",
        "upsample_type": "conv", "dropout": m.dropout, "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(cfg), "norm_num_groups": m.norm_groups,
        "attn_norm_num_groups": None, "norm_eps": m.norm_eps,
        "resnet_time_scale_shift": "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None,
    }


def check_exportable_formulation(cfg: Config) -> None:
    """Refuse what no exported folder would sample as we do: a consistency model (its own
    multistep sampler, not a diffusion scheduler's) and a flow x0-prediction model (diffusers'
    ``FlowMatchEulerDiscreteScheduler`` takes the network's output as the velocity and has no
    other prediction type)."""
    d = cfg.diffusion
    if cfg.consistency.method != "none":
        raise CheckpointError(f"a consistency model (consistency.method {cfg.consistency.method}) "
                              "cannot be exported: a diffusers scheduler would sample it as a "
                              "diffusion model; sample it with pixeldiffusion sample, or export "
                              "its teacher")
    if d.formulation == "flow" and d.prediction != "v":
        raise CheckpointError(f"a diffusion.formulation flow checkpoint with diffusion.prediction "
                              f"{d.prediction} cannot be exported: diffusers' "
                              "FlowMatchEulerDiscreteScheduler steps with the network's output "
                              "as the velocity v = eps - x0 and has no x0-prediction; flow "
                              "models with prediction v (and every ddpm or edm model) export, "
                              "sample this one with pixeldiffusion sample")


def _ddpm_scheduler(cfg: Config) -> dict[str, Any]:
    """``DDPMScheduler``: our sigmoid schedule has no diffusers name (theirs is GeoDiff's) and
    goes as ``trained_betas``. Its ``timestep_spacing`` is "trailing", our default "uniform"
    spacing, so the exported ``DDPMPipeline`` with the same seed and number of steps draws our
    ``ddpm`` samples."""
    d = cfg.diffusion
    names = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
    trained = None
    if d.beta_schedule not in names:
        trained = make_betas(d.beta_schedule, d.timesteps, d.beta_start, d.beta_end).tolist()
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": d.timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
        "beta_schedule": names.get(d.beta_schedule, "linear"), "trained_betas": trained,
        "variance_type": cfg.sample.var_type or option_defaults("ddpm")["var_type"],
        "clip_sample": cfg.sample.clip_x0,
        "clip_sample_range": 1.0, "prediction_type": PREDICTION_TO_DIFFUSERS[d.prediction],
        "thresholding": False, "timestep_spacing": "trailing", "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def _edm_scheduler(cfg: Config) -> dict[str, Any]:
    """``EDMEulerScheduler``: its c_in, c_noise = 0.25 ln(sigma), c_skip and c_out (prediction
    type "epsilon": c_out = +sigma sd / sqrt(sigma^2 + sd^2)) are ``formulations.edm_scalings``;
    its karras sigmas (rho 7, then 0) are our ``karras`` spacing between sigma_min and
    sigma_max, so its Euler steps are our ``euler`` sampler's."""
    d = cfg.diffusion
    return {
        "_class_name": "EDMEulerScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "sigma_min": d.sigma_min, "sigma_max": d.sigma_max, "sigma_data": d.sigma_data,
        "sigma_schedule": "karras", "num_train_timesteps": d.timesteps,
        "prediction_type": "epsilon", "rho": KARRAS_RHO, "final_sigmas_type": "zero",
    }


def _flow_scheduler(cfg: Config) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler``: its sigma is our flow time t (x_t = (1 - sigma) x0 +
    sigma eps), the network gets timestep sigma * num_train_timesteps = our c_noise 1000 t, its
    step x + (sigma_next - sigma) v is Euler on v = eps - x0, and its ``shift`` is
    ``formulations.shift_t``."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": FLOW_DIFFUSERS_VERSION,
        "num_train_timesteps": int(FLOW_TIME_SCALE), "shift": cfg.diffusion.shift,
        "use_dynamic_shifting": False, "invert_sigmas": False, "stochastic_sampling": False,
    }


_SCHEDULER_CONFIGS = {"ddpm": _ddpm_scheduler, "edm": _edm_scheduler, "flow": _flow_scheduler}


def scheduler_config(cfg: Config) -> dict[str, Any]:
    """The scheduler_config.json of our diffusion and sample config: the diffusers scheduler
    that calls the network as ``diffusion.formulation`` does (module docstring)."""
    check_exportable_formulation(cfg)
    return _SCHEDULER_CONFIGS[cfg.diffusion.formulation](cfg)


def _unsupported(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"'{source}': {what}, which pixeldiffusion's UNet cannot express; "
                           "only the DDPM layout (DownBlock2D/AttnDownBlock2D, UNetMidBlock2D, "
                           "UpBlock2D/AttnUpBlock2D) converts")


def model_config_from(unet: dict[str, Any], source: str) -> dict[str, Any]:
    """Our ``data`` + ``model`` config sections for a ``UNet2DModel`` config.json, or a
    CheckpointError naming the block type or key that has no counterpart here."""
    def get(key: str, default: Any) -> Any:
        value = unet.get(key, default)
        return default if value is None else value

    name = unet.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise _unsupported(source, f"the model is a {name}, not a UNet2DModel")
    down = list(get("down_block_types", ()))
    up = list(get("up_block_types", ()))
    widths = [int(w) for w in get("block_out_channels", ())]
    for kind, types, allowed in (("down", down, DOWN_TYPES), ("up", up, UP_TYPES)):
        for level, block in enumerate(types):
            if block not in allowed:
                raise _unsupported(source, f"{kind} block {level} is a {block}")
    if not down or len(down) != len(up) or len(widths) != len(down):
        raise _unsupported(source, f"down_block_types {down}, up_block_types {up} and "
                                   f"block_out_channels {widths} do not line up")
    attn = [block == "AttnDownBlock2D" for block in down]
    if [block == "AttnUpBlock2D" for block in reversed(up)] != attn:
        raise _unsupported(source, f"attention sits at different levels going down ({down}) "
                                   f"and up ({up})")
    mid = unet.get("mid_block_type", "UNetMidBlock2D")
    if mid != "UNetMidBlock2D" or not get("add_attention", True):
        raise _unsupported(source, f"the middle block is a {mid} "
                                   f"{'with' if get('add_attention', True) else 'without'} "
                                   "attention")
    checks = {"time_embedding_type": "positional", "act_fn": "silu",
              "center_input_sample": False, "resnet_time_scale_shift": "default",
              "downsample_type": "conv", "upsample_type": "conv", "mid_block_scale_factor": 1,
              "class_embed_type": None, "num_class_embeds": None}
    for key, expected in checks.items():
        if unet.get(key, expected) != expected:
            raise _unsupported(source, f"{key} is {unet[key]!r} (we need {expected!r})")
    groups = int(get("norm_num_groups", 32))
    if get("attn_norm_num_groups", groups) != groups:
        raise _unsupported(source, f"attn_norm_num_groups {unet['attn_norm_num_groups']} differs "
                                   f"from norm_num_groups {groups}")
    if get("time_embedding_dim", 4 * widths[0]) != 4 * widths[0]:
        raise _unsupported(source, f"time_embedding_dim is {unet['time_embedding_dim']}, "
                                   f"not 4 x {widths[0]}")
    channels, size = int(get("in_channels", 3)), get("sample_size", None)
    if channels not in (1, 3) or get("out_channels", channels) != channels:
        raise _unsupported(source, f"in_channels {channels} / out_channels "
                                   f"{unet.get('out_channels')} (we need 1 or 3, equal; a "
                                   "learned variance doubles out_channels)")
    if not isinstance(size, int):
        raise _unsupported(source, f"sample_size is {size!r} (we need one integer side)")
    if any(w % widths[0] for w in widths):
        raise _unsupported(source, f"block_out_channels {widths} are not multiples of the "
                                   f"first, {widths[0]}")
    head_dim = unet.get("attention_head_dim", 8)  # diffusers' default when absent
    attn_widths = {w for w, a in zip(widths, attn, strict=True) if a} | {widths[-1]}
    heads = {1 if head_dim is None else w // int(head_dim) for w in attn_widths}
    if len(heads) != 1 or (head_dim is not None and any(w % int(head_dim) for w in attn_widths)):
        raise _unsupported(source, f"attention_head_dim {head_dim} gives a different number of "
                                   f"heads at widths {sorted(attn_widths)}")
    return {
        "data": {"dataset": "folder", "image_size": size, "channels": channels},
        "model": {"channels": widths[0], "channel_mult": [w // widths[0] for w in widths],
                  "num_res_blocks": int(get("layers_per_block", 2)),
                  "attn_resolutions": [size // 2**level for level, a in enumerate(attn) if a],
                  "dropout": float(get("dropout", 0.0)), "num_heads": heads.pop(),
                  "norm_groups": groups, "num_classes": 0,
                  "flip_sin_to_cos": bool(get("flip_sin_to_cos", True)),
                  "freq_shift": float(get("freq_shift", 0)),
                  "norm_eps": float(get("norm_eps", 1e-5)),
                  "downsample_padding": int(get("downsample_padding", 1))},
    }


def _diffusers_betas(sched: dict[str, Any], source: str) -> Tensor:
    """beta_t as diffusers' DDPMScheduler computes it (float32 where it does), as float64."""
    T = int(sched.get("num_train_timesteps", 1000))
    start, end = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02))
    name = sched.get("beta_schedule", "linear")
    if sched.get("trained_betas") is not None:
        return torch.tensor(sched["trained_betas"], dtype=torch.float32).double()
    if name == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32).double()
    if name == "scaled_linear":
        return (torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2).double()
    if name == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float64)
    raise CheckpointError(f"'{source}': scheduler beta_schedule '{name}' is not supported; "
                          "use linear, squaredcos_cap_v2 or trained_betas")


def diffusion_config_from(sched: dict[str, Any], source: str) -> dict[str, Any]:
    """Our ``diffusion`` + ``sample`` sections for a scheduler_config.json. Its ``_class_name``
    (absent: ``DDPMScheduler``) gives the formulation: ``BETA_SCHEDULERS`` ddpm,
    ``EDM_SCHEDULERS`` edm, ``FLOW_SCHEDULERS`` flow; any other is refused, so an EDM or flow
    folder is never read as a DDPM one."""
    name = sched.get("_class_name", "DDPMScheduler")
    if name in EDM_SCHEDULERS:
        return _edm_config_from(sched, source)
    if name in FLOW_SCHEDULERS:
        return _flow_config_from(sched, source)
    if name not in BETA_SCHEDULERS:
        raise CheckpointError(f"'{source}': scheduler {name} is not one pixeldiffusion reads; a "
                              f"DDPM-family scheduler (e.g. DDPMScheduler, DDIMScheduler), "
                              f"{' or '.join(EDM_SCHEDULERS)} (edm) or "
                              f"{' or '.join(FLOW_SCHEDULERS)} (flow) converts")
    return _ddpm_config_from(sched, source)


def _edm_config_from(sched: dict[str, Any], source: str) -> dict[str, Any]:
    """An EDM scheduler's config: prediction type "epsilon" (EDM's c_out > 0, our network),
    sigma_min / sigma_max / sigma_data; sampled with our ``euler`` on its sigma schedule."""
    prediction = sched.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(f"'{source}': EDM prediction_type '{prediction}' is not supported; "
                              "pixeldiffusion's EDM network is diffusers' prediction_type "
                              "epsilon (c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2))")
    schedule = sched.get("sigma_schedule", "karras")
    if schedule not in EDM_SPACING_FROM_DIFFUSERS:
        raise CheckpointError(f"'{source}': sigma_schedule '{schedule}' is not supported; use "
                              "karras or exponential")
    T = int(sched.get("num_train_timesteps", 1000))
    return {"diffusion": {"formulation": "edm", "timesteps": T,
                          "sigma_min": float(sched.get("sigma_min", 0.002)),
                          "sigma_max": float(sched.get("sigma_max", 80.0)),
                          "sigma_data": float(sched.get("sigma_data", 0.5))},
            "sample": {"sampler": "euler", "spacing": EDM_SPACING_FROM_DIFFUSERS[schedule],
                       "steps": min(IMPORTED_STEPS, T), "clip_x0": False}}


def _flow_config_from(sched: dict[str, Any], source: str) -> dict[str, Any]:
    """A ``FlowMatchEulerDiscreteScheduler`` config: v-prediction, the network's timestep 1000 t
    (num_train_timesteps 1000), a fixed ``shift``; sampled with our ``euler``, uniform in flow
    time. Its sampling-only options (karras / exponential / beta sigmas, shift_terminal,
    stochastic_sampling) have no say in what the network is."""
    T = int(sched.get("num_train_timesteps", 1000))
    if T != FLOW_TIME_SCALE:
        raise CheckpointError(f"'{source}': num_train_timesteps {T} gives the network timesteps "
                              f"{T} t; pixeldiffusion's flow networks take {FLOW_TIME_SCALE:g} t "
                              f"(num_train_timesteps {FLOW_TIME_SCALE:g})")
    for key in ("use_dynamic_shifting", "invert_sigmas"):
        if sched.get(key):
            raise CheckpointError(f"'{source}': scheduler option {key} is not supported; "
                                  "set it to false in scheduler_config.json")
    return {"diffusion": {"formulation": "flow", "prediction": "v", "timesteps": T,
                          "shift": float(sched.get("shift", 1.0))},
            "sample": {"sampler": "euler", "spacing": "uniform", "steps": IMPORTED_STEPS,
                       "clip_x0": False}}


def _ddpm_config_from(sched: dict[str, Any], source: str) -> dict[str, Any]:
    """A beta-schedule scheduler's config: the betas must equal one of our schedules (linear,
    cosine, sigmoid) to float32 precision."""
    if sched.get("rescale_betas_zero_snr") or sched.get("thresholding"):
        key = "rescale_betas_zero_snr" if sched.get("rescale_betas_zero_snr") else "thresholding"
        raise CheckpointError(f"'{source}': scheduler option {key} is not supported; "
                              "set it to false in scheduler_config.json")
    betas = _diffusers_betas(sched, source)
    T = len(betas)
    start, end = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02))
    ours = {"linear": linear_betas(T, start, end), "cosine": cosine_betas(T),
            "sigmoid": sigmoid_betas(T)}
    match = [name for name, b in ours.items() if torch.allclose(b, betas, rtol=1e-5, atol=1e-8)]
    if not match:
        raise CheckpointError(f"'{source}': the scheduler's betas (beta_schedule "
                              f"'{sched.get('beta_schedule', 'linear')}') match none of "
                              "pixeldiffusion's linear, cosine (squaredcos_cap_v2) or sigmoid "
                              "schedules")
    prediction = sched.get("prediction_type", "epsilon")
    variance = sched.get("variance_type", "fixed_small")
    if prediction not in PREDICTION_FROM_DIFFUSERS:
        raise CheckpointError(f"'{source}': prediction_type '{prediction}' is not supported; "
                              "use epsilon, sample or v_prediction")
    if variance not in VAR_TYPE_FROM_DIFFUSERS:
        raise CheckpointError(f"'{source}': variance_type '{variance}' (a learned variance) is "
                              "not supported; use fixed_small or fixed_large")
    clip = bool(sched.get("clip_sample", True))
    if clip and float(sched.get("clip_sample_range", 1.0)) != 1.0:
        raise CheckpointError(f"'{source}': clip_sample_range {sched['clip_sample_range']} is "
                              "not supported; pixeldiffusion clips x0 to [-1, 1]")
    return {"diffusion": {"timesteps": T, "beta_schedule": match[0], "beta_start": start,
                          "beta_end": end, "prediction": PREDICTION_FROM_DIFFUSERS[prediction]},
            "sample": {"var_type": VAR_TYPE_FROM_DIFFUSERS[variance], "clip_x0": clip,
                       "steps": min(100, T)}}


# --------------------------------------------------------------------------- files


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def to_diffusers(checkpoint: str | Path, out_dir: str | Path, *, use_ema: bool = True) -> Path:
    """Write a diffusers folder for a checkpoint (file, checkpoint or run dir): the
    ``UNet2DModel`` and the scheduler of its formulation, under the pipeline that runs them
    (``PIPELINE_OF``; the module docstring has the loop). Nothing is written
    for a model no folder samples as we do (``check_exportable_formulation``)."""
    loaded = load_checkpoint(checkpoint, use_ema=use_ema)
    cfg, out_dir = loaded.config, Path(out_dir)
    check_exportable_formulation(cfg)  # before anything is written
    unet = unet_config(cfg)
    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    weights = state_to_diffusers(state, cfg)
    scheduler = scheduler_config(cfg)
    _write_json(out_dir / "model_index.json",
                {"_class_name": PIPELINE_OF[cfg.diffusion.formulation],
                 "_diffusers_version": scheduler["_diffusers_version"],
                 "scheduler": ["diffusers", scheduler["_class_name"]],
                 "unet": ["diffusers", "UNet2DModel"]})
    _write_json(out_dir / "unet" / "config.json", unet)
    _write_json(out_dir / "scheduler" / "scheduler_config.json", scheduler)
    with atomic_write(out_dir / "unet" / UNET_WEIGHTS) as tmp:
        save_file(weights, tmp, metadata={"format": "pt"})
    return out_dir


def _find(folder: Path, sub: str, names: tuple[str, ...]) -> Path | None:
    for base in (folder / sub, folder):
        for name in names:
            if (base / name).is_file():
                return base / name
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"'{path}' is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' should hold a JSON object")
    return data


def _read_unet_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix != ".safetensors":
        return load_torch_file(path)  # size-checked first, never unpickles code
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors and torch raise many types for broken files
        raise CheckpointError(f"'{path}' could not be read ({type(err).__name__}); it may be "
                              "truncated or a Git LFS pointer") from None


def from_diffusers(src_dir: str | Path, out_path: str | Path) -> Path:
    """Convert a diffusers ``UNet2DModel`` + scheduler folder into one pixeldiffusion
    ``.safetensors`` file that ``load_checkpoint`` and ``pixeldiffusion sample`` accept. The
    scheduler's class gives the formulation (``diffusion_config_from``). The weights are stored
    as ``ema.*`` (a published model is one set of weights)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise CheckpointError(f"'{src}' is not a folder; pass a diffusers model folder (with "
                              "unet/ and scheduler/, or config.json and scheduler_config.json)")
    config_path = _find(src, "unet", ("config.json",))
    weights_path = _find(src, "unet", (UNET_WEIGHTS, "diffusion_pytorch_model.bin"))
    sched_path = _find(src, "scheduler", ("scheduler_config.json",))
    for path, what in ((config_path, "config.json"), (weights_path, UNET_WEIGHTS),
                       (sched_path, "scheduler_config.json")):
        if path is None:
            raise CheckpointError(f"'{src}' has no {what} (looked in {src / 'unet'} or "
                                  f"{src / 'scheduler'} and in {src}); download the whole "
                                  "diffusers folder")
    raw = model_config_from(_read_json(config_path), str(config_path))
    raw |= diffusion_config_from(_read_json(sched_path), str(sched_path))
    cfg = from_dict(raw)
    state = state_from_diffusers(_read_unet_weights(weights_path), cfg, str(weights_path))
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    load_state_checked(model, state, str(weights_path))  # every parameter present, right shapes
    return save_ema_weights(out_path, state, cfg, 0,
                            note=f"ema.* = the weights of the diffusers folder {src.resolve()}")
