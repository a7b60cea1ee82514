"""Hostile checkpoints through the real CLI, in a subprocess whose address space is capped
(RLIMIT_AS): each is refused with exit code 2 and one line on stderr, before anything near the
limit is allocated. The server's abuse tests live in test_serve.py; the library-level checks
(zip bombs, pointers, NaN weights) in test_checkpoint.py."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixeldiffusion.checkpoint import save_checkpoint
from pixeldiffusion.config import load_config
from pixeldiffusion.unet import build_unet

resource = pytest.importorskip("resource", reason="RLIMIT_AS needs a POSIX system")

SRC = Path(__file__).resolve().parents[1] / "src"
# Room for a tiny model's sampling above what importing the CLI's modules maps; with the CPU
# build of torch the cap comes to about 2 GiB, enough for nothing big. A CUDA build maps gigabytes
# more address space at import (its kernels), so the cap is measured, not fixed.
HEADROOM = 1.4 * 2**30


@pytest.fixture(scope="module")
def address_space() -> int:
    """Bytes of address space for the capped subprocess: the peak of a process that imports
    torch and the sampling CLI's modules, plus HEADROOM."""
    probe = subprocess.run(
        [sys.executable, "-c", "import pixeldiffusion.cli, pixeldiffusion.checkpoint, "
         "pixeldiffusion.generate; print(next(line.split()[1] for line in "
         "open('/proc/self/status') if line.startswith('VmPeak')))"],
        env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"no /proc/self/status to size the cap from: {probe.stderr[-200:]}")
    return int(probe.stdout) * 1024 + int(HEADROOM)


def edit_metadata_config(weights: Path, **sections: dict) -> None:
    """Rewrite config sections in a safetensors header (8-byte length, JSON header, data), as a
    2 KB hand edit of a downloaded file would; the tensors stay those of the tiny model."""
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    config = json.loads(header["__metadata__"]["config"])
    for section, changes in sections.items():
        config[section].update(changes)
    header["__metadata__"]["config"] = json.dumps(config)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


def sample_capped(checkpoint: Path, tmp_path: Path, limit: int) -> subprocess.CompletedProcess:
    """``pixeldiffusion sample`` in a subprocess limited to ``limit`` bytes of address space."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pixeldiffusion", "sample", "-cp", str(checkpoint), "--steps", "2",
         "-bs", "1", "--device", "cpu", "-sp", str(tmp_path / "grid.png")],
        preexec_fn=cap, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tiny_weights(tmp_path, tiny_args) -> Path:
    cfg = load_config(None, tiny_args)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    checkpoint = save_checkpoint(tmp_path / "run", 1, model, copy.deepcopy(model), {}, cfg)
    return checkpoint / "weights.safetensors"


def test_the_capped_subprocess_samples_a_normal_checkpoint(tiny_weights, tmp_path,
                                                           address_space):
    done = sample_capped(tiny_weights, tmp_path, address_space)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("sections, message", [
    # one value out of its range: 154 GB of weights before the check existed
    ({"model": {"channel_mult": [1, 2, 1000]}}, "'model.channel_mult' must be in [1, 16]"),
    # every value in range, together 363 billion parameters
    ({"model": {"channels": 1024, "channel_mult": [16, 16, 16], "num_res_blocks": 8,
                "norm_groups": 8, "attn_resolutions": []}},
     "over the limit of 1,000,000,000; lower model.channels"),
    # a small model attending over all 1024 x 1024 pixels: terabytes of attention scores
    ({"data": {"image_size": 1024}, "model": {"attn_resolutions": [1024], "num_heads": 8,
                                              "channels": 64, "norm_groups": 8}},
     "of activations per image, over the limit of 8 GB"),
    # within the limits (768M parameters, 3 GB) but not what the file holds: refused from the
    # header's shapes on the meta device, never built
    ({"model": {"channels": 512, "channel_mult": [2, 2], "num_res_blocks": 6, "norm_groups": 8,
                "attn_resolutions": []}}, "does not fit this model configuration"),
], ids=["out-of-range", "too-many-parameters", "too-much-activation", "shapes-differ"])
def test_a_checkpoint_asking_for_an_enormous_model_is_refused_within_the_memory_cap(
        tiny_weights, tmp_path, sections, message, address_space):
    edit_metadata_config(tiny_weights, **sections)
    done = sample_capped(tiny_weights, tmp_path, address_space)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("pixeldiffusion: error: "), done.stderr
    assert message in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "grid.png").exists()


def test_the_limit_can_be_raised_by_the_user(tiny_weights, tmp_path, monkeypatch, address_space):
    edit_metadata_config(tiny_weights, model={"channels": 1024, "channel_mult": [16, 16, 16],
                                              "num_res_blocks": 8, "norm_groups": 8,
                                              "attn_resolutions": []})
    monkeypatch.setenv("PIXELDIFFUSION_MAX_PARAMS", str(10**12))
    done = sample_capped(tiny_weights, tmp_path, address_space)
    # past the size check, the header's shapes still refuse it, again before any allocation
    assert done.returncode == 2 and "does not fit this model configuration" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_latest_pointer_outside_the_run_is_refused_by_the_cli(tiny_weights, tmp_path,
                                                                address_space):
    other = tiny_weights.parent.parent.parent
    elsewhere = tmp_path / "elsewhere"
    save_checkpoint(elsewhere, 1, *_two_tiny_models(), {},
                    load_config(None, ["--model.channels", "8", "--model.norm_groups", "4"]))
    (other / "checkpoints" / "latest").write_text("../../elsewhere/checkpoints/step-0000001\n")
    done = sample_capped(other, tmp_path, address_space)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "which is not a checkpoint directory of this run" in done.stderr


def _two_tiny_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = load_config(None, ["--model.channels", "8", "--model.norm_groups", "4"])
    model = build_unet(cfg.model, in_channels=1, image_size=32)
    return model, copy.deepcopy(model)
