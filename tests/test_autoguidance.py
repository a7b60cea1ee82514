"""Autoguidance (Karras et al. 2024): the wrapper against its formula on closed-form denoisers,
every sampler through it, the guide's compatibility checks, and a tiny run guided by an earlier
checkpoint of itself through the CLI."""

import numpy as np
import pytest
import torch

from pixeldiffusion.checkpoint import load_checkpoint
from pixeldiffusion.cli import main
from pixeldiffusion.config import load_config
from pixeldiffusion.errors import PixelDiffusionError
from pixeldiffusion.generate import generate
from pixeldiffusion.guidance import (
    autoguided_model,
    check_guidance_model,
    load_guidance_model,
    sampling_labels,
)
from pixeldiffusion.samplers import SAMPLERS, sample
from pixeldiffusion.schedule import alphas_cumprod_from_betas, make_betas, sigma_of

ABAR = alphas_cumprod_from_betas(make_betas("linear", 100)).float()


class GaussianDenoiser(torch.nn.Module):
    """The exact x0-denoiser of data N(mean_y, s^2) per pixel under the VP table ABAR:
    E[x0 | x_t] = mean + s^2 sqrt(abar) (x_t - sqrt(abar) mean) / (abar s^2 + 1 - abar);
    the class y shifts the mean, so a missing label would show. Records its calls."""

    def __init__(self, s: float, mean: float = 0.0) -> None:
        super().__init__()
        self.s, self.mean, self.calls = s, mean, []

    def forward(self, x_t, t, y=None):
        self.calls.append(None if y is None else y.tolist())
        abar = ABAR[t.long()].double().reshape(-1, 1, 1, 1)
        mean = self.mean + (0.0 if y is None else y.double().reshape(-1, 1, 1, 1))
        var = abar * self.s**2 + 1 - abar
        return (mean + self.s**2 * abar.sqrt() * (x_t.double() - abar.sqrt() * mean) / var).float()


def _points():
    x_t = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    return x_t, torch.tensor([10, 50, 90])


@pytest.mark.parametrize("w", [0.0, 1.0, 1.7, 3.0])
def test_the_wrapper_is_d_bad_plus_w_times_the_difference(w):
    good, bad = GaussianDenoiser(1.0), GaussianDenoiser(0.6, mean=0.2)
    x_t, t = _points()
    out = autoguided_model(good, bad, w)(x_t, t)
    d_good, d_bad = good(x_t, t), bad(x_t, t)
    torch.testing.assert_close(out, d_bad + w * (d_good - d_bad), rtol=0, atol=1e-6)
    good.calls.clear(), bad.calls.clear()
    autoguided_model(good, bad, w)(x_t, t)
    # w = 1 is the good model alone, w = 0 the bad one alone: one network call, not two
    assert (len(good.calls), len(bad.calls)) == {1.0: (1, 0), 0.0: (0, 1)}.get(w, (1, 1))


def test_both_models_get_the_labels():
    good, bad = GaussianDenoiser(1.0), GaussianDenoiser(0.5)
    x_t, t = _points()
    labels = torch.tensor([0, 2, 1])
    out = autoguided_model(good, bad, 2.0, labels=labels)(x_t, t)
    assert good.calls == bad.calls == [[0, 2, 1]]
    d_good, d_bad = good(x_t, t, y=labels), bad(x_t, t, y=labels)
    torch.testing.assert_close(out, d_bad + 2.0 * (d_good - d_bad), rtol=0, atol=1e-6)


def test_the_guidance_interval_leaves_the_good_model_alone_outside():
    """Guide only where sigma_lo < sigma(t) <= sigma_hi (Kynkaanniemi et al. 2024)."""
    good, bad = GaussianDenoiser(1.0), GaussianDenoiser(0.5)
    x_t = torch.randn(2, 1, 2, 2)
    sigmas = [sigma_of(float(ABAR[t])) for t in (10, 90)]
    interval = (sigmas[0] * 1.01, sigmas[1] * 1.01)  # t = 90 inside, t = 10 outside
    wrapped = autoguided_model(good, bad, 3.0, alphas_cumprod=ABAR, interval=interval)
    inside, outside = torch.full((2,), 90), torch.full((2,), 10)
    torch.testing.assert_close(wrapped(x_t, outside), good(x_t, outside), rtol=0, atol=0)
    d_good, d_bad = good(x_t, inside), bad(x_t, inside)
    torch.testing.assert_close(wrapped(x_t, inside), d_bad + 3.0 * (d_good - d_bad), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_samples_the_autoguided_denoiser(sampler):
    """Through any sampler the wrapper gives what the guided denoiser written out by hand
    gives (same noise), and w = 2 differs from the good model alone."""
    good, bad = GaussianDenoiser(1.0), GaussianDenoiser(0.5, mean=0.3)

    def by_hand(x_t, t):
        d_bad = bad(x_t, t)
        return d_bad + 2.0 * (good(x_t, t) - d_bad)

    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1))

    def run(model):
        return sample(model, x_T, ABAR, sampler=sampler, steps=6, prediction="x0",
                      generator=torch.Generator().manual_seed(2))

    guided = run(autoguided_model(good, bad, 2.0))
    torch.testing.assert_close(guided, run(by_hand), rtol=0, atol=1e-5)
    assert (guided - run(good)).abs().max() > 1e-3


def test_unconditional_models_take_a_guidance_weight_only_with_a_guide(tiny_config):
    from dataclasses import replace

    cfg = replace(tiny_config, sample=replace(tiny_config.sample, guidance=2.5))
    assert sampling_labels(cfg, autoguidance=True) == (None, 2.5)
    with pytest.raises(PixelDiffusionError, match="--guidance_model CKPT"):
        sampling_labels(cfg)
    with pytest.raises(PixelDiffusionError, match="--class 3"):
        sampling_labels(cfg, class_label=3, autoguidance=True)
    with pytest.raises(PixelDiffusionError, match="out of range"):
        sampling_labels(cfg, guidance=-1.0, autoguidance=True)


@pytest.mark.parametrize("override, message", [
    (["--data.channels", "3"], "makes 3x32x32 images but this model makes 1x32x32"),
    (["--diffusion.prediction", "v"], "it: ddpm, predicts v; this model: ddpm, predicts eps"),
    (["--diffusion.beta_schedule", "cosine"], "same diffusion config"),
    (["--diffusion.formulation", "edm"], "it: edm, predicts eps"),
    (["--model.num_classes", "10"], "has 10 classes but this model has 0"),
])
def test_a_guide_of_another_shape_formulation_or_class_count_is_refused(tiny_args, override,
                                                                        message):
    cfg = load_config(None, tiny_args)
    other = load_config(None, tiny_args + override)
    with pytest.raises(PixelDiffusionError, match=message):
        check_guidance_model(cfg, other, "bad.safetensors")
    # another network size of the same data and formulation is fine
    check_guidance_model(cfg, load_config(None, tiny_args + ["--model.num_res_blocks", "2"]),
                         "a larger model is fine")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_args):
    """A tiny unconditional run with checkpoints and post-hoc EMA snapshots at steps 2 and 4 (lr
    high enough that they differ clearly)."""
    run = tmp_path_factory.mktemp("autoguide") / "run"
    assert main(["train", "-e", str(run), *tiny_args, "--train.save_every", "2",
                 "--train.posthoc_ema_every", "2", "--train.lr", "0.01", "--no_progress"]) == 0
    return run


def _sample_npz(run, out, *extra):
    code = main(["sample", "-cp", str(run), "-bs", "4", "--nrow", "2", "--device", "cpu",
                 "--sampler", "ddim", "--steps", "3", "-sp", str(out / "grid.png"),
                 "--save_dir", str(out), *extra])
    assert code == 0
    return np.load(out / "samples.npz")["images"]


def test_sampling_guided_by_an_earlier_checkpoint_of_itself(trained, tmp_path):
    earlier = trained / "checkpoints" / "step-0000002"
    plain = _sample_npz(trained, tmp_path / "plain")
    w1 = _sample_npz(trained, tmp_path / "w1", "--guidance_model", str(earlier),
                     "--guidance", "1")
    w3 = _sample_npz(trained, tmp_path / "w3", "--guidance_model", str(earlier),
                     "--guidance", "3")
    assert np.array_equal(plain, w1)  # w = 1 is the model alone
    assert not np.array_equal(w1, w3)
    assert w3.shape == (4, 32, 32, 1)


def test_a_runs_own_ema_snapshot_guides_it_as_its_rebuilt_ema_does(trained, tmp_path):
    """The recipe of configs/mnist_cosine_8k.yaml: the run's post-hoc EMA snapshot (sigma_rel
    0.05 at step 2) is a guide as it stands, the same as ``pixeldiffusion ema --step 2`` rebuilds
    it, and guiding by it changes the samples."""
    snapshot = trained / "ema_snapshots" / "step-0000002-sigma_rel-0.050.safetensors"
    rebuilt = tmp_path / "rebuilt.safetensors"
    assert main(["ema", str(trained), "--sigma_rel", "0.05", "--step", "2", "-o",
                 str(rebuilt)]) == 0
    plain = _sample_npz(trained, tmp_path / "plain")
    by_snapshot = _sample_npz(trained, tmp_path / "snap", "--guidance_model", str(snapshot),
                              "--guidance", "2")
    by_rebuilt = _sample_npz(trained, tmp_path / "rebuilt", "--guidance_model", str(rebuilt),
                             "--guidance", "2")
    np.testing.assert_allclose(by_snapshot, by_rebuilt, rtol=0, atol=2 / 255)
    assert not np.array_equal(plain, by_snapshot)


def test_generate_takes_the_guidance_model(trained):
    loaded = load_checkpoint(trained)
    guide = load_guidance_model(trained / "checkpoints" / "step-0000002", loaded.config)
    device = torch.device("cpu")
    guided = generate(loaded.model, loaded.config, device, guidance=3.0, guidance_model=guide)
    alone = generate(loaded.model, loaded.config, device)
    by_guide = generate(guide, loaded.config, device)
    assert guided.images.shape == alone.images.shape
    assert torch.isfinite(guided.images).all()
    assert not torch.equal(guided.images, alone.images)
    assert not torch.equal(guided.images, by_guide.images)


def test_a_guide_of_another_shape_is_one_clear_line(trained, tmp_path, tiny_args, capsys):
    other = tmp_path / "rgb"
    assert main(["train", "-e", str(other), *tiny_args, "--data.channels", "3",
                 "--train.steps", "1", "--no_progress"]) == 0
    capsys.readouterr()
    code = main(["sample", "-cp", str(trained), "--guidance_model", str(other), "--guidance",
                 "2", "-sp", str(tmp_path / "x.png"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "makes 3x32x32 images but this model makes 1x32x32" in err
    assert not (tmp_path / "x.png").exists()


def test_eval_takes_the_guidance_model_and_counts_its_calls(trained, tmp_path, capsys):
    code = main(["eval", "-cp", str(trained), "--guidance_model",
                 str(trained / "checkpoints" / "step-0000002"), "--guidance", "2", "-n", "8",
                 "--micro_batch", "8", "--sampler", "ddim", "--steps", "3", "--out",
                 str(tmp_path / "ev"), "--no_progress"])
    assert code == 0
    table = capsys.readouterr().out
    header, row = table.splitlines()[:2]
    assert row.split()[header.split().index("nfe")] == "6"  # 3 steps x 2 networks


# --- autoguidance with a little classifier-free guidance on top ---------------------------------


@pytest.mark.parametrize("w, w_cfg", [(1.0, 1.2), (1.5, 1.1), (2.0, 0.5)])
def test_cfg_on_top_adds_both_differences_in_one_batched_pass(w, w_cfg):
    """D = D_good + (w - 1)(D_good - D_bad) + (w_cfg - 1)(D_good - D_good,uncond): the good
    model's class and null halves come from one call of 2N, the guide's from one call of N
    (none where w = 1)."""
    good, bad = GaussianDenoiser(1.0), GaussianDenoiser(0.6, mean=0.2)
    x_t, t = _points()
    labels, null = torch.tensor([0, 2, 1]), 5
    out = autoguided_model(good, bad, w, labels=labels, cfg=w_cfg, null_class=null)(x_t, t)
    assert good.calls == [[0, 2, 1, null, null, null]]
    assert bad.calls == ([] if w == 1.0 else [[0, 2, 1]])
    d_good, d_bad = good(x_t, t, y=labels), bad(x_t, t, y=labels)
    d_uncond = good(x_t, t, y=torch.full_like(labels, null))
    expected = d_good + (w - 1) * (d_good - d_bad) + (w_cfg - 1) * (d_good - d_uncond)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_cfg_on_top_keeps_the_interval_and_needs_labels():
    good, bad = GaussianDenoiser(1.0), GaussianDenoiser(0.5)
    x_t = torch.randn(2, 1, 2, 2)
    labels = torch.tensor([1, 0])
    sigmas = [sigma_of(float(ABAR[t])) for t in (10, 90)]
    interval = (sigmas[0] * 1.01, sigmas[1] * 1.01)  # t = 90 inside, t = 10 outside
    wrapped = autoguided_model(good, bad, 2.0, labels=labels, cfg=1.5, null_class=3,
                               alphas_cumprod=ABAR, interval=interval)
    outside = torch.full((2,), 10)
    torch.testing.assert_close(wrapped(x_t, outside), good(x_t, outside, y=labels), rtol=0,
                               atol=0)
    inside = torch.full((2,), 90)
    assert (wrapped(x_t, inside) - good(x_t, inside, y=labels)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs class labels"):
        autoguided_model(good, bad, 2.0, cfg=1.5)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, tiny_args):
    run = tmp_path_factory.mktemp("autoguide_cond") / "run"
    assert main(["train", "-e", str(run), *tiny_args, "--model.num_classes", "10",
                 "--train.save_every", "2", "--train.lr", "0.01", "--no_progress"]) == 0
    return run


def test_autoguidance_cfg_through_sample_and_eval(conditional, tmp_path, capsys):
    earlier = str(conditional / "checkpoints" / "step-0000002")
    guided = ["--class", "1", "--guidance_model", earlier, "--guidance", "1.5"]
    auto = _sample_npz(conditional, tmp_path / "auto", *guided)
    both = _sample_npz(conditional, tmp_path / "both", *guided, "--autoguidance_cfg", "1.5")
    same = _sample_npz(conditional, tmp_path / "same", *guided, "--autoguidance_cfg", "1")
    assert np.array_equal(auto, same) and not np.array_equal(auto, both)
    capsys.readouterr()
    assert main(["eval", "-cp", str(conditional), "--guidance_model", earlier, "--guidance",
                 "1.5", "-n", "8", "--micro_batch", "8", "--sampler", "ddim", "--steps", "3",
                 "--sweep", "autoguidance_cfg=1,1.5", "--out", str(tmp_path / "ev"),
                 "--no_progress"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()[:3]
    columns = header.split()
    cells = [dict(zip(columns, row.split(), strict=True)) for row in rows]
    assert [c["autoguidance_cfg"] for c in cells] == ["1", "1.5"]
    assert [c["nfe"] for c in cells] == ["6", "6"]  # 3 steps x (the 2N-batched model + guide)


@pytest.mark.parametrize("argv, message", [
    (["--autoguidance_cfg", "1.5", "--class", "1"], "no --guidance_model was given"),
    (["--autoguidance_cfg", "1.5", "--guidance_model", "UNCOND"], "needs a class-conditional"),
])
def test_autoguidance_cfg_where_it_cannot_apply_is_one_line(conditional, trained, tmp_path,
                                                            capsys, argv, message):
    run = trained if "UNCOND" in argv else conditional
    argv = [str(trained / "checkpoints" / "step-0000002") if a == "UNCOND" else a for a in argv]
    capsys.readouterr()
    code = main(["sample", "-cp", str(run), "-sp", str(tmp_path / "x.png"), "--device", "cpu",
                 *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_a_training_config_cannot_set_autoguidance_cfg(tmp_path, tiny_args, capsys):
    capsys.readouterr()
    assert main(["train", "-e", str(tmp_path / "run"), *tiny_args, "--model.num_classes", "10",
                 "--sample.autoguidance_cfg", "1.2", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leave it at 1 in a training config" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()
