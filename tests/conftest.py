"""Shared fixtures: a tiny config that trains in about a second on 2 CPU cores."""

import os
import socket

import pytest
import torch

from pixeldiffusion.config import Config, load_config

TINY = ["--model.channels", "8", "--model.channel_mult", "1,2", "--model.num_res_blocks", "1",
        "--model.attn_resolutions", "16", "--model.norm_groups", "4", "--model.dropout", "0.1",
        "--diffusion.timesteps", "50", "--train.batch_size", "4", "--train.steps", "4",
        "--train.log_every", "2", "--train.save_every", "0", "--train.sample_every", "0",
        "--train.warmup_steps", "2", "--train.tensorboard", "false", "--sample.steps", "3",
        "--sample.n_samples", "4", "--sample.nrow", "2", "--sample.batch_size", "4",
        "--train.eval_samples", "0"]


# A --device this machine cannot give, and words of its refusal: plain cuda where no GPU is visible
# (the CI machines), one past the last GPU where there are some (benchmarks/gpu_check.sh).
if torch.cuda.is_available():
    MISSING_DEVICE = f"cuda:{torch.cuda.device_count()}"
    MISSING_DEVICE_REFUSAL = "CUDA device(s) are visible"
else:
    MISSING_DEVICE, MISSING_DEVICE_REFUSAL = "cuda", "sees no CUDA GPU"


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 (the default, pyproject addopts): one thread per worker and per subprocess a
    # test starts; on 2 cores two 1-thread processes get more done than one 2-thread process.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def free_port() -> int:
    """A TCP port nobody listens on now (for launchers run by tests on parallel workers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    return list(TINY)


@pytest.fixture
def tiny_config() -> Config:
    return load_config(None, TINY)


def pytest_runtest_logreport(report) -> None:
    """With PIXELDIFFUSION_FAILURE_LOG=FILE, append each failure and its traceback to FILE as it
    happens, so that a suite stopped by a time limit (benchmarks/gpu_check.sh) still leaves them.
    Under pytest-xdist the controller writes, not the workers."""
    path = os.environ.get("PIXELDIFFUSION_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
