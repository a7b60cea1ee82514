"""What `pixeldiffusion eval` accepts: typed sweep values, the kinds of --ref, positional
arguments and npz labels, and the library entry point that takes plain values."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixeldiffusion import evaluate
from pixeldiffusion import reference as refs
from pixeldiffusion.cli import main
from pixeldiffusion.digit_classifier import builtin_digits
from pixeldiffusion.errors import ConfigError, PixelDiffusionError
from pixeldiffusion.samplers import SAMPLERS

EXE = shutil.which("pixeldiffusion", path=str(Path(sys.executable).parent)) or "pixeldiffusion"


@pytest.fixture(autouse=True)
def _cache_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(refs.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "stats-cache"))


def _uint8(x):
    """[N, 1, H, W] in [-1, 1] -> uint8 [N, H, W]."""
    return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory):
    """100 held-out digits to score (samples.npz, NHWC) and 300 held-in digits as the same
    reference three ways: a grey NHW images npz, an RGB NHWC images npz and a PNG folder."""
    root = tmp_path_factory.mktemp("sets")
    x_out, y_out = builtin_digits("heldout")
    scored = root / "samples.npz"
    np.savez(scored, images=_uint8(x_out[::10])[..., None], labels=y_out[::10].numpy())
    real = _uint8(builtin_digits("heldin")[0][:300])
    np.savez(root / "real.npz", images=real)
    np.savez(root / "real_rgb.npz", images=np.repeat(real[..., None], 3, axis=-1))
    folder = root / "real"
    folder.mkdir()
    for i, pixels in enumerate(real):
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root, scored, folder


def _row(out_dir):
    with open(out_dir / "results.csv") as f:
        return next(csv.DictReader(f))


def test_ref_takes_an_images_npz_like_a_folder_or_its_statistics(digit_sets, tmp_path):
    root, scored, folder = digit_sets
    done = subprocess.run([EXE, "eval", str(scored), "--ref", str(root / "real.npz"), "--out",
                           str(tmp_path / "npz"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Reference: npz-real-" in done.stdout and "(300 images)" in done.stdout

    # all four on one device: features from a GPU differ from the CPU's in the last bits
    stats = tmp_path / "real-stats.npz"
    assert main(["eval", str(scored), "--ref", str(folder), "--save_stats", str(stats),
                 "--out", str(tmp_path / "folder"), "--device", "cpu"]) == 0
    assert main(["eval", str(scored), "--ref", str(stats), "--out", str(tmp_path / "stats"),
                 "--device", "cpu"]) == 0
    assert main(["eval", str(scored), "--ref", str(root / "real_rgb.npz"), "--device", "cpu",
                 "--out", str(tmp_path / "rgb")]) == 0  # fitted to the scored images' grey

    rows = [_row(tmp_path / name) for name in ("npz", "folder", "stats", "rgb")]
    assert float(rows[0]["digit_fid"]) > 0.1
    for key in ("digit_fid", "kid", "precision", "recall"):
        values = [float(r[key]) for r in rows]
        assert values == pytest.approx([values[0]] * 4, rel=1e-6, abs=1e-9), key
    assert not list((tmp_path / "npz").glob(".*.tmp"))  # results were renamed into place


def test_ref_npz_that_is_neither_images_nor_statistics(digit_sets, tmp_path, capsys):
    _, scored, _ = digit_sets
    other = tmp_path / "other.npz"
    np.savez(other, pixels=np.zeros((4, 32, 32), np.uint8))
    assert main(["eval", str(scored), "--ref", str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds neither reference statistics ('mu' and 'sigma'" in err and "['pixels']" in err
    assert main(["eval", str(scored), "--ref", "digts", "--out", str(tmp_path / "o")]) == 2
    assert "unknown reference 'digts'; did you mean 'digits'?" in capsys.readouterr().err


def test_an_extra_positional_says_what_eval_takes(digit_sets, capsys):
    root, scored, _ = digit_sets
    assert main(["eval", str(scored), str(root / "real.npz")]) == 2
    err = capsys.readouterr().err
    assert "eval takes one INPUT (a checkpoint, an image folder or a samples.npz)" in err
    assert f"pixeldiffusion eval {scored} --ref {root / 'real.npz'}" in err
    assert "sampling options" not in err and "Traceback" not in err
    assert main(["eval", str(scored), "--refs", "digits"]) == 2
    assert "eval has no option '--refs'; pixeldiffusion eval --help" in capsys.readouterr().err


@pytest.mark.parametrize("labels", [np.array(list("abcd")), np.array([0.5, 1.0, 2.0, 3.0])])
def test_npz_labels_that_are_not_integers_get_one_message(tmp_path, capsys, labels):
    npz = tmp_path / "labelled.npz"
    np.savez(npz, images=np.zeros((4, 32, 32, 1), np.uint8), labels=labels)
    assert main(["eval", str(npz), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"'labels' must be integer class indices; got {labels.dtype}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sweep_values_are_typed_by_the_config(tiny_config):
    points = evaluate.parse_sweep(["clip_x0=false,true", "eta=0.5"])
    configs = [evaluate.sweep_config(tiny_config, p) for p in points]
    assert [c.sample.clip_x0 for c in configs] == [False, True]
    assert configs[0].sample.clip_x0 is False and configs[0].sample.eta == 0.5
    with pytest.raises(ConfigError, match="config key 'sample.clip_x0' needs true or false; "
                                          "got 'maybe'"):
        evaluate.sweep_config(tiny_config, {"clip_x0": "maybe"})
    with pytest.raises(ConfigError, match="config key 'sample.var_type' must be one of"):
        evaluate.sweep_config(tiny_config, {"var_type": "fixed_medium"})
    with pytest.raises(PixelDiffusionError, match="'stesp' is not a sampling option; did you "
                                                  "mean 'steps'?"):
        evaluate.sweep_config(tiny_config, {"stesp": "2"})
    with pytest.raises(PixelDiffusionError, match="nfe=ten: the model-call budget must be"):
        evaluate.plan_sweep(tiny_config, [{"nfe": "ten"}], n_samples=2, seed=None)
    every = evaluate.parse_sweep(["sampler=ddim,all"])
    assert [p["sampler"] for p in every] == ["ddim", *(s for s in SAMPLERS if s != "ddim")]


def test_cli_sweep_samples_with_the_typed_values(tiny_config, tmp_path, monkeypatch):
    from pixeldiffusion.train import train

    run = train(tiny_config, tmp_path / "run", progress=False, log=lambda _: None)
    seen = []
    real_sample_images = evaluate.sample_images

    def spy(loaded, cfg, *args, **kwargs):
        seen.append((cfg.sample.clip_x0, cfg.sample.steps, cfg.sample.seed))
        return real_sample_images(loaded, cfg, *args, **kwargs)

    monkeypatch.setattr(evaluate, "sample_images", spy)
    assert main(["eval", "-cp", str(run.run_dir), "-n", "4", "--sampler", "ddim", "--seed", "3",
                 "--sweep", "clip_x0=false,true", "steps=2", "--out", str(tmp_path / "e"),
                 "--no_progress"]) == 0
    assert seen == [(False, 2, 3), (True, 2, 3)]


def test_run_eval_takes_plain_values(digit_sets, tmp_path):
    root, scored, _ = digit_sets
    report = evaluate.run_eval(evaluate.EvalOptions(
        source=scored, ref=str(root / "real.npz"), out_dir=tmp_path / "lib", device="cpu",
        save_stats=tmp_path / "s.npz"))
    (row,) = report.rows
    assert row.setting == {"input": "samples.npz"} and row.provenance.reference_n == 300
    assert row.results["class_accuracy"] > 0.9
    assert report.stats_file == tmp_path / "s.npz" and report.stats_file.is_file()
    assert [p.name for p in report.written] == ["results.csv", "results.md", "results.json"]
    with pytest.raises(PixelDiffusionError, match="^--steps and --sweep need a checkpoint input"):
        evaluate.run_eval(evaluate.EvalOptions(source=scored, steps=2, sweep=["eta=0,1"],
                                               device="cpu"))
    with pytest.raises(PixelDiffusionError, match="cannot write a plot to 'nfe.pgn'; end its"):
        evaluate.run_eval(evaluate.EvalOptions(source=scored, plot=Path("nfe.pgn")))
