"""The formulations wired through the library (issue 18, phase 2a): training with each
formulation's loss, exact resume, sampling through the bridge everywhere, DDPM bit-identical to
before, the configs, and the real CLI end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pixeldiffusion.checkpoint import load_checkpoint
from pixeldiffusion.cli import main
from pixeldiffusion.config import load_config
from pixeldiffusion.formulations import (
    DDPMLoss,
    EDMLoss,
    FlowLoss,
    bridge_for,
    ddpm_alphas_cumprod,
    edm_alphas_cumprod,
    flow_alphas_cumprod,
    loss_for,
)
from pixeldiffusion.generate import generate
from pixeldiffusion.run import train
from pixeldiffusion.samplers import sample
from pixeldiffusion.schedule import alphas_cumprod_of, make_betas
from pixeldiffusion.unet import build_unet
from test_formulations import MU, S, bridged_oracle, gaussian_denoiser

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FORMULATION_ARGS = {
    "ddpm": [],
    "edm": ["--diffusion.formulation", "edm"],
    "flow": ["--diffusion.formulation", "flow", "--diffusion.prediction", "v"],
}
QUIET = {"progress": False, "log": lambda *_: None}


# ---------------------------------------------------------------------------------------------
# One home for the tables; the loop is handed the configured formulation's loss


@pytest.mark.parametrize("name", FORMULATION_ARGS)
def test_alphas_cumprod_of_is_the_formulations_table(name):
    cfg = load_config(None, FORMULATION_ARGS[name])
    d = cfg.diffusion
    expected = {"ddpm": lambda: ddpm_alphas_cumprod(d),
                "edm": lambda: edm_alphas_cumprod(d.timesteps, d.sigma_min, d.sigma_max),
                "flow": lambda: flow_alphas_cumprod(d.timesteps, d.sigma_min, d.sigma_max,
                                                    d.shift)}[name]()
    assert torch.equal(alphas_cumprod_of(cfg), expected)
    assert torch.equal(bridge_for(d).alphas_cumprod, expected)
    assert alphas_cumprod_of(cfg).dtype == torch.float64


def test_the_ddpm_table_is_the_beta_schedule():
    cfg = load_config(None, ["--diffusion.beta_schedule", "cosine"])
    betas = make_betas("cosine", 1000)
    torch.testing.assert_close(alphas_cumprod_of(cfg), torch.cumprod(1 - betas, 0), rtol=0,
                               atol=0)


@pytest.mark.parametrize("name, kind", [("ddpm", DDPMLoss), ("edm", EDMLoss), ("flow", FlowLoss)])
def test_the_loop_trains_the_configured_formulations_loss(tmp_path, tiny_args, name, kind,
                                                          monkeypatch):
    """train() with no loss_fn uses loss_for(cfg.diffusion): every step calls that loss."""
    calls = []
    real_call = kind.__call__

    def counted(self, *args, **kwargs):
        calls.append(type(self))
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(kind, "__call__", counted)
    cfg = load_config(None, tiny_args + FORMULATION_ARGS[name] + ["--train.steps", "2"])
    assert isinstance(loss_for(cfg.diffusion), kind)
    result = train(cfg, tmp_path / "run", **QUIET)
    assert calls == [kind, kind]
    saved = load_checkpoint(result.checkpoint).config.diffusion
    assert saved == cfg.diffusion and saved.formulation == name


@pytest.mark.parametrize("name", FORMULATION_ARGS)
def test_resume_continues_exactly_for_every_formulation(tmp_path, tiny_args, name):
    """N + M steps in one go == N steps, stop, resume, M steps, for each formulation's loss (its
    noise levels and noise come from the run's generator, which the checkpoint restores)."""
    args = tiny_args + FORMULATION_ARGS[name] + ["--data.random_flip", "true",
                                                 "--train.warmup_steps", "5"]
    straight = train(load_config(None, args + ["--train.steps", "6"]), tmp_path / "a", **QUIET)
    train(load_config(None, args + ["--train.steps", "3"]), tmp_path / "b", **QUIET)
    resumed = train(load_config(None, args + ["--train.steps", "6"]), tmp_path / "b",
                    resume="auto", **QUIET)
    assert resumed.step == straight.step == 6
    a = load_file(str(straight.checkpoint / "weights.safetensors"))
    b = load_file(str(resumed.checkpoint / "weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert load_checkpoint(resumed.checkpoint).config.diffusion.formulation == name


# ---------------------------------------------------------------------------------------------
# DDPM samples exactly as before the bridge


# sum and abs-sum of generate()'s 4 images (1x32x32, fp32, CPU) from a tiny UNet built with
# torch.manual_seed(0), computed with the code before sampling went through the bridge
DDPM_FINGERPRINTS = {
    ("ddim", ()): (-54.959968536160886, 2860.340138268657),
    ("ddpm", ()): (-56.249004107899964, 2809.96518360544),
    ("dpmpp_2m", ("--diffusion.prediction", "v")): (-50.59228713106131, 2340.542527970567),
    ("heun", ("--diffusion.beta_schedule", "cosine")): (-63.76046270132065, 4095.3259269595146),
}


@pytest.mark.parametrize("sampler, extra", list(DDPM_FINGERPRINTS), ids=lambda v: str(v))
def test_ddpm_samples_are_those_of_before_the_bridge(tiny_args, sampler, extra):
    torch.set_num_threads(1)  # the reference was computed single-threaded
    cfg = load_config(None, tiny_args + ["--sample.sampler", sampler, "--sample.precision",
                                         "fp32", *extra])
    torch.manual_seed(0)
    net = build_unet(cfg.model, in_channels=cfg.data.channels,
                     image_size=cfg.data.image_size).eval()
    images = generate(net, cfg, torch.device("cpu")).images.double()
    total, absolute = DDPM_FINGERPRINTS[(sampler, extra)]
    # Recorded on the AMD EPYC (AVX-512) with torch 2.13, where they hold to the last digit. Other
    # CPUs take other oneDNN kernels: an Intel Xeon with AMX and torch 2.11 gave sums 2-4e-8 off,
    # relatively. 1e-6 of the sum still fails on any change to the math or the sampler's steps.
    assert images.sum().item() == pytest.approx(total, rel=1e-6, abs=1e-6)
    assert images.abs().sum().item() == pytest.approx(absolute, rel=1e-6, abs=1e-6)


def test_ddpm_bridge_is_the_raw_network_path(tiny_config):
    """For DDPM the bridge hands the samplers the network itself, its table and prediction."""
    cfg = tiny_config
    bridge = bridge_for(cfg.diffusion)
    net = build_unet(cfg.model, in_channels=1, image_size=32).eval()
    assert bridge.wrap(net) is net and bridge.prediction == cfg.diffusion.prediction
    x_T = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    table = torch.cumprod(1 - make_betas(cfg.diffusion.beta_schedule, cfg.diffusion.timesteps),
                          0)
    raw = sample(net, x_T, table, sampler="ddim", steps=3, prediction="eps")
    bridged = sample(bridge.wrap(net), x_T, bridge.alphas_cumprod, sampler="ddim", steps=3,
                     prediction=bridge.prediction)
    assert torch.equal(raw, bridged)


# ---------------------------------------------------------------------------------------------
# Which samplers apply: all of them (DDPM's fixed_large variance included)


@pytest.mark.parametrize("case", [("ddpm", None), ("edm", None), ("flow", "v")],
                         ids=["ddpm", "edm", "flow"])
def test_ddpm_fixed_large_draws_the_data_through_every_bridge(case):
    """fixed_large's beta = 1 - abar_t / abar_prev is the VP forward transition between two
    table entries, defined for any table: on N(MU, S^2) data at 1000 steps it draws the right
    mean and std through the EDM and flow bridges as it does on DDPM's betas."""
    bridge, model = bridged_oracle(case, gaussian_denoiser(MU, S))
    x_T = torch.randn(2000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x0 = sample(model, x_T, bridge.alphas_cumprod, sampler="ddpm", steps=1000,
                var_type="fixed_large", prediction=bridge.prediction, clip_x0=False,
                generator=torch.Generator().manual_seed(3))
    assert abs(x0.mean().item() - MU) < 0.02
    assert x0.std().item() == pytest.approx(S, rel=0.015)


# ---------------------------------------------------------------------------------------------
# The configs


@pytest.mark.parametrize("name", ["mnist_edm", "mnist_flow", "cifar10_edm", "cifar10_flow"])
def test_formulation_configs_load_and_train_two_steps(tmp_path, name):
    """Each config loads as written; its diffusion, train and sample sections then train 2 steps
    and sample, on a tiny UNet and the built-in digits (CIFAR-10 would need a download)."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    formulation = name.split("_")[1]
    assert cfg.diffusion.formulation == formulation
    small = ["--model.channels", "8", "--model.channel_mult", "1,2", "--model.num_res_blocks",
             "1", "--model.attn_resolutions", "16", "--model.norm_groups", "4",
             "--data.dataset", "digits", "--data.channels", "1", "--train.batch_size", "4",
             "--train.steps", "2", "--train.warmup_steps", "1", "--train.save_every", "0",
             "--train.sample_every", "0", "--train.eval_samples", "0", "--sample.steps", "2",
             "--sample.n_samples", "2"]
    result = train(load_config(CONFIGS / f"{name}.yaml", small), tmp_path / "run", **QUIET)
    loaded = load_checkpoint(result.checkpoint)
    assert result.step == 2 and loaded.config.diffusion == cfg.diffusion
    images = generate(loaded.model, loaded.config, torch.device("cpu")).images
    assert images.shape == (2, 1, 32, 32) and bool(torch.isfinite(images).all())


# ---------------------------------------------------------------------------------------------
# The real CLI, end to end


@pytest.fixture(scope="module", params=list(FORMULATION_ARGS))
def cli_run(request, tmp_path_factory):
    from conftest import TINY

    run = tmp_path_factory.mktemp(f"cli-{request.param}") / "run"
    assert main(["train", "-e", str(run), "--no_progress", *TINY,
                 *FORMULATION_ARGS[request.param]]) == 0
    return request.param, run


@pytest.mark.parametrize("sampler", ["heun", "euler_ancestral"])
def test_cli_samples_every_formulation(cli_run, tmp_path, sampler):
    """A deterministic and a stochastic sampler on each formulation's checkpoint, each twice
    with one seed: the same images both times; another seed changes the stochastic ones."""
    name, run = cli_run
    outputs = []
    for k, seed in enumerate((0, 0, 1)):
        npz_dir = tmp_path / f"s{k}"
        assert main(["sample", "-cp", str(run), "--sampler", sampler, "--steps", "3",
                     "--seed", str(seed), "--n_samples", "4", "-sp", str(tmp_path / f"{k}.png"),
                     "--save_dir", str(npz_dir), "--device", "cpu"]) == 0
        outputs.append(np.load(npz_dir / "samples.npz")["images"])
    assert outputs[0].shape == (4, 32, 32, 1)
    assert np.array_equal(outputs[0], outputs[1])  # same seed, same images
    assert not np.array_equal(outputs[0], outputs[2])  # another seed: other noise, other images


def test_cli_evaluates_every_formulation_with_a_two_point_sweep(cli_run, tmp_path):
    name, run = cli_run
    out = tmp_path / "eval"
    assert main(["eval", "-cp", str(run), "-n", "4", "--micro_batch", "4",
                 "--sweep", "sampler=euler,ddpm", "--steps", "2", "--out", str(out),
                 "--no_progress"]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("euler") and rows[2].startswith("ddpm")


def test_sample_cannot_change_the_checkpoints_formulation(cli_run, tmp_path, capsys):
    name, run = cli_run
    other = "flow" if name != "flow" else "edm"
    with pytest.raises(SystemExit) as exited:  # argparse's own exit
        main(["sample", "-cp", str(run), "--diffusion.formulation", other,
              "-sp", str(tmp_path / "x.png")])
    assert exited.value.code == 2 and not (tmp_path / "x.png").exists()
    assert "unrecognized arguments: --diffusion.formulation" in capsys.readouterr().err


def test_every_formulation_exports_with_its_own_scheduler(cli_run, tmp_path):
    """The exported folder's scheduler calls the network as its formulation does; an edm or
    flow checkpoint is never written as a DDPM one (tests/test_convert.py samples them)."""
    name, run = cli_run
    out = tmp_path / "diffusers"
    assert main(["convert", "--to_diffusers", str(run), str(out)]) == 0
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == {"ddpm": "DDPMScheduler", "edm": "EDMEulerScheduler",
                                        "flow": "FlowMatchEulerDiscreteScheduler"}[name]


def test_inpaint_and_interpolate_go_through_the_bridge(cli_run, tmp_path):
    """RePaint and interpolation on each formulation's checkpoint: the kept pixels are the
    image's exactly (the bridge changes the network's parameterisation, not the process)."""
    from PIL import Image

    from pixeldiffusion.edit import inpaint, interpolate

    name, run = cli_run
    loaded = load_checkpoint(run)
    image = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = inpaint(loaded, tmp_path / "image.png", tmp_path / "mask.png", n_samples=2,
                     steps=4, jump_length=2, jump_n_sample=2, seed=0, device=torch.device("cpu"))
    pixels = ((result.images + 1) * 127.5).round()[:, 0]
    keep = torch.from_numpy(mask == 0)
    assert torch.equal(pixels[:, keep], torch.from_numpy(image)[keep].float().expand(2, -1))
    frames = interpolate(loaded, n_frames=3, seeds=(0, 1), steps=3, device=torch.device("cpu"))
    assert frames.shape == (3, 1, 32, 32) and bool(torch.isfinite(frames).all())
