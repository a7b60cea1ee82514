from pathlib import Path

import pytest
import yaml

from pixeldiffusion.config import Config, all_keys, load_config, parse_overrides, save_config
from pixeldiffusion.errors import ConfigError
from pixeldiffusion.unet import build_unet, count_parameters

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_the_builtin_digits_config():
    assert load_config(CONFIGS / "mnist.yaml") == Config()
    assert Config().data.dataset == "digits"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.image_size % 2 ** (len(cfg.model.channel_mult) - 1) == 0


def test_cifar10_config_is_the_ddpm_paper_model():
    cfg = load_config(CONFIGS / "cifar10.yaml")
    assert (cfg.data.dataset, cfg.data.channels, cfg.data.image_size) == ("cifar10", 3, 32)
    assert cfg.model.channel_mult == (1, 2, 2, 2) and cfg.model.dropout == 0.1
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.warmup_steps) == (2e-4, 128, 5000)
    import torch
    with torch.device("meta"):
        model = build_unet(cfg.model, in_channels=3, image_size=32)
    assert count_parameters(model) == 35_746_307  # Ho et al. 2020: 35.7M


def test_overrides_are_typed_and_applied_last(tmp_path):
    cfg = load_config(CONFIGS / "cifar10.yaml",
                      ["--train.lr", "1e-4", "--model.channel_mult=1,2,2", "--data.random_flip",
                       "false", "--diffusion.beta_schedule", "cosine", "--train.steps", "10"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.channel_mult == (1, 2, 2)
    assert cfg.data.random_flip is False
    assert cfg.diffusion.beta_schedule == "cosine"
    assert cfg.train.steps == 10 and isinstance(cfg.train.steps, int)
    assert cfg.model.channels == 128  # untouched keys keep the file's value


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["--model.attn_resolutions", "[16, 8]", "--train.seed", "7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 7


@pytest.mark.parametrize("args, message", [
    (["--train.lrr", "1"], "did you mean 'train.lr'"),
    (["--trian.lr", "1"], "did you mean 'train.lr'"),
    (["--model.chanels", "8"], "did you mean 'model.channels'"),
    (["--train.steps", "many"], "'train.steps' needs an integer"),
    (["--train.steps", "1.5"], "'train.steps' needs an integer"),
    (["--train.lr", "-1"], "'train.lr' must be in [1e-09, 1]"),
    (["--data.channels", "2"], "'data.channels' must be one of 1, 3"),
    (["--diffusion.beta_schedule", "cosin"], "did you mean 'cosine'"),
    (["--data.random_flip", "maybe"], "'data.random_flip' needs true or false"),
    (["--model.channel_mult", "x"], "'model.channel_mult'"),
    (["--data.image_size", "30"], "'data.image_size' (30) must be divisible by 4"),
    (["--model.attn_resolutions", "5"], "not one of the model's resolutions"),
    (["--model.norm_groups", "7"], "'model.norm_groups' (7) must divide"),
    (["--sample.steps", "2000"], "'sample.steps' (2000) must be at most"),
    (["train.lr", "1"], "overrides look like --section.key value"),
    (["--train.lr"], "needs a value"),
])
def test_bad_overrides_name_the_key_and_the_fix(args, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    assert message in str(err.value)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("trainn:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(tmp_path / "typo.yaml")


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c.d=2", "--train.batch-size", "3"]) == \
        [("a.b", "1"), ("c.d", "2"), ("train.batch_size", "3")]
    assert "train.lr" in all_keys() and "sample.eta" in all_keys()
