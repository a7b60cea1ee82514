import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from pixeldiffusion.checkpoint import (
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_training_state,
    read_metadata,
    resolve_weights_path,
    save_checkpoint,
)
from pixeldiffusion.config import load_config
from pixeldiffusion.errors import CheckpointError
from pixeldiffusion.unet import build_unet


def _models(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_unet(cfg.model, in_channels=1, image_size=32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    ema = build_unet(cfg.model, in_channels=1, image_size=32)
    ema.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
    return model, ema


def test_round_trip_builds_the_model_from_the_file_alone(tmp_path, tiny_config):
    model, ema = _models(tiny_config)
    ckpt = save_checkpoint(tmp_path, 7, model, ema, {"step": 7}, tiny_config)
    weights = ckpt / "weights.safetensors"
    meta = read_metadata(weights)
    assert meta["step"] == "7" and meta["pixeldiffusion_version"]
    assert json.loads(meta["config"])["model"]["channels"] == 8
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 40])
    for use_ema, source in ((True, ema), (False, model)):
        loaded = load_checkpoint(weights, use_ema=use_ema)
        assert loaded.step == 7 and loaded.config == tiny_config
        torch.testing.assert_close(loaded.model(x, t), source.eval()(x, t))
    assert load_training_state(ckpt) == {"step": 7}


def test_paths_resolve_from_run_dir_checkpoint_dir_or_file(tmp_path, tiny_config):
    model, ema = _models(tiny_config)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, ema, {"step": step}, tiny_config, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    newest = tmp_path / "checkpoints" / "step-0000004" / "weights.safetensors"
    assert resolve_weights_path(tmp_path) == newest
    assert resolve_weights_path(newest.parent) == newest
    assert resolve_weights_path(newest) == newest
    (tmp_path / "checkpoints" / ".step-0000005.tmp").mkdir()  # an interrupted write
    assert latest_checkpoint(tmp_path) == newest.parent


def test_missing_and_foreign_files_give_one_clear_error(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "notes.txt")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a pixeldiffusion checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_truncated_checkpoint_is_reported(tmp_path, tiny_config):
    model, ema = _models(tiny_config)
    weights = save_checkpoint(tmp_path, 1, model, ema, {}, tiny_config) / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(weights)


def test_another_architecture_lists_the_mismatch(tmp_path, tiny_config):
    model, ema = _models(tiny_config)
    weights = save_checkpoint(tmp_path, 1, model, ema, {}, tiny_config) / "weights.safetensors"
    other = load_config(None, ["--model.channels", "16", "--model.channel_mult", "1,2",
                               "--model.norm_groups", "4", "--model.attn_resolutions", "16"])
    from safetensors.torch import load_file

    from pixeldiffusion.checkpoint import load_state_checked
    state = {k[4:]: v for k, v in load_file(str(weights)).items() if k.startswith("ema.")}
    with pytest.raises(CheckpointError, match=r"does not fit .*shape: .*checkpoint \(8,"):
        load_state_checked(build_unet(other.model, in_channels=1, image_size=32), state, "x")


def test_a_pickle_payload_in_the_training_state_never_runs(tmp_path, tiny_config):
    model, ema = _models(tiny_config)
    ckpt = save_checkpoint(tmp_path, 1, model, ema, {"step": 1}, tiny_config)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (ckpt / "state.pt").write_bytes(pickle.dumps({"step": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_training_state(ckpt)
    assert not marker.exists()


def test_a_zip_bomb_state_is_refused_before_torch_load(tmp_path, tiny_config, monkeypatch):
    """A small state.pt whose entry inflates to 256 MiB: torch.save never compresses, so the
    sizes in the zip directory refuse it; torch.load is never reached."""
    model, ema = _models(tiny_config)
    ckpt = save_checkpoint(tmp_path, 1, model, ema, {"step": 1}, tiny_config)
    with zipfile.ZipFile(ckpt / "state.pt", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("state/data/0", "w", force_zip64=True) as entry:
            zeros = bytes(2**20)
            for _ in range(256):
                entry.write(zeros)
    assert (ckpt / "state.pt").stat().st_size < 2**20

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called on a zip bomb")
    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(CheckpointError, match=r"inflate to 256 MiB from a 0\.\d MiB file") as err:
        load_training_state(ckpt)
    assert "weights_only" not in str(err.value)


class Opaque:
    """An object torch.load(weights_only=True) does not rebuild."""


def test_a_refused_pickle_never_suggests_weights_only_false(tmp_path, tiny_config):
    model, ema = _models(tiny_config)
    ckpt = save_checkpoint(tmp_path, 1, model, ema, {"step": 1}, tiny_config)
    torch.save({"step": 1, "extra": Opaque()}, ckpt / "state.pt")  # not a plain value
    with pytest.raises(CheckpointError, match="could not be loaded safely") as err:
        load_training_state(ckpt)
    assert "weights_only" not in str(err.value) and "never unpickled" in str(err.value)


@pytest.mark.parametrize("pointer", ["../../elsewhere/checkpoints/step-0000001",
                                     "/etc", "step-0000001/../../../elsewhere", "link"])
def test_latest_and_best_never_point_outside_the_run(tmp_path, tiny_config, pointer):
    model, ema = _models(tiny_config)
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, ema, {}, tiny_config)
    save_checkpoint(tmp_path / "elsewhere", 1, model, ema, {}, tiny_config)
    root = run / "checkpoints"
    (root / "link").symlink_to(tmp_path / "elsewhere" / "checkpoints" / "step-0000001")
    (root / "latest").write_text(pointer + "\n")
    with pytest.raises(CheckpointError, match="not a checkpoint directory of this run"):
        latest_checkpoint(run)
    with pytest.raises(CheckpointError, match="not a checkpoint directory of this run"):
        load_checkpoint(run)
    (root / "latest").write_text("step-0000001\n")
    (root / "best").write_text(f"{pointer} 0.5\n")
    with pytest.raises(CheckpointError, match="not a checkpoint directory of this run"):
        best_checkpoint(run)


def test_a_symlinked_step_directory_is_not_followed_out_of_the_run(tmp_path, tiny_config):
    model, ema = _models(tiny_config)
    save_checkpoint(tmp_path / "elsewhere", 1, model, ema, {}, tiny_config)
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, ema, {}, tiny_config)
    (run / "checkpoints" / "step-0000002").symlink_to(
        tmp_path / "elsewhere" / "checkpoints" / "step-0000001")
    (run / "checkpoints" / "latest").write_text("step-0000002\n")
    with pytest.raises(CheckpointError, match="'step-0000002', which is not a checkpoint"):
        load_checkpoint(run)


def test_non_finite_weights_are_refused_unless_allowed(tmp_path, tiny_config, monkeypatch):
    model, ema = _models(tiny_config)
    with torch.no_grad():
        ema.conv_out.weight[0, 0, 0, 0] = float("nan")
        ema.conv_in.bias[0] = float("inf")
    weights = save_checkpoint(tmp_path, 1, model, ema, {}, tiny_config) / "weights.safetensors"
    with pytest.raises(CheckpointError, match=r"has 2 NaN/Inf values in its ema\.\* weights"):
        load_checkpoint(weights)
    assert torch.isfinite(load_checkpoint(weights, use_ema=False).model.conv_out.weight).all()
    loaded = load_checkpoint(weights, allow_nonfinite=True)
    assert loaded.model.conv_out.weight.isnan().any()
    monkeypatch.setenv("PIXELDIFFUSION_ALLOW_NONFINITE", "1")
    assert load_checkpoint(weights).model.conv_in.bias.isinf().any()


def test_loaded_weights_are_trainable_float32_parameters(tmp_path, tiny_config):
    model, ema = _models(tiny_config)
    weights = save_checkpoint(tmp_path, 1, model, ema, {}, tiny_config) / "weights.safetensors"
    loaded = load_checkpoint(weights).model
    params = dict(loaded.named_parameters())
    assert params.keys() == dict(ema.named_parameters()).keys()
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())
    assert not any(p.is_meta for p in loaded.parameters())


@pytest.mark.parametrize("version, expected_eta", [("0.1.0", None), (None, 0.0)])
def test_a_0_1_checkpoint_keeps_its_samplers_eta(tmp_path, tiny_config, monkeypatch,
                                                 version, expected_eta):
    """0.1 stored sample.eta 0.0 in every config, but eta then reached DDIM alone: loaded today
    it must not make dpmpp_2m_sde deterministic. A current checkpoint keeps what it says."""
    from dataclasses import replace

    import pixeldiffusion.checkpoint as checkpoint_module

    if version is not None:
        monkeypatch.setattr(checkpoint_module, "__version__", version)
    cfg = replace(tiny_config, sample=replace(tiny_config.sample, sampler="dpmpp_2m_sde", eta=0.0))
    model, ema = _models(cfg)
    save_checkpoint(tmp_path, 1, model, ema, {"step": 1}, cfg)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config.sample.sampler == "dpmpp_2m_sde"
    assert loaded.config.sample.eta == expected_eta
