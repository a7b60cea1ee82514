"""diffusers interop: small random diffusers models built here (no download), converted both ways,
compared output for output against diffusers itself."""

import copy
import json
from dataclasses import replace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pixeldiffusion.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pixeldiffusion.cli import main  # noqa: E402
from pixeldiffusion.config import load_config  # noqa: E402
from pixeldiffusion.convert import from_diffusers, to_diffusers  # noqa: E402
from pixeldiffusion.errors import CheckpointError  # noqa: E402
from pixeldiffusion.formulations import bridge_for, flow_t_of_sigma, unshift_t  # noqa: E402
from pixeldiffusion.generate import generate  # noqa: E402
from pixeldiffusion.samplers import (  # noqa: E402
    SAMPLERS,
    default_spacing,  # noqa: E402
    make_denoiser,
    sample,
)
from pixeldiffusion.schedule import (  # noqa: E402
    alphas_cumprod_at,
    alphas_cumprod_of,
    sampling_timesteps,
    sigma_of,
)
from pixeldiffusion.unet import build_unet  # noqa: E402

# The layout of google/ddpm-cifar10-32 (the DDPM release: TF "SAME" downsampling, [sin, cos]
# embedding, GroupNorm eps 1e-6, attention at the second level), shrunk to 3x16x16.
DDPM_RELEASE = dict(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                    attention_head_dim=None)
# diffusers' own defaults, as its training example writes them (two attention heads here).
DIFFUSERS_DEFAULTS = dict(attention_head_dim=8)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (both libraries zero some layers at init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def _diffusers_folder(path, layout, *, channels=3, scheduler=None, **changes):
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=channels, out_channels=channels,
        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), **{**layout, **changes})
    _randomize(unet, 0)
    scheduler = scheduler or diffusers.DDPMScheduler(num_train_timesteps=50)
    diffusers.DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(path)
    return unet.eval(), scheduler


def _inputs(channels=3, size=16):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, channels, size, size, generator=generator), torch.tensor([0, 17, 49])


@pytest.mark.parametrize("layout", [DDPM_RELEASE, DIFFUSERS_DEFAULTS],
                         ids=["ddpm-release", "diffusers-defaults"])
def test_import_matches_diffusers_outputs_and_schedule(tmp_path, layout):
    unet, scheduler = _diffusers_folder(tmp_path / "hf", layout)
    ours = load_checkpoint(from_diffusers(tmp_path / "hf", tmp_path / "m.safetensors")).model
    x, t = _inputs()
    with torch.no_grad():
        want, got = unet(x, t).sample, ours(x, t)
    diff = float((want - got).abs().max())
    print(f"import max abs difference: {diff:.2e} (outputs up to {float(want.abs().max()):.2f})")
    assert diff < 1e-5
    cfg = load_checkpoint(tmp_path / "m.safetensors").config
    torch.testing.assert_close(alphas_cumprod_of(cfg), scheduler.alphas_cumprod.double(),
                               rtol=0, atol=1e-6)


def test_export_loads_in_ddpm_pipeline_matches_and_round_trips(tmp_path, tiny_args):
    cfg = load_config(None, tiny_args + ["--model.num_heads", "2",
                                         "--diffusion.beta_schedule", "cosine",
                                         "--model.downsample_padding", "0"])
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    _randomize(model, 2)
    ckpt = save_checkpoint(tmp_path / "run", 7, model, copy.deepcopy(model), {}, cfg)
    out = tmp_path / "exported"
    assert main(["convert", "--to-diffusers", str(tmp_path / "run"), str(out)]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    x, t = _inputs(channels=1, size=32)
    with torch.no_grad():
        want, got = model.eval()(x, t), pipe.unet(x, t).sample
    diff = float((want - got).abs().max())
    print(f"export max abs difference: {diff:.2e} (outputs up to {float(want.abs().max()):.2f})")
    assert diff < 1e-5
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), alphas_cumprod_of(cfg),
                               rtol=0, atol=1e-6)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 1) and (images >= 0).all() and (images <= 1).all()
    # and back: the very same tensors
    assert main(["convert", "--from-diffusers", str(out), str(tmp_path / "back.safetensors")]) == 0
    back = load_checkpoint(tmp_path / "back.safetensors")
    original = load_checkpoint(ckpt)
    assert back.config.model == original.config.model
    assert back.config.diffusion.beta_schedule == "cosine"
    for key, value in original.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key


def test_sigmoid_schedule_exports_as_trained_betas(tmp_path, tiny_args):
    cfg = load_config(None, tiny_args + ["--diffusion.beta_schedule", "sigmoid",
                                         "--diffusion.prediction", "v"])
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    save_checkpoint(tmp_path / "run", 1, model, copy.deepcopy(model), {}, cfg)
    to_diffusers(tmp_path / "run", tmp_path / "out")
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "out", subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), alphas_cumprod_of(cfg),
                               rtol=0, atol=1e-6)
    back = load_checkpoint(from_diffusers(tmp_path / "out", tmp_path / "b.safetensors"))
    assert back.config.diffusion.beta_schedule == "sigmoid"
    assert back.config.diffusion.prediction == "v"


def test_our_ddim_on_an_imported_model_equals_diffusers_ddim(tmp_path):
    """Same weights, same noise, same timesteps: our DDIM sampler and diffusers' DDIMScheduler
    give the same images; and DPM-Solver++ (or DDIM) samples from the imported model."""
    unet, _ = _diffusers_folder(tmp_path / "hf", DDPM_RELEASE)
    loaded = load_checkpoint(from_diffusers(tmp_path / "hf", tmp_path / "m.safetensors"))
    ddim = diffusers.DDIMScheduler(num_train_timesteps=50, clip_sample=True)
    ddim.set_timesteps(5)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = x_T
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0,
                          use_clipped_model_output=True).prev_sample  # eps from clipped x0
    alphas_cumprod = alphas_cumprod_of(loaded.config)
    denoise = make_denoiser(loaded.model, alphas_cumprod, clip_x0=True)
    ours = SAMPLERS["ddim"](denoise, x_T, ddim.timesteps, alphas_cumprod, eta=0.0)
    diff = float((ours - x).abs().max())
    print(f"DDIM, 5 steps, ours vs diffusers: max abs difference {diff:.2e}")
    assert diff < 1e-4

    x0 = sample(loaded.model, x_T, alphas_cumprod, sampler="dpmpp_2m", steps=5)
    assert x0.shape == x_T.shape and torch.isfinite(x0).all() and x0.abs().max() <= 1 + 1e-5


def test_hub_style_flat_folder_with_old_attention_names(tmp_path):
    """google/ddpm-* repositories: files side by side, pre-0.15 names query/key/value/proj_attn."""
    unet, _ = _diffusers_folder(tmp_path / "hf", DDPM_RELEASE)
    from safetensors.torch import load_file

    flat = tmp_path / "flat"
    flat.mkdir()
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(tmp_path / "hf/unet/diffusion_pytorch_model.safetensors").items():
        for new_name, old_name in old.items():
            key = key.replace(f".{new_name}.", f".{old_name}.")
        state[key] = value
    assert any(".proj_attn." in k for k in state)
    torch.save(state, flat / "diffusion_pytorch_model.bin")
    (flat / "config.json").write_text((tmp_path / "hf/unet/config.json").read_text())
    (flat / "scheduler_config.json").write_text(
        (tmp_path / "hf/scheduler/scheduler_config.json").read_text())
    ours = load_checkpoint(from_diffusers(flat, tmp_path / "m.safetensors")).model
    x, t = _inputs()
    with torch.no_grad():
        assert float((unet(x, t).sample - ours(x, t)).abs().max()) < 1e-5


def _edit_config(folder, section, **changes):
    path = folder / section / ("config.json" if section == "unet" else "scheduler_config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(("section", "changes", "message"), [
    ("unet", {"down_block_types": ["DownBlock2D", "SkipDownBlock2D", "DownBlock2D"]},
     "down block 1 is a SkipDownBlock2D"),
    ("unet", {"up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]},
     "attention sits at different levels"),
    ("unet", {"_class_name": "UNet2DConditionModel"}, "is a UNet2DConditionModel"),
    ("unet", {"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ("scheduler", {"beta_schedule": "scaled_linear"}, r"'scaled_linear'\) match none"),
    ("scheduler", {"variance_type": "learned_range"}, "learned variance"),
    ("scheduler", {"_class_name": "ScoreSdeVeScheduler"},
     "scheduler ScoreSdeVeScheduler is not one pixeldiffusion reads"),
    ("scheduler", {"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction"},
     "EDM prediction_type 'v_prediction' is not supported"),
    ("scheduler", {"_class_name": "FlowMatchEulerDiscreteScheduler"},
     "num_train_timesteps 50 gives the network timesteps 50 t"),
    ("scheduler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "use_dynamic_shifting": True}, "use_dynamic_shifting is not supported"),
])
def test_unsupported_layouts_are_named(tmp_path, capsys, section, changes, message):
    _diffusers_folder(tmp_path / "hf", DDPM_RELEASE)
    _edit_config(tmp_path / "hf", section, **changes)
    with pytest.raises(CheckpointError, match=message):
        from_diffusers(tmp_path / "hf", tmp_path / "m.safetensors")
    assert main(["convert", "--from-diffusers", str(tmp_path / "hf"),
                 str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixeldiffusion: error:") and "Traceback" not in err
    assert not (tmp_path / "m.safetensors").exists()


def test_missing_files_and_conditional_export_have_clear_errors(tmp_path, tiny_args):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_diffusers(tmp_path / "empty", tmp_path / "m.safetensors")
    cfg = load_config(None, tiny_args + ["--model.num_classes", "10"])
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    save_checkpoint(tmp_path / "run", 1, model, copy.deepcopy(model), {}, cfg)
    with pytest.raises(CheckpointError, match="samples unconditionally"):
        to_diffusers(tmp_path / "run", tmp_path / "out")


def test_imported_model_samples_through_the_cli(tmp_path):
    _diffusers_folder(tmp_path / "hf", DDPM_RELEASE)
    assert main(["convert", "--from-diffusers", str(tmp_path / "hf"),
                 str(tmp_path / "m.safetensors")]) == 0
    grid = tmp_path / "grid.png"
    assert main(["sample", "-cp", str(tmp_path / "m.safetensors"), "--sampler", "ddim",
                 "--steps", "3", "-bs", "2", "-sp", str(grid), "--device", "cpu"]) == 0
    assert grid.is_file()


def test_exported_pipeline_reproduces_our_samples_with_the_same_seed(tmp_path, tiny_args):
    """``DDPMPipeline(...)(batch_size=N, num_inference_steps=S, generator=manual_seed(seed))`` is
    ``pixeldiffusion sample --steps S --seed seed -bs N`` with the default ddpm sampler and
    uniform (trailing) spacing: same noise, same timesteps, same images."""
    cfg = load_config(None, tiny_args)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    _randomize(model, 2)
    save_checkpoint(tmp_path / "run", 1, model, copy.deepcopy(model), {}, cfg)
    assert main(["convert", "--to-diffusers", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    scheduler = json.loads((tmp_path / "out/scheduler/scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing"

    loaded = load_checkpoint(tmp_path / "run")
    s = loaded.config.sample  # spacing None = the sampler's own (samplers.default_spacing)
    assert (s.sampler, s.spacing or default_spacing(s.sampler)) == ("ddpm", "uniform")
    sample_cfg = replace(loaded.config.sample, steps=20, seed=5, n_samples=2, batch_size=2)
    ours = generate(loaded.model, replace(loaded.config, sample=sample_cfg),
                    torch.device("cpu")).images
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, num_inference_steps=20, output_type="np",
                  generator=torch.Generator().manual_seed(5)).images   # [N, H, W, C] in [0, 1]
    diff = float(((ours.permute(0, 2, 3, 1) + 1) / 2 - torch.from_numpy(theirs)).abs().max())
    print(f"20-step samples, ours vs the exported DDPMPipeline: max abs difference {diff:.1e}")
    assert diff < 1e-4


def test_the_unet_runs_in_float64_and_agrees_with_float32(tmp_path, tiny_args):
    cfg = load_config(None, tiny_args)
    model = build_unet(cfg.model, in_channels=1, image_size=32)
    _randomize(model, 3)
    x, t = _inputs(channels=1, size=32)
    with torch.no_grad():
        single = model.eval()(x, t)
        double = copy.deepcopy(model).double()(x.double(), t)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- edm and flow export

EDM_ARGS = ["--diffusion.formulation", "edm", "--diffusion.sigma_data", "0.6"]
FLOW_ARGS = ["--diffusion.formulation", "flow", "--diffusion.prediction", "v",
             "--diffusion.shift", "3"]


def _exported(tmp_path, tiny_args, args):
    """A tiny random model of ``args``' formulation, saved and exported: (model, config, folder,
    the diffusers UNet2DModel loaded from the folder)."""
    cfg = load_config(None, tiny_args + args)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    _randomize(model, 2)
    save_checkpoint(tmp_path / "run", 1, model, copy.deepcopy(model), {}, cfg)
    out = tmp_path / "exported"
    assert main(["convert", "--to-diffusers", str(tmp_path / "run"), str(out)]) == 0
    return model.eval(), cfg, out, diffusers.UNet2DModel.from_pretrained(out, subfolder="unet")


def _our_samples(model, cfg, x_T, sampler, steps, spacing):
    """Our sampler on the formulation's bridge, without clipping (diffusers' schedulers clip
    nothing)."""
    bridge = bridge_for(cfg.diffusion)
    return sample(bridge.wrap(model), x_T, bridge.alphas_cumprod, sampler=sampler, steps=steps,
                  spacing=spacing, prediction=bridge.prediction, clip_x0=False)


@pytest.mark.parametrize(("scheduler", "sampler"), [("EDMEulerScheduler", "euler"),
                                                    ("EDMDPMSolverMultistepScheduler", "dpmpp_2m")])
def test_edm_export_samples_as_ours_in_diffusers(tmp_path, tiny_args, scheduler, sampler):
    """EDM's preconditioning (c_in, c_noise = ln(sigma)/4, c_skip, c_out, sigma_data 0.6) is the
    exported scheduler's: its loop on its karras sigmas is our sampler on the karras spacing."""
    model, cfg, out, unet = _exported(tmp_path, tiny_args, EDM_ARGS)
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == \
        ["diffusers", "EDMEulerScheduler"]
    x_T = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    ours = _our_samples(model, cfg, x_T, sampler, 6, "karras")
    edm = getattr(diffusers, scheduler).from_pretrained(out, subfolder="scheduler")
    edm.set_timesteps(6)
    x = x_T * edm.init_noise_sigma  # = x_T / sqrt(abar) at sigma_max, our VP start
    with torch.no_grad():
        for t in edm.timesteps:  # t = c_noise
            x = edm.step(unet(edm.scale_model_input(x, t), t).sample, t, x).prev_sample
    diff = float((ours - x).abs().max())
    print(f"edm, {scheduler} vs our {sampler}, 6 steps: max abs difference {diff:.1e} "
          f"(samples up to {float(ours.abs().max()):.2f})")
    assert diff < 1e-4


def test_edm_export_runs_in_the_pipeline_it_names(tmp_path, tiny_args):
    """model_index.json names ConsistencyModelPipeline: its loop (noise * init_noise_sigma,
    scale_model_input, step) with the same seed draws our euler samples."""
    model, cfg, out, _ = _exported(tmp_path, tiny_args, EDM_ARGS)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "ConsistencyModelPipeline"
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, num_inference_steps=5, output_type="pt",
                  generator=torch.Generator().manual_seed(4)).images  # [N, C, H, W] in [0, 1]
    x_T = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    ours = _our_samples(model, cfg, x_T, "euler", 5, "karras")
    assert float(((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max()) < 1e-4


def test_flow_export_samples_as_ours_in_diffusers(tmp_path, tiny_args):
    """Flow v-prediction, shift 3: FlowMatchEulerDiscreteScheduler on our flow times (given
    unshifted; it applies the shift) from our start is our euler on the uniform spacing; and
    the DDPMPipeline that model_index.json names runs that scheduler's loop from pure noise."""
    model, cfg, out, unet = _exported(tmp_path, tiny_args, FLOW_ARGS)
    x_T = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    ours = _our_samples(model, cfg, x_T, "euler", 6, "uniform")
    table = bridge_for(cfg.diffusion).alphas_cumprod
    timesteps = sampling_timesteps(len(table), 6, "uniform", table).double()
    t_flow = flow_t_of_sigma(sigma_of(alphas_cumprod_at(table, timesteps)))
    flow = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    flow.set_timesteps(sigmas=unshift_t(t_flow, cfg.diffusion.shift).tolist())
    torch.testing.assert_close(flow.sigmas[:-1].double(), t_flow, rtol=1e-6, atol=0)
    t_0 = t_flow[0].item()  # our x_T is VP-scaled: x = x_T sqrt((1 - t)^2 + t^2)
    x = x_T * ((1 - t_0) ** 2 + t_0**2) ** 0.5
    with torch.no_grad():
        for t in flow.timesteps:  # t = 1000 t_flow, our c_noise
            x = flow.step(unet(x, t).sample, t, x).prev_sample
    diff = float((ours - x).abs().max())
    print(f"flow, FlowMatchEulerDiscreteScheduler vs our euler, 6 steps: max abs difference "
          f"{diff:.1e} (samples up to {float(ours.abs().max()):.2f})")
    assert diff < 1e-4

    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert (type(pipe).__name__, type(pipe.scheduler).__name__) == \
        ("DDPMPipeline", "FlowMatchEulerDiscreteScheduler")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, num_inference_steps=4, output_type="pt",
                  generator=torch.Generator().manual_seed(5)).images
    flow.set_timesteps(4)  # diffusers' own grid, from t = 1
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in flow.timesteps:
            x = flow.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(theirs, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("args", [EDM_ARGS, FLOW_ARGS], ids=["edm", "flow"])
def test_edm_and_flow_folders_import_as_their_formulation(tmp_path, tiny_args, args):
    """Export -> import: the same tensors, the same formulation and its keys; never DDPM."""
    model, cfg, out, _ = _exported(tmp_path, tiny_args, args)
    back = load_checkpoint(from_diffusers(out, tmp_path / "back.safetensors"))
    d, b = cfg.diffusion, back.config.diffusion
    assert (b.formulation, b.sigma_data, b.shift) == (d.formulation, d.sigma_data, d.shift)
    assert (b.prediction, b.sigma_min, b.sigma_max) == (d.prediction, d.sigma_min, d.sigma_max)
    assert back.config.sample.sampler == "euler" and not back.config.sample.clip_x0
    for key, value in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key
    assert main(["convert", "--to-diffusers", str(tmp_path / "back.safetensors"),
                 str(tmp_path / "again")]) == 0
    scheduler = json.loads((tmp_path / "again/scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == {"edm": "EDMEulerScheduler",
                                        "flow": "FlowMatchEulerDiscreteScheduler"}[d.formulation]


@pytest.mark.parametrize(("args", "message"), [
    (["--diffusion.formulation", "flow", "--diffusion.prediction", "x0"],
     "a diffusion.formulation flow checkpoint with diffusion.prediction x0 cannot be exported: "
     "diffusers' FlowMatchEulerDiscreteScheduler steps with the network's output as the "
     "velocity"),
    (["--diffusion.formulation", "edm", "--consistency.method", "ect", "--sample.sampler",
      "consistency", "--sample.steps", "2"],
     r"a consistency model \(consistency.method ect\) cannot be exported"),
], ids=["flow-x0", "consistency"])
def test_what_no_folder_samples_as_we_do_is_refused(tmp_path, tiny_args, capsys, args, message):
    cfg = load_config(None, tiny_args + args)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    save_checkpoint(tmp_path / "run", 1, model, copy.deepcopy(model), {}, cfg)
    with pytest.raises(CheckpointError, match=message):
        to_diffusers(tmp_path / "run", tmp_path / "out")
    assert main(["convert", "--to-diffusers", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixeldiffusion: error:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
