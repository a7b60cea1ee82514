"""Classifier-free guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024): label
dropout for training, guided models for sampling, and the class labels a user asks for.

Convention (Ho & Salimans 2022, eq. 6, written with w = 1 + their w):

    eps_guided = eps_uncond + w (eps_cond - eps_uncond)

so w = 0 is the unconditional model, w = 1 the plain conditional model and w > 1 pushes samples
towards their class (fewer, cleaner modes). The null label ("no class") is index
``model.null_class`` = ``num_classes``; training replaces labels by it with probability
``train.p_uncond`` so that the same network learns both eps_cond and eps_uncond.

Guidance wraps the *model*, not the sampler: ``guided_model(model, labels, w)`` is again a
``model(x_t, t) -> eps | x0 | v`` callable, so every sampler in ``samplers.py`` gets it for free.
The conditional and unconditional outputs come from ONE batched forward pass (inputs stacked
along the batch axis). Because x0, eps and v are affine in the network output for a fixed x_t
and t (``diffusion.x0_eps_from_output``), combining raw outputs with the formula above gives
exactly eps_guided for eps-, x0- and v-prediction models alike.

Autoguidance (``autoguided_model``) guides a model with a worse version of itself instead of
its unconditional half: D_w = D_bad + w (D_good - D_bad), for unconditional models too. On a
class-conditional model it can add a little classifier-free guidance on top
(``sample.autoguidance_cfg``): autoguidance improves the images while keeping their spread, the
classifier-free term pushes them towards their class (docs/guidance.md measures the pair).
``guided_network`` picks the wrapper a sampling command needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .config import Config
from .errors import PixelDiffusionError, did_you_mean
from .schedule import alphas_cumprod_at, alphas_cumprod_of, sigma_of

Model = Callable[..., Tensor]
CLASS_KEYWORDS = ("all", "random")


def drop_labels(y: Tensor, p_uncond: float, null_class: int,
                generator: torch.Generator | None = None) -> Tensor:
    """Replace each label of y (int64 [B]) by ``null_class`` with probability ``p_uncond``
    (Ho & Salimans 2022, Alg. 1: "c <- null with probability p_uncond"). Returns a new tensor;
    the coin flips are drawn from ``generator`` (on its device)."""
    if p_uncond <= 0:
        return y
    device = generator.device if generator is not None else y.device
    drop = torch.rand(y.shape, generator=generator, device=device).lt(p_uncond).to(y.device)
    return torch.where(drop, torch.full_like(y, null_class), y)


def guided_model(model: Model, labels: Tensor, guidance: float = 1.0, *,
                 alphas_cumprod: Tensor | None = None, interval: Sequence[float] = (),
                 null_class: int | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """``model(x_t, t, y)`` with fixed class ``labels`` and guidance weight w, as a plain
    ``model(x_t, t) -> output`` for any sampler.

    model: a class-conditional network called as ``model(x_t, t, y=labels)`` (the UNet, or a
        wrapper of it); its output (eps, x0 or v) keeps the model's parameterisation.
    labels: int64 [N] in [0, num_classes - 1], one per sample of the x_t the sampler passes.
    guidance: w in output = out_uncond + w (out_cond - out_uncond); w = 1 calls only the
        conditional model, w = 0 only the unconditional one (one forward pass of N either way);
        otherwise one forward pass of 2N (cond and uncond stacked).
    interval: optional (sigma_lo, sigma_hi): guide only at steps with sigma_lo < sigma <= sigma_hi
        and use the plain conditional model elsewhere (Kynkäänniemi et al. 2024, "Applying
        guidance in a limited interval", eq. 2); sigma is EDM's (``schedule.sigma_of``) and needs
        ``alphas_cumprod`` (float [T]) to turn timesteps into sigma. Empty: guide at every step.
    null_class: the label meaning "no class" (num_classes); default ``model.null_class``.
    """
    if null_class is None:
        null_class = int(model.null_class)  # type: ignore[attr-defined]
    guided_at = _in_interval(alphas_cumprod, interval)

    def forward(x_t: Tensor, t: Tensor) -> Tensor:
        y = labels.to(x_t.device)
        w = guidance if guided_at(t) else 1.0
        if w == 1.0:
            return model(x_t, t, y=y)
        null = torch.full_like(y, null_class)
        if w == 0.0:
            return model(x_t, t, y=null)
        # one batched pass: [x_t; x_t] with [y; null]
        out_cond, out_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     y=torch.cat([y, null])).chunk(2)
        return out_uncond + w * (out_cond - out_uncond)  # Ho & Salimans 2022, eq. 6
    return forward


def _in_interval(alphas_cumprod: Tensor | None,
                 interval: Sequence[float]) -> Callable[[Tensor], bool]:
    """t -> whether to guide at timestep t: where sigma_lo < sigma(t) <= sigma_hi (Kynkäänniemi
    et al. 2024, eq. 2; EDM's sigma from ``alphas_cumprod``); everywhere when ``interval`` is
    empty. Outside it the plain model samples."""
    if not interval:
        return lambda t: True
    if alphas_cumprod is None:
        raise ValueError("a guidance interval needs alphas_cumprod to map timesteps to sigma")
    sigma_lo, sigma_hi = float(interval[0]), float(interval[1])
    abar = alphas_cumprod.detach().double().cpu()

    def guided_at(t: Tensor) -> bool:
        sigma = sigma_of(alphas_cumprod_at(abar, float(t.reshape(-1)[0])))
        return sigma_lo < sigma <= sigma_hi
    return guided_at


def autoguided_model(model: Model, guide: Model, guidance: float, *,
                     labels: Tensor | None = None, alphas_cumprod: Tensor | None = None,
                     interval: Sequence[float] = (), cfg: float = 1.0,
                     null_class: int | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
    Itself", eq. 1 with the bad model as D_0): ``model`` guided by ``guide``, a worse version of
    it (an earlier checkpoint, a shorter EMA, a smaller network) of the same data and
    formulation, as a plain ``model(x_t, t) -> output`` for any sampler:

        D_w(x; sigma) = D_bad(x; sigma) + w (D_good(x; sigma) - D_bad(x; sigma))

    model, guide: networks called as ``net(x_t, t)`` or, with ``labels``, ``net(x_t, t, y=labels)``
        (both get the label); they must share the output's parameterisation (eps, x0 or v) and
        the noise schedule, so that combining raw outputs is exactly combining denoisers (see
        the module docstring). Works for unconditional models (``labels`` None).
    guidance: w; 1 = ``model`` alone (one call), 0 = ``guide`` alone; otherwise both are called
        (two forward passes of N: two networks cannot share a batch).
    interval: optional (sigma_lo, sigma_hi) as in ``guided_model``: guide only there, plain
        ``model`` elsewhere; needs ``alphas_cumprod``.
    cfg: with ``labels``, a classifier-free guidance weight w_cfg added on top (``model``'s own
        null-label half, ``null_class`` default ``model.null_class``; the two terms add up):

            D = D_good + (w - 1) (D_good - D_bad) + (w_cfg - 1) (D_good - D_good,uncond)

        1 (the default) is autoguidance alone; otherwise ``model`` makes one batched pass of
        2N (class and null labels, as ``guided_model``) and ``guide`` one of N.
    """
    guided_at = _in_interval(alphas_cumprod, interval)
    if cfg != 1.0 and labels is None:
        raise ValueError("classifier-free guidance on top of autoguidance needs class labels")

    def forward(x_t: Tensor, t: Tensor) -> Tensor:
        extra = {} if labels is None else {"y": labels.to(x_t.device)}
        w, w_cfg = (guidance, cfg) if guided_at(t) else (1.0, 1.0)
        if w_cfg != 1.0:
            return _autoguided_with_cfg(model, guide, x_t, t, extra["y"], w, w_cfg, null_class)
        if w == 1.0:
            return model(x_t, t, **extra)
        if w == 0.0:
            return guide(x_t, t, **extra)
        out_bad = guide(x_t, t, **extra)
        return out_bad + w * (model(x_t, t, **extra) - out_bad)  # Karras et al. 2024, eq. 1
    return forward


def _autoguided_with_cfg(model: Model, guide: Model, x_t: Tensor, t: Tensor, y: Tensor, w: float,
                         w_cfg: float, null_class: int | None) -> Tensor:
    """D_good + (w - 1)(D_good - D_bad) + (w_cfg - 1)(D_good - D_uncond) at (x_t, t) for labels
    y [N] (``autoguided_model``'s cfg); the guide is not called where w = 1."""
    if null_class is None:
        null_class = int(model.null_class)  # type: ignore[attr-defined]
    null = torch.full_like(y, null_class)
    out_good, out_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                 y=torch.cat([y, null])).chunk(2)
    out = out_good + (w_cfg - 1) * (out_good - out_uncond)  # Ho & Salimans 2022, eq. 6
    if w == 1.0:
        return out
    return out + (w - 1) * (out_good - guide(x_t, t, y=y))  # Karras et al. 2024, eq. 1


def guided_network(model: Model, labels: Tensor | None, guidance: float, *,
                   guide: Model | None = None, alphas_cumprod: Tensor | None = None,
                   interval: Sequence[float] = (), null_class: int | None = None,
                   autoguidance_cfg: float = 1.0) -> Callable[..., Tensor]:
    """The network a sampler is given for a choice of guidance: ``autoguided_model`` when a
    ``guide`` network is given (with ``autoguidance_cfg`` as its cfg), ``guided_model``
    (classifier-free) for class ``labels``, else ``model`` itself."""
    if guide is not None:
        return autoguided_model(model, guide, guidance, labels=labels,
                                alphas_cumprod=alphas_cumprod, interval=interval,
                                cfg=autoguidance_cfg, null_class=null_class)
    if labels is None:
        return model
    return guided_model(model, labels, guidance, alphas_cumprod=alphas_cumprod,
                        interval=interval, null_class=null_class)


def check_guidance_model(cfg: Config, guide_cfg: Config, source: str) -> None:
    """A PixelDiffusionError unless the guidance model of ``guide_cfg`` (from ``source``) can
    guide the model of ``cfg``: same image shape, formulation, prediction target, noise table
    and class count (its size, training length and EMA may differ: that is the point)."""
    d, g = cfg.data, guide_cfg.data
    if (d.channels, d.image_size) != (g.channels, g.image_size):
        raise PixelDiffusionError(
            f"guidance model '{source}' makes {g.channels}x{g.image_size}x{g.image_size} images "
            f"but this model makes {d.channels}x{d.image_size}x{d.image_size}; autoguidance needs "
            f"a worse version of the same model (an earlier checkpoint, a shorter EMA or a "
            f"smaller model trained on the same data)")
    fd, fg = cfg.diffusion, guide_cfg.diffusion
    same_table = torch.equal(alphas_cumprod_of(cfg), alphas_cumprod_of(guide_cfg))
    if (fd.formulation, fd.prediction) != (fg.formulation, fg.prediction) or not same_table:
        raise PixelDiffusionError(
            f"guidance model '{source}' does not share this model's formulation and noise "
            f"schedule (it: {fg.formulation}, predicts {fg.prediction}; this model: "
            f"{fd.formulation}, predicts {fd.prediction}; the diffusion.* keys must match); use "
            f"a checkpoint trained with the same diffusion config")
    if cfg.model.num_classes != guide_cfg.model.num_classes:
        raise PixelDiffusionError(
            f"guidance model '{source}' has {guide_cfg.model.num_classes} classes but this model "
            f"has {cfg.model.num_classes}; autoguidance gives both the same labels, so use a "
            f"checkpoint trained with the same classes")


def load_guidance_model(path: str | Path, cfg: Config, *, device: torch.device | str = "cpu",
                        use_ema: bool = True) -> torch.nn.Module:
    """The network of checkpoint ``path`` (EMA weights unless ``use_ema`` is False), checked by
    ``check_guidance_model`` to guide the model of ``cfg``: pass it to
    ``generate(..., guidance_model=)``."""
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(path, use_ema=use_ema, device=device)
    check_guidance_model(cfg, loaded.config, str(path))
    return loaded.model


def class_names_or_indices(num_classes: int, class_names: Sequence[str]) -> list[str]:
    """The names of labels 0..num_classes-1; their indices as text where no names were saved."""
    return list(class_names) if class_names else [str(k) for k in range(num_classes)]


def _valid(names: list[str]) -> str:
    listed = ", ".join(f"{k} ({name})" if name != str(k) else name for k, name in enumerate(names))
    return f"{listed}, or all / random"


def parse_class(spec: str | int, num_classes: int, class_names: Sequence[str] = ()) -> int | str:
    """A user's class choice -> a label index, or the keyword "all" / "random".

    ``spec`` is "all", "random", a class name (e.g. "cat", or a sub-folder name) or an index.
    Raises a PixelDiffusionError listing the valid classes for anything else, and for any choice
    on an unconditional model (``num_classes`` 0).
    """
    text = str(spec).strip()
    if num_classes == 0:
        raise PixelDiffusionError(f"class '{text}' was requested but this model is unconditional "
                                  f"(model.num_classes 0); drop --class and --guidance, or train "
                                  f"a conditional model (e.g. -c configs/mnist_cond.yaml)")
    names = class_names_or_indices(num_classes, class_names)
    if text in CLASS_KEYWORDS:
        return text
    if text in names:
        return names.index(text)
    try:
        index = int(text)
    except ValueError:
        raise PixelDiffusionError(f"unknown class '{text}'; {did_you_mean(text, names)}valid "
                                  f"classes: {_valid(names)}") from None
    if not 0 <= index < num_classes:
        raise PixelDiffusionError(f"class {index} is out of range: this model has {num_classes} "
                                  f"classes, 0..{num_classes - 1}; valid classes: {_valid(names)}")
    return index


def class_labels(spec: str | int, n: int, num_classes: int, class_names: Sequence[str] = (), *,
                 per_class: int = 8, seed: int = 0) -> Tensor:
    """The int64 labels to sample for a class choice (see ``parse_class``).

    An index or name: ``n`` copies. "random": ``n`` labels uniform over the classes, drawn from
    a CPU generator seeded with ``seed``. "all": ``per_class`` of each class in order, i.e.
    ``num_classes * per_class`` labels, one grid row per class when rows are ``per_class`` wide.
    """
    choice = parse_class(spec, num_classes, class_names)
    if choice == "all":
        return torch.arange(num_classes).repeat_interleave(per_class)
    if choice == "random":
        return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.full((n,), int(choice), dtype=torch.long)


def sampling_labels(cfg: Config, guidance: float | None = None,
                    class_label: str | int | None = None, *,
                    autoguidance: bool = False) -> tuple[Tensor | None, float]:
    """(labels int64 [N] or None, w) for sampling ``cfg``'s model; arguments that are None take
    ``cfg.sample.guidance`` / ``cfg.sample.class_label``.

    Unconditional models (``model.num_classes`` 0) get (None, 1.0), or (None, w) with
    ``autoguidance`` (a guidance model needs no labels); passing them ``guidance`` without it,
    or ``class_label`` (or a config asking for a class or w != 1) is a PixelDiffusionError
    naming the fix.
    """
    s, m = cfg.sample, cfg.model
    w = s.guidance if guidance is None else float(guidance)
    spec = s.class_label if class_label is None else class_label
    if m.num_classes == 0:
        if autoguidance and class_label is None and str(spec) == "random":
            return None, _checked_weight(w)
        if (guidance is not None or w != 1.0) and not autoguidance:
            what = f"--guidance {w:g}"
        elif class_label is not None or str(spec) != "random":
            what = f"--class {spec}"
        else:
            return None, 1.0
        raise PixelDiffusionError(f"{what} needs a class-conditional model, but this one is "
                                  f"unconditional (model.num_classes 0); drop --class and "
                                  f"--guidance, train one with -c configs/mnist_cond.yaml, or "
                                  f"guide it with a worse version of itself (--guidance_model "
                                  f"CKPT, autoguidance)")
    labels = class_labels(spec, s.n_samples, m.num_classes, m.class_names, per_class=s.nrow,
                          seed=s.seed)
    return labels, _checked_weight(w)


def _checked_weight(w: float) -> float:
    if not 0.0 <= w <= 100.0:
        raise PixelDiffusionError(f"guidance weight {w:g} is out of range; use a w in [0, 100] "
                                  f"(0 = unconditional or the guidance model alone, 1 = the "
                                  f"model alone)")
    return w
