"""Multi-process training through the real launchers: 2 CPU processes, gloo, DDP via accelerate.

One launch runs tests/distributed_worker.py, which trains 6 steps straight and 3 + resume 3 in the
same process group and records per rank what it trained on, its final weights and what it wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from pixeldiffusion.config import all_keys, load_config
from pixeldiffusion.data import EpochBatchSampler, load_dataset

WORKER = Path(__file__).with_name("distributed_worker.py")
BIN = Path(sys.executable).parent


def _args(tiny_args):
    args = [*tiny_args, "--data.random_flip", "true", "--train.warmup_steps", "5",
            "--train.save_every", "2", "--train.sample_every", "2", "--train.device", "cpu"]
    if "train.eval_samples" in all_keys():  # no end-of-run quality score in these tiny runs
        args += ["--train.eval_samples", "0"]
    return args


def _launch(launcher, out, tiny_args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*launcher, str(WORKER), str(out), *_args(tiny_args)],
                          capture_output=True, text=True, timeout=540, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _weights(out, rank, tag):
    return load_file(str(out / f"rank{rank}-{tag}.safetensors"))


def _check(out, ranks, tiny_args):
    assert [r["world_size"] for r in ranks] == [2, 2]
    # both ranks end with identical raw and EMA weights, after a straight run and after resuming
    for tag in ("a", "b3", "b6"):
        w0, w1 = _weights(out, 0, tag), _weights(out, 1, tag)
        assert w0.keys() == w1.keys()
        for key in w0:
            assert torch.equal(w0[key], w1[key]), f"{tag}: ranks differ in {key}"
    # what rank 0 saved is what the processes hold; the EMA moved, but not onto the raw weights
    saved = load_file(str(out / "a" / "checkpoints" / "step-0000006" / "weights.safetensors"))
    final = _weights(out, 0, "a")
    for key, value in final.items():
        assert torch.equal(saved[key], value), key
    assert any(not torch.equal(final[k], final[k.replace("model.", "ema.", 1)])
               for k in final if k.startswith("model."))
    # 6 steps straight == 3 steps, stop, resume 3 (data position, optimizer, EMA, RNG of each rank)
    for rank in (0, 1):
        a, b = _weights(out, rank, "a"), _weights(out, rank, "b6")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6,
                                       msg=f"rank {rank}: resume differs in {key}")
    # data sharded: step s of rank r is global batch 2 s + r, and no batch is trained twice
    cfg = load_config(None, tiny_args)
    dataset = load_dataset(cfg.data)
    sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, seed=cfg.train.seed)
    for rank, record in enumerate(ranks):
        want = [float(torch.stack([dataset[i][0] for i in sampler.global_batch(2 * s + rank)])
                      .double().sum()) for s in range(6)]
        assert record["batches"]["a"] == pytest.approx(want, abs=1e-6)  # flips keep the sum
        assert record["batches"]["b3"] + record["batches"]["b6"] == pytest.approx(want, abs=1e-6)
    # only rank 0 writes checkpoints, config, grids and log lines
    assert "save_checkpoint" in ranks[0]["writes"] and "save_config" in ranks[0]["writes"]
    assert "save_grid" in ranks[0]["writes"] and "log" in ranks[0]["writes"]
    assert ranks[1]["writes"] == []


def test_torchrun_two_processes_identical_weights_exact_resume_rank_zero_writes(
        tmp_path, tiny_args):
    ranks = _launch([str(BIN / "torchrun"), "--nproc_per_node", "2",
                     "--master_port", str(free_port())], tmp_path, tiny_args)
    _check(tmp_path, ranks, tiny_args)


def test_accelerate_launch_two_processes(tmp_path, tiny_args):
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    ranks = _launch(launcher, tmp_path, tiny_args)
    _check(tmp_path, ranks, tiny_args)
