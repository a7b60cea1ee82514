"""The offline digit metric, reference caching, `pixeldiffusion eval` and the training hook."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pixeldiffusion import digit_classifier as dc
from pixeldiffusion import evaluate, features, image_sets, metrics
from pixeldiffusion import reference as refs
from pixeldiffusion.cli import main
from pixeldiffusion.errors import DataError, PixelDiffusionError
from pixeldiffusion.samplers import SAMPLERS, nfe_of
from pixeldiffusion.samplers import sample as pd_sample


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("stats-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache_root, monkeypatch):
    monkeypatch.setenv(refs.CACHE_ENV, str(cache_root))


@pytest.fixture(scope="module")
def digits():
    """(classifier, held-in x/y, held-out x/y) of the built-in digits."""
    return (dc.load_digit_classifier(), *dc.builtin_digits("heldin"),
            *dc.builtin_digits("heldout"))


def _write_pngs(folder, pixels):
    """uint8 [N, H, W] or [N, H, W, 3] -> folder/000.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:03d}.png")
    return folder


def _uint8(x):
    """[N, 1, H, W] in [-1, 1] -> uint8 [N, H, W]."""
    return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def test_classifier_outputs_and_splits(digits):
    model, x_in, y_in, x_out, y_out = digits
    features, logits = dc.digit_outputs(model, x_out[:20])
    assert features.shape == (20, dc.FEATURE_DIM) and (features >= 0).all()
    assert logits.shape == (20, 10)
    assert len(x_in) == 4000 and len(x_out) == 1000
    assert torch.bincount(y_out, minlength=10).tolist() == [100] * 10
    held_in, held_out = dc.digit_splits(torch.cat([y_in, y_out]).numpy())
    assert not set(held_in) & set(held_out)
    info = json.loads(dc.weights_metadata()["info"])
    accuracy = float((model.logits(x_out).argmax(1) == y_out).double().mean())
    assert accuracy == pytest.approx(info["heldout_accuracy"], abs=1e-9) and accuracy > 0.95


def test_calibration_real_beats_blurred_beats_noise(digits):
    model, x_in, _, x_out, _ = digits
    cached = refs.reference_features("digits", features.digit_extractor(), resolution=32,
                                     channels=1)  # the held-in features, computed once
    reference = cached.stats
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 256
    blurred = F.conv2d(F.pad(x_out, (2, 2, 2, 2), value=-1.0), kernel[None, None])
    noise = torch.rand(x_out.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def fid(x):
        return metrics.frechet_distance(metrics.gaussian_stats(dc.digit_outputs(model, x)[0]),
                                        reference)

    real, blur, rand = fid(x_out), fid(blurred), fid(noise)
    assert real < 10 and blur > 20 * real and rand > 2 * blur
    # two disjoint random halves of the held-in digits: near zero
    order = torch.randperm(len(x_in), generator=torch.Generator().manual_seed(0))
    feats = torch.from_numpy(cached.features)
    halves = metrics.frechet_distance(metrics.gaussian_stats(feats[order[:2000]]),
                                      metrics.gaussian_stats(feats[order[2000:]]))
    # FID's small-sample bias keeps it above 0: 2,000 vs 2,000 lands near the held-out score
    assert halves < 2 * real and halves < blur / 50


def test_score_reports_fid_infinity_from_650_samples(digits):
    """``score`` adds digit_fid_inf (Chong & Forsyth 2020) once the smallest fitted subset can
    have a full-rank covariance (650 samples of 64-d features): for the held-out real digits the
    1,000-sample digit-FID is mostly small-sample bias (2.66) and the extrapolation is near 0;
    blurred digits keep a large distance. The column sits after digit_fid in the tables."""
    _, _, _, x_out, _ = digits
    reference = refs.reference_features("digits", features.digit_extractor(), resolution=32,
                                        channels=1)
    extractor = features.digit_extractor()
    real, _ = evaluate.score(image_sets.Images(x_out, None, "real"), reference, extractor)
    assert real["digit_fid"] > 2 and abs(real["digit_fid_inf"]) < 0.5
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 256
    blurred = F.conv2d(F.pad(x_out, (2, 2, 2, 2), value=-1.0), kernel[None, None])
    blur, _ = evaluate.score(image_sets.Images(blurred, None, "blur"), reference, extractor)
    assert blur["digit_fid_inf"] > 20 and blur["digit_fid_inf"] < blur["digit_fid"]
    few, _ = evaluate.score(image_sets.Images(x_out[:649], None, "few"), reference, extractor)
    assert "digit_fid" in few and "digit_fid_inf" not in few
    from pixeldiffusion.results import COLUMNS
    assert COLUMNS.index("digit_fid_inf") == COLUMNS.index("digit_fid") + 1


def _fake_extractor(key):
    """A cheap extractor: 4x4 average-pooled grey pixels as 16-d features."""
    def fn(images):
        return features.Features(F.adaptive_avg_pool2d(images.mean(1, keepdim=True), 4)
                                 .flatten(1), None)
    return features.Extractor("fake", key, f"fake {key}", 16, 100, fn)


def test_stats_cache_keyed_by_resolution_extractor_and_folder(tmp_path, monkeypatch, cache_root):
    rng = np.random.default_rng(0)
    folder = _write_pngs(tmp_path / "ref", rng.integers(0, 256, (30, 12, 12), dtype=np.uint8))
    first = refs.reference_features(str(folder), _fake_extractor("a"), resolution=8,
                                    channels=1)
    assert first.cached is not None and first.cached.parent == cache_root / "stats"
    assert first.n == 30 and first.resolution == 8

    calls = []
    real_loader = refs.reference_images
    monkeypatch.setattr(refs, "reference_images",
                        lambda *a, **k: calls.append(a) or real_loader(*a, **k))
    again = refs.reference_features(str(folder), _fake_extractor("a"), resolution=8,
                                    channels=1)
    assert calls == [] and again.cached == first.cached
    np.testing.assert_array_equal(again.stats.sigma, first.stats.sigma)

    other_size = refs.reference_features(str(folder), _fake_extractor("a"), resolution=12,
                                         channels=1)
    assert len(calls) == 1 and other_size.cached != first.cached
    other_extractor = refs.reference_features(str(folder), _fake_extractor("b"),
                                              resolution=8, channels=1)
    assert len(calls) == 2 and other_extractor.cached not in (first.cached, other_size.cached)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(folder / "new.png")  # the data changed
    changed = refs.reference_features(str(folder), _fake_extractor("a"), resolution=8,
                                      channels=1)
    assert len(calls) == 3 and changed.n == 31 and changed.cached != first.cached
    with pytest.raises(DataError, match="made with extractor 'a'"):
        refs.load_stats_file(first.cached, _fake_extractor("b"))


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, digits):
    """100 held-out digits as a PNG folder and as samples.npz with labels."""
    _, _, _, x_out, y_out = digits
    root = tmp_path_factory.mktemp("inputs")
    pixels = _uint8(x_out[::10])
    folder = _write_pngs(root / "pngs", pixels)
    npz = root / "samples.npz"
    np.savez(npz, images=pixels[..., None], labels=y_out[::10].numpy())
    return folder, npz


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_eval_reads_a_folder_and_an_npz(digit_files, tmp_path, capsys):
    folder, npz = digit_files
    assert main(["eval", str(folder), "--ref", "digits", "--out", str(tmp_path / "f")]) == 0
    row = _csv(tmp_path / "f" / "results.csv")[0]
    assert float(row["digit_fid"]) < 30 and float(row["confidence"]) > 0.9
    out = capsys.readouterr()
    assert "digit-cnn" in out.out and "Reference: digits (4,000 images)" in out.out
    assert "100 samples is biased upwards" in out.err
    assert main(["eval", str(npz), "--out", str(tmp_path / "n"), "--no_progress"]) == 0
    row = _csv(tmp_path / "n" / "results.csv")[0]
    assert float(row["class_accuracy"]) > 0.9
    provenance = json.loads((tmp_path / "n" / "results.json").read_text())[0]["provenance"]
    assert provenance["n_samples"] == 100 and provenance["reference_n"] == 4000


def test_eval_samples_a_checkpoint_and_sweeps(tiny_config, tmp_path, capsys):
    from pixeldiffusion.train import train

    run = train(tiny_config, tmp_path / "run", progress=False, log=lambda _: None)
    out = tmp_path / "eval"
    assert main(["eval", "-cp", str(run.run_dir), "-n", "6", "--micro_batch", "4",
                 "--sweep", "sampler=ddim,ddpm", "steps=1,2", "--out", str(out),
                 "--plot", str(out / "nfe.png"), "--no_progress"]) == 0
    rows = _csv(out / "results.csv")
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == \
        [("ddim", "1", "1"), ("ddim", "2", "2"), ("ddpm", "1", "1"), ("ddpm", "2", "2")]
    assert all(np.isfinite(float(r["digit_fid"])) for r in rows)
    assert (out / "nfe.png").stat().st_size > 0 and (out / "grid-samplerddim-steps2.png").exists()
    assert "the 64-d feature covariance needs at least 65 samples" in capsys.readouterr().err
    # a single setting with sampling overrides on the command line
    assert main(["eval", "-cp", str(run.run_dir), "-n", "4", "--sampler", "ddim", "--steps", "2",
                 "--sample.eta", "1.0", "--out", str(tmp_path / "one"), "--no_progress"]) == 0
    assert _csv(tmp_path / "one" / "results.csv")[0]["nfe"] == "2"
    assert main(["eval", "-cp", str(run.run_dir), "-n", "4", "--sampler", "dpmpp2m",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "unknown sampler 'dpmpp2m'; did you mean 'dpmpp_2m'?" in capsys.readouterr().err


def test_steps_for_nfe_never_exceeds_the_budget():
    alphas_cumprod = torch.linspace(0.999, 0.01, 100, dtype=torch.float64)
    for name in SAMPLERS:
        steps = evaluate.steps_for_nfe(name, 5)
        assert _counted_nfe(name, steps, alphas_cumprod) <= 5
        assert _counted_nfe(name, steps + 1, alphas_cumprod) > 5


def _counted_nfe(sampler, steps, alphas_cumprod):
    """Model calls of a real run, counted; samplers.nfe_of must agree."""
    counter = evaluate.CountingModel(evaluate._Zero())
    pd_sample(counter, torch.zeros(1, 1, 1, 1), alphas_cumprod, sampler=sampler, steps=steps)
    assert counter.calls == nfe_of(sampler, steps), (sampler, steps)
    return counter.calls
    assert evaluate.parse_sweep(["sampler=a,b", "nfe=1,2"])[1] == {"sampler": "a", "nfe": "2"}
    with pytest.raises(PixelDiffusionError, match="key=v1,v2"):
        evaluate.parse_sweep(["sampler"])


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_inputs_give_one_clear_message(tmp_path, capsys):
    sizes = tmp_path / "sizes"
    _write_pngs(sizes, [np.zeros((32, 32), np.uint8)] * 2)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(sizes / "z.png")
    code, err = _run(["eval", str(sizes)], capsys)
    assert code == 2 and "different sizes" in err and "28x28" in err

    mixed = _write_pngs(tmp_path / "mixed", [np.zeros((32, 32), np.uint8)] * 2)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mixed / "rgb.png")
    code, err = _run(["eval", str(mixed)], capsys)
    assert code == 2 and "mix grey and colour" in err

    (tmp_path / "empty").mkdir()
    code, err = _run(["eval", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no images found" in err

    stats = tmp_path / "digits-stats.npz"  # a statistics file fixes channels and resolution
    grey = _write_pngs(tmp_path / "grey", np.zeros((3, 32, 32), np.uint8))
    assert main(["eval", str(grey), "--save_stats", str(stats), "--out", str(tmp_path / "o")]) == 0
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((70, 32, 32, 3), np.uint8))
    code, err = _run(["eval", str(rgb), "--ref", str(stats)], capsys)
    assert code == 2 and "3 channel(s) but the reference 'digits' has 1" in err
    small = tmp_path / "small.npz"
    np.savez(small, images=np.zeros((70, 28, 28, 1), np.uint8))
    code, err = _run(["eval", str(small), "--ref", str(stats)], capsys)
    assert code == 2 and "are 28x28 but the reference 'digits' is 32x32" in err

    code, err = _run(["eval", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err
    assert "Traceback" not in err


def test_too_few_samples_warn_with_the_number_needed(digits):
    _, _, _, x_out, _ = digits
    extractor = features.digit_extractor()
    reference = refs.reference_features("digits", extractor, resolution=32, channels=1)
    results, provenance = evaluate.score(image_sets.Images(x_out[:20], None, "x"), reference,
                                         extractor)
    assert "at least 65 samples" in provenance.warnings[0] and "use -n 65" in \
        provenance.warnings[0]
    assert np.isfinite(results["digit_fid"])


def test_inception_path_says_what_is_missing(tmp_path, monkeypatch, capsys):
    code, err = _run(["eval", str(tmp_path), "--extractor", "inception", "--inception-weights",
                      str(tmp_path / "missing.pth")], capsys)
    assert code == 2 and "missing.pth' does not exist" in err and features.INCEPTION_URL in err

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # not installed
    with pytest.raises(PixelDiffusionError, match=r"pip install 'pixeldiffusion\[fid\]'"):
        features.make_extractor("inception")

    fake = tmp_path / "site" / "torch_fidelity"  # installed, but its torchvision import fails
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import torchvision\n")
    monkeypatch.delitem(sys.modules, "torch_fidelity")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(PixelDiffusionError, match="torch-fidelity imports torchvision"):
        features.make_extractor("inception")


def test_training_logs_the_metric_to_log_and_tensorboard(tiny_args, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pixeldiffusion.config import load_config
    from pixeldiffusion.run import train

    cfg = load_config(None, [*tiny_args, "--train.eval_samples", "8", "--train.eval_every", "2",
                             "--train.eval_steps", "2", "--train.tensorboard", "true"])
    lines = []
    train(cfg, tmp_path / "run", progress=False, log=lines.append)
    evals = [line for line in lines if line.startswith("eval at step")]
    assert [line.split(":")[0] for line in evals] == ["eval at step 2", "eval at step 4"]
    assert "digit-fid" in evals[0] and "8 EMA samples, ddim 2 steps" in evals[0]
    assert "at least 65 samples" in evals[0] and "at least 65" not in evals[1]  # warned once
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/digit_fid")] == [2, 4]


def test_training_logs_fid_infinity_from_650_samples(tiny_args, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pixeldiffusion.config import load_config
    from pixeldiffusion.run import train

    cfg = load_config(None, [*tiny_args, "--train.steps", "2", "--train.eval_samples", "650",
                             "--train.eval_every", "2", "--train.eval_steps", "1",
                             "--train.tensorboard", "true"])
    lines = []
    train(cfg, tmp_path / "run", progress=False, log=lines.append)
    evals = [line for line in lines if line.startswith("eval at step")]
    assert len(evals) == 1 and "digit-fid-inf" in evals[0]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/digit_fid_inf")] == [2]
