"""Classifier-free guidance: the formula, one batched forward pass, label dropout, class choice,
and a tiny conditional model trained and sampled through the CLI."""

import importlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pixeldiffusion.cli import main
from pixeldiffusion.config import load_config
from pixeldiffusion.diffusion import x0_eps_from_output
from pixeldiffusion.errors import ConfigError, PixelDiffusionError
from pixeldiffusion.generate import generate
from pixeldiffusion.guidance import (
    class_labels,
    drop_labels,
    guided_model,
    parse_class,
    sampling_labels,
)
from pixeldiffusion.samplers import SAMPLERS, sample
from pixeldiffusion.schedule import (
    alphas_cumprod_from_betas,
    alphas_cumprod_of,
    make_betas,
    sigma_of,
)

train_module = importlib.import_module("pixeldiffusion.train")
formulations = importlib.import_module("pixeldiffusion.formulations")


class ToyConditional(torch.nn.Module):
    """out = x_t * (y + 1) + t: a different, known output for every label; counts its calls."""

    null_class = 10

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, x_t, t, y=None):
        self.batch_sizes.append(x_t.shape[0])
        scale = (y.to(x_t.dtype) + 1).reshape(-1, 1, 1, 1)
        return x_t * scale + t.to(x_t.dtype).reshape(-1, 1, 1, 1)


class LinearConditional(torch.nn.Module):
    """A random conditional network: a 1x1 conv of x_t plus a per-class and per-t bias."""

    null_class = 3

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(2, 2, generator=generator)
        self.class_bias = torch.randn(4, 2, generator=generator)

    def forward(self, x_t, t, y=None):
        out = torch.einsum("oc,nchw->nohw", self.weight, x_t)
        return out + self.class_bias[y][:, :, None, None] + 1e-3 * t.reshape(-1, 1, 1, 1)


def test_guidance_formula_matches_a_hand_computation():
    model = ToyConditional()
    x_t = torch.ones(2, 1, 2, 2)
    t = torch.tensor([5, 5])
    out = guided_model(model, torch.tensor([2, 0]), 3.0)(x_t, t)
    # cond: 1 * (2 + 1) + 5 = 8 and 1 * (0 + 1) + 5 = 6; uncond (null 10): 1 * 11 + 5 = 16
    # eps_uncond + w (eps_cond - eps_uncond) = 16 + 3 (8 - 16) = -8 and 16 + 3 (6 - 16) = -14
    assert torch.equal(out[0], torch.full((1, 2, 2), -8.0))
    assert torch.equal(out[1], torch.full((1, 2, 2), -14.0))
    assert torch.equal(guided_model(model, torch.tensor([2, 0]), 1.0)(x_t, t)[:, 0, 0, 0],
                       torch.tensor([8.0, 6.0]))          # w = 1: conditional
    assert torch.equal(guided_model(model, torch.tensor([2, 0]), 0.0)(x_t, t)[:, 0, 0, 0],
                       torch.tensor([16.0, 16.0]))        # w = 0: unconditional


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_cond_and_uncond_are_one_forward_call_per_step_with_every_sampler(sampler):
    model = ToyConditional()
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("linear", 100, 1e-4, 0.02))
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    net = guided_model(model, torch.tensor([1, 2, 3]), 2.5)
    sample(net, x_T, alphas_cumprod, sampler=sampler, steps=7, clip_x0=False)
    guided_calls = list(model.batch_sizes)
    model.batch_sizes.clear()
    sample(guided_model(model, torch.tensor([1, 2, 3]), 1.0), x_T, alphas_cumprod,
           sampler=sampler, steps=7, clip_x0=False)
    # as many calls as the sampler makes unguided (7 for one-call-per-step samplers), each ONE
    # call on [x_t; x_t] (2 x 3); w = 1 needs no unconditional half
    assert len(guided_calls) == len(model.batch_sizes) >= 7
    assert set(guided_calls) == {6} and set(model.batch_sizes) == {3}
    if sampler in ("ddim", "ddpm"):
        assert len(guided_calls) == 7


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guiding_x0_and_v_outputs_is_guiding_eps(prediction):
    """For any parameterisation, the guided output implies eps_u + w (eps_c - eps_u)."""
    model, w = LinearConditional(), 4.0
    x_t = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([40, 40])
    abar = torch.tensor(0.3, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    model.weight, model.class_bias = model.weight.double(), model.class_bias.double()
    _, eps_cond = x0_eps_from_output(prediction, model(x_t, t, labels), x_t, abar)
    _, eps_uncond = x0_eps_from_output(prediction, model(x_t, t, torch.full_like(labels, 3)),
                                       x_t, abar)
    _, eps_guided = x0_eps_from_output(prediction, guided_model(model, labels, w)(x_t, t), x_t,
                                       abar)
    torch.testing.assert_close(eps_guided, eps_uncond + w * (eps_cond - eps_uncond))


def test_guidance_interval_guides_only_inside_it():
    model = ToyConditional()
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("linear", 100, 1e-4, 0.02))
    sigmas = [sigma_of(float(a)) for a in alphas_cumprod]
    lo, hi = sigmas[30], sigmas[70]  # guide at t in 31..70 only
    net = guided_model(model, torch.tensor([4]), 2.0, alphas_cumprod=alphas_cumprod,
                       interval=(lo, hi))
    x_t = torch.ones(1, 1, 1, 1)
    for t in (0, 30, 31, 70, 71, 99):
        model.batch_sizes.clear()
        out = float(net(x_t, torch.tensor([t])))
        inside = 31 <= t <= 70
        assert model.batch_sizes == [2 if inside else 1]
        cond, uncond = 5.0 + t, 11.0 + t
        assert out == pytest.approx(uncond + 2.0 * (cond - uncond) if inside else cond)
    assert sigma_of(0.2) == pytest.approx(math.sqrt(0.8 / 0.2))


def test_label_dropout_rate_is_p_uncond():
    y = torch.arange(20_000) % 10
    generator = torch.Generator().manual_seed(0)
    dropped = drop_labels(y, 0.25, 10, generator)
    is_null = dropped == 10
    assert abs(float(is_null.float().mean()) - 0.25) < 0.01  # 4 sigma = 0.012
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(drop_labels(y, 0.0, 10, generator), y)
    assert bool((drop_labels(y, 1.0, 10, generator) == 10).all())


def test_training_drops_labels_at_the_configured_rate(tmp_path, tiny_args, monkeypatch):
    seen = []

    def recording_loss(model, x0, alphas_cumprod, **kwargs):
        seen.append(kwargs["y"].clone())
        return sum(p.sum() for p in model.parameters()) * 0.0  # no forward: only the labels count

    monkeypatch.setattr(formulations, "training_loss", recording_loss)  # the loop's DDPM loss
    cfg = load_config(None, [*tiny_args, "--model.num_classes", "10", "--train.p_uncond", "0.3",
                             "--train.steps", "30", "--train.batch_size", "32",
                             "--train.log_every", "30", "--sample.n_samples", "1"])
    train_module.train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    labels = torch.cat(seen)
    assert labels.shape == (960,) and int(labels.min()) >= 0 and int(labels.max()) <= 10
    rate = float((labels == 10).float().mean())
    assert abs(rate - 0.3) < 0.06, rate  # 4 sigma of 960 draws = 0.059


def test_class_choice_by_index_name_all_and_random():
    names = ("airplane", "automobile", "bird", "cat")
    assert parse_class("cat", 4, names) == 3
    assert parse_class("2", 4, names) == 2 and parse_class(1, 4, names) == 1
    assert class_labels("all", 99, 4, names, per_class=2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert class_labels("bird", 3, 4, names).tolist() == [2, 2, 2]
    drawn = class_labels("random", 400, 4, names, seed=1)
    assert torch.equal(drawn, class_labels("random", 400, 4, names, seed=1))
    assert set(drawn.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("spec, message", [
    ("12", "class 12 is out of range: this model has 4 classes, 0..3"),
    ("-1", "class -1 is out of range"),
    ("cta", "unknown class 'cta'; did you mean 'cat'? valid classes: 0 (airplane), "
            "1 (automobile), 2 (bird), 3 (cat), or all / random"),
])
def test_bad_class_choices_list_the_valid_ones(spec, message):
    with pytest.raises(PixelDiffusionError, match="valid classes") as caught:
        parse_class(spec, 4, ("airplane", "automobile", "bird", "cat"))
    assert message in str(caught.value)


def test_unconditional_configs_refuse_class_and_guidance(tiny_config):
    assert sampling_labels(tiny_config) == (None, 1.0)
    with pytest.raises(PixelDiffusionError, match="--guidance 2 needs a class-conditional"):
        sampling_labels(tiny_config, guidance=2.0)
    with pytest.raises(PixelDiffusionError, match="--class 3 needs a class-conditional"):
        sampling_labels(tiny_config, class_label="3")


def test_config_checks_class_names_and_guidance_interval(tiny_args):
    with pytest.raises(ConfigError, match="one name per class"):
        load_config(None, [*tiny_args, "--model.num_classes", "3", "--model.class_names", "a,b"])
    with pytest.raises(ConfigError, match="sigma_lo < sigma_hi"):
        load_config(None, [*tiny_args, "--sample.guidance_interval", "5,1"])
    cfg = load_config(None, [*tiny_args, "--sample.guidance_interval", "0.3,5"])
    assert cfg.sample.guidance_interval == (0.3, 5.0)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, tiny_args):
    run_dir = tmp_path_factory.mktemp("cond") / "run"
    assert main(["train", "-e", str(run_dir), *tiny_args, "--model.num_classes", "10",
                 "--no_progress"]) == 0
    return run_dir


def test_conditional_model_samples_every_class_through_the_cli(digits_run, tmp_path):
    grid = tmp_path / "grid.png"
    assert main(["sample", "-cp", str(digits_run), "--class", "all", "--guidance", "2",
                 "--nrow", "2", "-sp", str(grid), "--save_dir", str(tmp_path / "each"),
                 "--steps", "3", "--sampler", "ddim"]) == 0
    npz = np.load(tmp_path / "each" / "samples.npz")
    assert npz["labels"].tolist() == [k for k in range(10) for _ in range(2)]
    assert npz["images"].shape == (20, 32, 32, 1)
    assert Image.open(grid).size == (2 * 34 + 2, 10 * 34 + 2)  # one row per class
    assert main(["sample", "-cp", str(digits_run), "--class", "7", "-bs", "3", "--steps", "2",
                 "-sp", str(grid), "--save_dir", str(tmp_path / "seven")]) == 0
    assert np.load(tmp_path / "seven" / "samples.npz")["labels"].tolist() == [7, 7, 7]


@pytest.mark.parametrize("args, message", [
    (["--class", "10"], "class 10 is out of range: this model has 10 classes, 0..9; valid "
                        "classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, or all / random"),
    (["--class", "seven"], "unknown class 'seven'; valid classes: 0, 1, 2"),
])
def test_conditional_cli_rejects_bad_classes(digits_run, tmp_path, capsys, args, message):
    assert main(["sample", "-cp", str(digits_run), *args, "-sp", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixeldiffusion: error: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args", [["--guidance", "3"], ["--class", "3"], ["--guidance", "1"]])
def test_unconditional_checkpoint_refuses_guidance_and_class(tmp_path, tiny_args, capsys, args):
    run_dir = tmp_path / "run"
    assert main(["train", "-e", str(run_dir), *tiny_args, "--train.steps", "1",
                 "--no_progress"]) == 0
    capsys.readouterr()
    assert main(["sample", "-cp", str(run_dir), *args, "-sp", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "needs a class-conditional model, but this one is unconditional" in err
    assert "drop --class and --guidance" in err and "Traceback" not in err


def test_folder_class_names_travel_with_the_checkpoint(tmp_path, tiny_args, capsys):
    generator = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for k in range(4):
            pixels = generator.integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "pics" / name / f"{k}.png")
    run_dir = tmp_path / "run"
    assert main(["train", "-e", str(run_dir), *tiny_args, "--data.dataset", "folder",
                 "--data.root", str(tmp_path / "pics"), "--data.class_labels", "true",
                 "--data.num_workers", "0", "--model.num_classes", "2", "--train.steps", "2",
                 "--no_progress"]) == 0
    assert main(["sample", "-cp", str(run_dir), "--class", "dog", "-bs", "2", "--steps", "2",
                 "-sp", str(tmp_path / "g.png"), "--save_dir", str(tmp_path / "each")]) == 0
    assert np.load(tmp_path / "each" / "samples.npz")["labels"].tolist() == [1, 1]
    capsys.readouterr()
    assert main(["sample", "-cp", str(run_dir), "--class", "dgo",
                 "-sp", str(tmp_path / "g.png")]) == 2
    assert ("unknown class 'dgo'; did you mean 'dog'? valid classes: 0 (cat), 1 (dog), or all / "
            "random") in capsys.readouterr().err


def test_generate_api_takes_class_and_guidance(tiny_args):
    from pixeldiffusion.unet import build_unet

    cfg = load_config(None, [*tiny_args, "--model.num_classes", "10"])
    torch.manual_seed(0)
    model = build_unet(cfg.model, in_channels=1, image_size=32).eval()
    with torch.no_grad():  # the last conv starts at zero (DDPM); give every weight some value
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    out = generate(model, cfg, torch.device("cpu"), class_label="4", guidance=3.0)
    assert out.labels.tolist() == [4] * cfg.sample.n_samples
    assert out.images.shape == (cfg.sample.n_samples, 1, 32, 32)
    assert float(out.images.abs().max()) <= 1.0
    plain = generate(model, cfg, torch.device("cpu"), class_label="4", guidance=1.0)
    assert not torch.equal(plain.images, out.images)  # w changes the samples
    assert alphas_cumprod_of(cfg).shape == (cfg.diffusion.timesteps,)
