"""Shared fixtures: a tiny config that trains in about a second on 2 CPU cores."""

import pytest

from pixeldiffusion.config import Config, load_config

TINY = ["--model.channels", "8", "--model.channel_mult", "1,2", "--model.num_res_blocks", "1",
        "--model.attn_resolutions", "16", "--model.norm_groups", "4", "--model.dropout", "0.1",
        "--diffusion.timesteps", "50", "--train.batch_size", "4", "--train.steps", "4",
        "--train.log_every", "2", "--train.save_every", "0", "--train.sample_every", "0",
        "--train.warmup_steps", "2", "--train.tensorboard", "false", "--sample.steps", "3",
        "--sample.n_samples", "4", "--sample.nrow", "2", "--sample.batch_size", "4",
        "--train.eval_samples", "0"]


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    return list(TINY)


@pytest.fixture
def tiny_config() -> Config:
    return load_config(None, TINY)
