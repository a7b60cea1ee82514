"""Scoring samples: images against reference features, sweeps over sampling settings, the
training-time hook, and ``run_eval``, what ``pixeldiffusion eval`` calls.

The pieces live by role:

- ``features.py``: the extractors (offline digit classifier, Inception-v3 via torch-fidelity);
- ``image_sets.py``: images to score, from a samples.npz or a folder;
- ``reference.py``: reference statistics (data set, folder, images or statistics .npz; cached);
- ``metrics.py``: the math (FID, KID, precision/recall, IS);
- ``results.py``: result rows and their provenance, tables, files and the NFE plot;
- here: ``score`` (all metrics of one image set), ``run_sweep`` (sample and score every point
  of a sweep from a checkpoint), ``TrainingEval`` and ``run_eval``.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import metrics
from .errors import DataError, PixelDiffusionError, did_you_mean
from .features import Extractor, digit_extractor, extract_batched, inception_extractor
from .image_sets import Images
from .reference import Reference, reference_features
from .results import COLUMNS, Provenance, Row, check_plot_path, plot_vs_nfe, write_results

# --------------------------------------------------------------------------- scoring


def sample_warnings(n: int, extractor: Extractor, metric: str) -> list[str]:
    """Warnings about a sample count that is too small for a stable or comparable number."""
    need = metrics.min_samples_for_fid(extractor.dim)
    if n < need:
        return [f"{metric} on {n} samples is unstable: the {extractor.dim}-d feature covariance "
                f"needs at least {need} samples to be full rank; use -n {need} or more "
                f"({extractor.papers_samples:,} for numbers comparable to published ones)"]
    if n < extractor.papers_samples:
        return [f"{metric} on {n:,} samples is biased upwards and not comparable with numbers on "
                f"{extractor.papers_samples:,} samples"]
    return []


def _check_comparable(images: Images, reference: Reference) -> None:
    """A DataError unless the images have the reference's channels and resolution (0 = any)."""
    if reference.channels and images.channels != reference.channels:
        raise DataError(f"the images have {images.channels} channel(s) but the reference "
                        f"'{reference.name}' has {reference.channels}; compare like with like "
                        f"(convert the images, or pick a reference with {images.channels})")
    if reference.resolution and images.size != (reference.resolution, reference.resolution):
        raise DataError(f"the images are {images.size[0]}x{images.size[1]} but the reference "
                        f"'{reference.name}' is {reference.resolution}x{reference.resolution}; "
                        f"resize them first (a reference at another resolution is another "
                        f"distribution)")


def _logit_scores(logits: Tensor, extractor: Extractor,
                  labels: Tensor | None) -> dict[str, float]:
    """From class logits [N, K]: IS for Inception; confidence, class entropy and (with labels)
    class accuracy for the digit classifier."""
    if extractor.name != "digits":
        mean, std = metrics.inception_score(logits)
        return {"is": mean, "is_std": std}
    probs = logits.double().softmax(dim=1)
    predicted = probs.argmax(dim=1)
    results = {"confidence": float(probs.max(dim=1).values.mean()),
               "class_entropy": metrics.class_entropy(predicted, probs.shape[1])}
    if labels is not None:
        results["class_accuracy"] = float((predicted == labels).double().mean())
    return results


def _resize_note(images: Images, extractor: Extractor) -> str:
    """How the images were changed before the extractor saw them, for the provenance."""
    size = images.size
    resize = "none" if extractor.input_size in (None, size[0]) and size[0] == size[1] else \
        f"bilinear {size[0]}x{size[1]} -> {extractor.input_size}x{extractor.input_size}"
    if extractor.name == "digits" and images.channels == 3:
        resize += "; RGB -> grey (BT.601)"
    return resize


def score(images: Images, reference: Reference, extractor: Extractor, *,
          kid_subsets: int = 100) -> tuple[dict[str, float], Provenance]:
    """All metrics of ``images`` against ``reference`` with ``extractor``: a dict of numbers
    (``digit_fid`` or ``fid``, ``kid``, ``precision``, ``recall``, and what the logits give)
    and how they were made."""
    _check_comparable(images, reference)
    out = extract_batched(extractor, images.x)
    feats = out.features.numpy()
    n = feats.shape[0]
    metric = "digit-FID" if extractor.name == "digits" else "FID"
    notes = sample_warnings(n, extractor, metric)
    results: dict[str, float] = {}
    if n >= 2:
        fid = metrics.frechet_distance(metrics.gaussian_stats(feats), reference.stats)
        key = "digit_fid" if extractor.name == "digits" else "fid"
        results[key] = fid
        if n >= metrics.min_samples_for_infinity(feats.shape[1]):  # Chong & Forsyth 2020
            results[f"{key}_inf"] = metrics.frechet_distance_infinity(feats, reference.stats)
    else:
        notes.append(f"{metric} needs at least 2 samples; got {n}")
    if reference.features.shape[0] > 3 and n > 3:
        results["kid"], results["kid_std"] = metrics.kid(feats, reference.features,
                                                         subsets=kid_subsets)
        results["precision"], results["recall"] = metrics.precision_recall(
            reference.features, feats, real_radii=reference.radii)
    elif reference.features.shape[0] == 0:
        notes.append("the statistics file holds no features, so KID and precision/recall are "
                     "skipped; save it with --save_stats to keep them")
    if out.logits is not None:
        results.update(_logit_scores(out.logits, extractor, images.labels))
    provenance = Provenance(extractor.description, n, reference.name, reference.n,
                            _resize_note(images, extractor), notes)
    return results, provenance


# --------------------------------------------------------------------------- sweeps


class CountingModel(nn.Module):
    """Wraps a denoising network and counts its calls (the NFE actually spent)."""

    def __init__(self, model: nn.Module, on_call: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.model, self.calls, self.on_call = model, 0, on_call

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        if self.on_call is not None:
            self.on_call()
        return self.model(*args, **kwargs)


class _Zero(nn.Module):
    def forward(self, x: Tensor, t: Tensor, **_: Any) -> Tensor:
        return torch.zeros_like(x)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps whose NFE is at most ``nfe`` (``heun``: (nfe + 1) // 2)."""
    from .samplers import nfe_of

    for steps in range(nfe, 0, -1):
        if nfe_of(sampler, steps) <= nfe:
            return steps
    raise PixelDiffusionError(f"sampler '{sampler}' cannot run on {nfe} model calls")


def _sweep_axis(item: str) -> tuple[str, list[str]]:
    """``"steps=10,20"`` -> ``("steps", ["10", "20"])``; ``sampler=all`` lists every sampler."""
    from .samplers import SAMPLERS

    key, sep, values = item.partition("=")
    key, parts = key.strip(), [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not parts:
        raise PixelDiffusionError(f"--sweep item '{item}' must look like key=v1,v2 "
                                  f"(e.g. sampler=ddim,dpmpp_2m steps=10,20,50)")
    if key == "sampler" and "all" in parts:
        parts = list(dict.fromkeys(name for p in parts
                                   for name in (SAMPLERS if p == "all" else [p])))
    return key, parts


def parse_sweep(items: Sequence[str]) -> list[dict[str, str]]:
    """``["sampler=ddpm,ddim", "steps=10,20"]`` -> the product as dicts of the values' text, in
    order (the last key varies fastest). The text is typed by ``sweep_config``."""
    axes = [_sweep_axis(item) for item in items]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise PixelDiffusionError(f"--sweep names a key twice ({', '.join(keys)}); give each "
                                  f"key once with comma-separated values")
    if "steps" in keys and "nfe" in keys:
        raise PixelDiffusionError("--sweep takes steps= or nfe=, not both")
    return [dict(zip(keys, combo, strict=True)) for combo in
            itertools.product(*(values for _, values in axes))]


# sweep keys that are not sampling options: a model-call budget (steps per sampler), the
# post-hoc EMA length (weights rebuilt from the run's snapshots, ema_snapshots.py) and a
# consistency model's intermediate noise levels (one point's several levels joined by "/")
SWEEP_KEYS = ("nfe", "sigma_rel", "mid_sigmas")


def sweep_config(base: Any, point: dict[str, str]) -> Any:
    """The Config ``base`` with a sweep point's sampling values, each read and checked by the
    config's own rules for ``--sample.KEY value`` (so ``clip_x0=false`` is the bool False and a
    bad value gets the config's message). ``nfe`` and ``sigma_rel`` are left to the caller."""
    from .config import apply_overrides

    names = [f.name for f in dataclasses.fields(base.sample)]
    for key in point:
        if key not in SWEEP_KEYS and key not in names:
            raise PixelDiffusionError(f"--sweep key '{key}' is not a sampling option; "
                                      f"{did_you_mean(key, [*names, *SWEEP_KEYS])}use "
                                      f"{', '.join(SWEEP_KEYS)} or one of {', '.join(names)}")
    cfg = apply_overrides(base, [(f"sample.{k}", v) for k, v in point.items()
                                 if k not in SWEEP_KEYS])
    if "mid_sigmas" in point:
        from .generate import with_mid_sigmas

        cfg = with_mid_sigmas(cfg, point["mid_sigmas"].replace("/", ","))
    return cfg


def _nfe_budget(text: str) -> int:
    """The value of ``nfe=`` in a sweep: a positive integer."""
    if not text.isdigit() or int(text) < 1:
        raise PixelDiffusionError(f"--sweep nfe={text}: the model-call budget must be a positive "
                                  f"integer, e.g. nfe=10,20,50")
    return int(text)


def _sigma_rel(text: str) -> float:
    """The value of ``sigma_rel=`` in a sweep: a relative EMA width in range."""
    from .ema_snapshots import check_sigma_rel

    try:
        value = float(text)
    except ValueError:
        raise PixelDiffusionError(f"--sweep sigma_rel={text}: the EMA length must be a number, "
                                  f"e.g. sigma_rel=0.03,0.05,0.1") from None
    return check_sigma_rel(value)


class PostHocWeights:
    """Puts the post-hoc EMA of a sweep point's ``sigma_rel`` into a loaded checkpoint's model:
    rebuilt from its run's snapshots up to the checkpoint's step (``ema_snapshots``). Every
    value is checked on creation, before any sampling."""

    def __init__(self, loaded: Any, values: Sequence[str]) -> None:
        from .ema_snapshots import list_snapshots, plan_reconstruction, run_dir_of

        self.loaded, self.current = loaded, None
        self.run_dir = run_dir_of(Path(loaded.path))
        if self.run_dir is None:
            raise PixelDiffusionError(f"--sweep sigma_rel needs a run recorded with "
                                      f"train.posthoc_ema_every, but '{loaded.path}' has no "
                                      f"ema_snapshots/ beside it; pass -cp RUN_DIR")
        snapshots = list_snapshots(self.run_dir)
        for text in values:
            plan_reconstruction(snapshots, _sigma_rel(text), loaded.step)

    def load(self, text: str) -> None:
        from .ema_snapshots import reconstruct_run

        if text != self.current:
            rebuilt = reconstruct_run(self.run_dir, float(text), self.loaded.step)
            self.loaded.model.load_state_dict(rebuilt.state)
            self.current = text


def check_sampler(name: str) -> None:
    """samplers.check_sampler's message as a PixelDiffusionError, which also names
    ``sampler=all``, the sweep's spelling of every sampler."""
    from . import samplers
    from .config import CONSISTENCY_SAMPLER

    if name == CONSISTENCY_SAMPLER:  # the config's own check ties it to consistency models
        return
    try:
        samplers.check_sampler(name)
    except ValueError as err:
        raise PixelDiffusionError(f"{err} (or sampler=all in --sweep)") from None


def plan_sweep(base: Any, points: list[dict[str, str]], *, n_samples: int,
               seed: int | None) -> list[tuple[dict[str, str], Any]]:
    """(point, Config to sample with) for every sweep point, all checked before any sampling."""
    plans = []
    for point in points:
        cfg = sweep_config(base, point)
        if "seed" not in point and seed is not None:
            cfg = replace(cfg, sample=replace(cfg.sample, seed=seed))
        s = replace(cfg.sample, n_samples=n_samples)
        check_sampler(s.sampler)
        if "nfe" in point:
            s = replace(s, steps=steps_for_nfe(s.sampler, _nfe_budget(point["nfe"])))
        if s.steps > base.diffusion.timesteps:
            raise PixelDiffusionError(f"steps {s.steps} is more than the model's "
                                      f"{base.diffusion.timesteps} timesteps")
        if cfg.consistency.method != "none":  # intermediate sigmas that fit the steps
            from .generate import consistency_sigmas_of

            consistency_sigmas_of(cfg.consistency, s.steps)
        plans.append((point, replace(cfg, sample=s)))
    return plans


def sample_images(loaded: Any, cfg: Any, device: torch.device, *, micro_batch: int,
                  on_call: Callable[[], None] | None = None,
                  guidance_model: nn.Module | None = None) -> tuple[Images, int]:
    """Draw ``cfg.sample.n_samples`` images from a loaded checkpoint (autoguided by
    ``guidance_model`` when given); returns them and the NFE per image (model calls per micro
    batch, the guidance model's included)."""
    from .generate import generate

    counter = CountingModel(loaded.model, on_call)
    guide = None if guidance_model is None else CountingModel(guidance_model)
    generated = generate(counter, cfg, device, micro_batch=micro_batch, guidance_model=guide)
    batches = -(-len(generated.images) // micro_batch)
    labels = getattr(generated, "labels", None)
    calls = counter.calls + (guide.calls if guide is not None else 0)
    return (Images(generated.images, None if labels is None else labels.cpu(), str(loaded.path)),
            calls // max(batches, 1))


def run_sweep(loaded: Any, points: list[dict[str, str]], reference: Reference,
              extractor: Extractor, device: torch.device, *, n_samples: int,
              micro_batch: int = 250, seed: int | None = None, progress: bool = True,
              grid_dir: Path | None = None,
              guidance_model: nn.Module | None = None) -> list[Row]:
    """Sample and score every sweep point of a checkpoint, with one progress bar (in model calls)
    over the whole sweep; with ``grid_dir``, also save a grid of each point's first 64 images.
    A ``sigma_rel`` key loads that post-hoc EMA length first (``PostHocWeights``);
    ``guidance_model`` autoguides every point."""
    from .images import save_grid
    from .samplers import nfe_of

    plans = plan_sweep(loaded.config, points, n_samples=n_samples, seed=seed)
    posthoc = PostHocWeights(loaded, [p["sigma_rel"] for p in points]) \
        if any("sigma_rel" in p for p in points) else None
    batches = -(-n_samples // micro_batch)
    total = sum(nfe_of(c.sample.sampler, c.sample.steps) for _, c in plans)
    rows = []
    with tqdm(total=total * batches, desc="eval", unit="call", disable=not progress,
              dynamic_ncols=True) as bar:
        for point, cfg in plans:
            bar.set_postfix_str(f"{cfg.sample.sampler} {cfg.sample.steps} steps")
            start = time.perf_counter()
            if posthoc is not None:
                posthoc.load(point["sigma_rel"])
            images, nfe = sample_images(loaded, cfg, device, micro_batch=micro_batch,
                                        on_call=lambda: bar.update(1),
                                        guidance_model=guidance_model)
            results, provenance = score(images, reference, extractor)
            setting = {"sampler": cfg.sample.sampler, "steps": cfg.sample.steps,
                       **{k: v for k, v in point.items() if k not in ("sampler", "steps", "nfe")}}
            rows.append(Row(setting, nfe, results, time.perf_counter() - start, provenance))
            if grid_dir is not None:
                name = "-".join(f"{k}{v}" for k, v in setting.items())
                save_grid(images.x[:64], grid_dir / f"grid-{name}.png", nrow=8)
    return rows


# --------------------------------------------------------------------------- training hook


def default_reference(cfg: Any | None) -> str:
    """The reference of a model trained with ``cfg``: its data set (or image folder); digits
    without a config."""
    if cfg is None:
        return "digits"
    if cfg.data.dataset == "folder":
        return cfg.data.root
    return cfg.data.dataset


# the table's metrics that training logs and prints (KID and precision/recall are left to eval)
TRAINING_SCALARS = tuple(k for k in COLUMNS if k not in ("kid", "precision", "recall"))


class TrainingEval:
    """Metrics during training (``train.eval_*``): sample ``train.eval_samples`` images with the
    EMA weights and ``train.eval_sampler`` / ``eval_steps``, score them with the digit extractor
    against the built-in digits' held-in split and/or with Inception against the training data
    set. Reference features are computed once (and cached on disk)."""

    def __init__(self, cfg: Any, device: torch.device) -> None:
        tc = cfg.train  # train.eval_sampler is one of samplers.SAMPLERS (the config checks it)
        self.device, self.warned = device, False
        self.parts: list[tuple[Extractor, Reference]] = []
        size, channels = cfg.data.image_size, cfg.data.channels
        if tc.eval_metric in ("digits", "both"):
            digits = digit_extractor("cpu")
            self.parts.append((digits, reference_features("digits", digits, resolution=size,
                                                          channels=channels)))
        if tc.eval_metric in ("inception", "both"):
            inception = inception_extractor(None, device)
            self.parts.append((inception, reference_features(
                default_reference(cfg), inception, resolution=size, channels=channels,
                data_root=cfg.data.root)))

    def _sample(self, model: nn.Module, cfg: Any) -> Images:
        """``train.eval_samples`` images from ``model`` with the eval sampler and steps."""
        from .generate import generate

        tc = cfg.train
        # random labels: the metric compares the whole distribution, whatever rows a grid shows
        s = replace(cfg.sample, sampler=tc.eval_sampler, steps=tc.eval_steps,
                    n_samples=tc.eval_samples, class_label="random")
        was_training = model.training
        model.eval()
        try:
            generated = generate(model, replace(cfg, sample=s), self.device,
                                 micro_batch=min(tc.eval_samples, 256))
        finally:
            model.train(was_training)
        labels = getattr(generated, "labels", None)
        return Images(generated.images, None if labels is None else labels.cpu(), "EMA samples")

    def __call__(self, model: nn.Module, cfg: Any) -> tuple[str, dict[str, float]]:
        """(one log line with the numbers and how they were made, {tensorboard tag: value})."""
        tc = cfg.train
        images = self._sample(model, cfg)
        parts, scalars, notes = [], {}, []
        for extractor, reference in self.parts:
            results, provenance = score(images, reference, extractor, kid_subsets=10)
            notes += provenance.warnings
            for key in TRAINING_SCALARS:
                if key in results:
                    scalars[f"eval/{key}"] = results[key]
                    parts.append(f"{key.replace('_', '-')} {results[key]:.4g}")
            parts.append(f"[{extractor.name}: vs {reference.name}, {reference.n} images]")
        line = (f"{' '.join(parts)} ({tc.eval_samples} EMA samples, {tc.eval_sampler} "
                f"{tc.eval_steps} steps)")
        if not self.warned and notes:
            line += "; " + "; ".join(notes)
            self.warned = True
        return line, scalars


# --------------------------------------------------------------------------- the eval command


@dataclass
class EvalOptions:
    """What ``run_eval`` scores and how, as plain values.

    ``source`` is a checkpoint (file, checkpoint or run directory; sampled from), an image folder
    or a samples.npz (scored as they are). ``from_checkpoint`` treats it as a checkpoint even
    when it does not look like one. ``ref`` is a reference for ``reference_features`` (None: the
    checkpoint's data set, else digits). ``sampler``, ``steps``, ``guidance``, ``class_label``
    and ``sample_options`` (sampling config keys without ``sample.``, to text read like
    ``--sample.KEY value``) change the checkpoint's sampling, ``mid_sigmas`` a consistency
    model's intermediate noise levels ("2.5"); ``guidance_model`` is a checkpoint
    that autoguides it (guidance.py); ``sweep`` items are ``KEY=V1,V2``.
    """

    source: Path
    from_checkpoint: bool = False
    ref: str | None = None
    extractor: str = "digits"
    inception_weights: str | None = None
    n_samples: int = 1000
    micro_batch: int = 250
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    class_label: str | None = None
    guidance_model: Path | None = None
    mid_sigmas: str | None = None
    sample_options: dict[str, str] = field(default_factory=dict)
    sweep: list[str] = field(default_factory=list)
    seed: int | None = None
    device: str = "auto"
    use_ema: bool = True
    out_dir: Path = Path("eval")
    plot: Path | None = None
    save_stats: Path | None = None
    use_cache: bool = True
    data_root: str = "data"
    progress: bool = True

    def checkpoint_only(self) -> list[str]:
        """The options given that only a checkpoint input can use (they sample, or plot
        against NFE), named as on the command line."""
        given = {"--sampler": self.sampler is not None, "--steps": self.steps is not None,
                 "--guidance": self.guidance is not None, "--class": self.class_label is not None,
                 "--guidance_model": self.guidance_model is not None,
                 "--mid_sigmas": self.mid_sigmas is not None,
                 "--sample.KEY": bool(self.sample_options), "--sweep": bool(self.sweep),
                 "--plot": self.plot is not None}
        return [name for name, on in given.items() if on]


@dataclass
class EvalReport:
    """What ``run_eval`` did: the rows, the files it wrote, and the statistics file and plot
    when asked for."""

    rows: list[Row]
    written: list[Path]
    stats_file: Path | None = None
    plot: Path | None = None


def sampling_config(base: Any, options: EvalOptions) -> Any:
    """A checkpoint's Config with ``options.sample_options`` (checked like the config file) and
    the sampler, steps, guidance and class chosen in ``options`` on top."""
    from .config import apply_overrides
    from .generate import with_mid_sigmas

    cfg = apply_overrides(base, [(f"sample.{k}", v) for k, v in options.sample_options.items()])
    cfg = with_mid_sigmas(cfg, options.mid_sigmas)
    chosen = {"sampler": options.sampler, "steps": options.steps, "guidance": options.guidance,
              "class_label": options.class_label}
    return replace(cfg, sample=replace(cfg.sample, **{k: v for k, v in chosen.items()
                                                      if v is not None}))


def _load_source(options: EvalOptions, device: torch.device) -> tuple[Any, Images | None]:
    """(the loaded checkpoint with its sampling config, None) or (None, the images to score)."""
    from .checkpoint import load_checkpoint
    from .device import conv_width, resolve_precision
    from .image_sets import is_checkpoint, load_images

    path = Path(options.source).expanduser()
    if not path.exists():
        raise PixelDiffusionError(f"'{path}' does not exist; pass a checkpoint, an image folder "
                                  f"or a samples.npz")
    if options.from_checkpoint or is_checkpoint(path):
        loaded = load_checkpoint(path, use_ema=options.use_ema, device=device)
        loaded.config = sampling_config(loaded.config, options)
        print(resolve_precision(loaded.config.sample.precision, device, conv_width(loaded.model)),
              file=sys.stderr)
        return loaded, None
    if options.checkpoint_only():
        *most, last = options.checkpoint_only()
        names = f"{', '.join(most)} and {last}" if most else last
        raise PixelDiffusionError(f"{names} need a checkpoint input (-cp RUN_DIR); images in a "
                                  f"folder or npz are scored as they are")
    images = load_images(path)
    if images.size[0] != images.size[1]:
        raise DataError(f"the images are {images.size[0]}x{images.size[1]}; eval compares "
                        f"square images with a square reference, crop them first")
    return None, images


def run_eval(options: EvalOptions) -> EvalReport:
    """Score a checkpoint's samples (one setting or a sweep) or a set of images against a
    reference, and write results.csv / .md / .json (plus grids and a plot) to ``out_dir``."""
    from .device import resolve_device
    from .features import make_extractor
    from .reference import save_stats

    if options.plot is not None:
        check_plot_path(options.plot)
    device = resolve_device(options.device)
    extractor = make_extractor(options.extractor, inception_weights=options.inception_weights,
                               device=device)
    loaded, images = _load_source(options, device)
    if loaded is not None:
        resolution, channels = loaded.config.data.image_size, loaded.config.data.channels
    else:
        resolution, channels = images.size[0], images.channels
    ref = options.ref or default_reference(None if loaded is None else loaded.config)
    reference = reference_features(ref, extractor, resolution=resolution, channels=channels,
                                   data_root=options.data_root, use_cache=options.use_cache)
    stats_file = save_stats(reference, options.save_stats) if options.save_stats else None
    if loaded is not None:
        points = parse_sweep(options.sweep) if options.sweep else [{}]
        guide = None
        if options.guidance_model is not None:
            from .guidance import load_guidance_model

            guide = load_guidance_model(options.guidance_model, loaded.config, device=device,
                                        use_ema=options.use_ema)
        rows = run_sweep(loaded, points, reference, extractor, device,
                         n_samples=options.n_samples, micro_batch=options.micro_batch,
                         seed=options.seed, progress=options.progress, grid_dir=options.out_dir,
                         guidance_model=guide)
    else:
        start = time.perf_counter()
        results, provenance = score(images, reference, extractor)
        rows = [Row({"input": Path(images.source).name}, 0, results,
                    time.perf_counter() - start, provenance)]
    written = write_results(rows, options.out_dir)
    plot = plot_vs_nfe(rows, options.plot) if options.plot else None
    return EvalReport(rows, written, stats_file, plot)
