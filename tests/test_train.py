import importlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from pixeldiffusion.checkpoint import list_checkpoints
from pixeldiffusion.config import load_config
from pixeldiffusion.errors import PixelDiffusionError
from pixeldiffusion.run import train
from pixeldiffusion.train import TrainingDiverged, ema_decay_at, ema_update, lr_factor


def _weights(result):
    return load_file(str(result.checkpoint / "weights.safetensors"))


def test_tiny_run_writes_checkpoint_grid_config_and_tensorboard(tmp_path, tiny_args):
    cfg = load_config(None, tiny_args + ["--train.tensorboard", "true",
                                         "--train.sample_every", "2"])
    result = train(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert result.step == 4
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-0000004"
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert result.grid.is_file() and (tmp_path / "run" / "samples" / "step-0000002.png").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    weights = _weights(result)
    assert any(k.startswith("ema.") for k in weights)
    assert any(k.startswith("model.") for k in weights)


@pytest.mark.parametrize("eval_samples", ["0", "8"])
def test_resume_continues_exactly(tmp_path, tiny_args, eval_samples):
    """N + M steps in one go == N steps, stop, resume, M steps (dropout and flips on, so the
    RNG states, data position, optimizer, LR schedule and EMA must all be restored; with the
    in-training evaluation on, which must not disturb the training RNG)."""
    args = tiny_args + ["--data.random_flip", "true", "--train.warmup_steps", "5",
                        "--train.eval_samples", eval_samples, "--train.eval_steps", "2"]
    straight = train(load_config(None, args + ["--train.steps", "6"]), tmp_path / "a",
                     progress=False, log=lambda *_: None)
    train(load_config(None, args + ["--train.steps", "3"]), tmp_path / "b", progress=False,
          log=lambda *_: None)
    resumed = train(load_config(None, args + ["--train.steps", "6"]), tmp_path / "b",
                    resume="auto", progress=False, log=lambda *_: None)
    assert resumed.step == straight.step == 6
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    state = torch.load(resumed.checkpoint / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6


def test_a_second_run_in_the_same_dir_refuses_without_resume(tmp_path, tiny_config):
    train(tiny_config, tmp_path, progress=False, log=lambda *_: None)
    with pytest.raises(PixelDiffusionError, match="--resume auto"):
        train(tiny_config, tmp_path, progress=False, log=lambda *_: None)


def test_a_nan_loss_stops_the_run_and_saves_nothing_non_finite(tmp_path, tiny_args):
    cfg = load_config(None, tiny_args + ["--train.lr", "1.0", "--train.grad_clip", "0",
                                         "--train.warmup_steps", "0", "--train.nan_patience", "1"])
    loss_module = importlib.import_module("pixeldiffusion.formulations")  # the loop's DDPM loss
    real_loss = loss_module.training_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss
    loss_module.training_loss = poisoned
    try:
        with pytest.raises(TrainingDiverged, match="Lower --train.lr"):
            train(cfg, tmp_path, progress=False, log=lambda *_: None)
    finally:
        loss_module.training_loss = real_loss
    assert not list((tmp_path / "checkpoints").glob("step-*"))


def test_ema_warmup_lr_warmup_and_ema_update(tiny_config):
    assert ema_decay_at(tiny_config, 0) == pytest.approx(0.1)
    assert ema_decay_at(tiny_config, 10**6) == tiny_config.train.ema_decay
    assert lr_factor(0, 4) == 0.25 and lr_factor(3, 4) == 1.0 and lr_factor(0, 0) == 1.0
    assert lr_factor(10**6, 4) == 1.0  # constant after warm-up
    # cosine: 1 right after warm-up, 1/2 half-way through the rest, 0 at train.steps and after
    assert lr_factor(4, 4, "cosine", 104) == 1.0
    assert lr_factor(54, 4, "cosine", 104) == pytest.approx(0.5)
    assert lr_factor(104, 4, "cosine", 104) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(500, 4, "cosine", 104) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(1, 4, "cosine", 104) == 0.5  # warm-up is the same for both
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.9 * pa + 0.1 * pb for pa, pb in zip(a.parameters(), b.parameters(), strict=True)]
    ema_update(a, b, 0.9)
    for got, want in zip(a.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_sigint_saves_the_current_step_and_resume_finishes(tmp_path, tiny_args):
    """A real Ctrl-C to a real training process, sent once it has saved its first checkpoint."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "pixeldiffusion", "train", "-e", str(run), *tiny_args,
            "--train.steps", "100000", "--train.save_every", "3"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert latest.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Resume with: pixeldiffusion train -e" in err and "Traceback" not in err
    step = int(latest.read_text().strip().split("-")[1])
    assert step >= 3 and f"at step {step};" in err  # the interrupted step itself was saved
    cfg = load_config(run / "config.yaml", ["--train.steps", str(step + 2)])
    result = train(cfg, run, resume="auto", progress=False, log=lambda *_: None)
    assert result.step == step + 2


def test_two_processes_with_torchrun_train_and_only_rank_zero_writes(tmp_path, tiny_args):
    """Scale-out through the real launcher: 2 CPU processes, gloo, DDP via accelerate."""
    torchrun = Path(sys.executable).parent / "torchrun"
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        done = subprocess.run(
            [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "pixeldiffusion", "train", "-e", str(run),
             *tiny_args, "--train.save_every", "2", "--device", "cpu", "--no_progress"],
            capture_output=True, text=True, timeout=300)
        # Known open defect: in a loaded full-suite run a rank has now and then aborted in C++
        # ("terminate called without an active exception", SIGABRT) and torchrun failed; it has
        # not been reproduced alone. One relaunch for that abort only; any other failure fails.
        if done.returncode == 0 or "terminate called without an active exception" not in \
                done.stderr:
            break
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("new run") == 1 and "x2" in done.stdout
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002", "step-0000004"]
    resumed = train(load_config(run / "config.yaml", ["--train.steps", "5"]), run,
                    resume="auto", progress=False, log=lambda *_: None)
    assert resumed.step == 5


def test_the_loop_is_handed_its_loss_and_hooks(tmp_path, tiny_args):
    """train.train with a loss of our own (the LossFn contract) and a hook: the hook's setup runs
    once before training, its fn every 3 steps and at the end; no grids without a grid hook."""
    loop = importlib.import_module("pixeldiffusion.train")  # pixeldiffusion.train is pd.train
    cfg = load_config(None, tiny_args + ["--train.steps", "7"])
    seen = {"losses": [], "hook": [], "setup": 0}

    def loss_fn(net, x0, *, generator, y):
        seen["losses"].append((tuple(x0.shape), float(x0.min()), float(x0.max()), y))
        t = torch.randint(0, 50, (x0.shape[0],), generator=generator, device=x0.device)
        return net(x0, t, y=y).square().mean()  # any 0-dim tensor of the network's output

    def setup(state):
        assert state.step == 0 and not seen["losses"]
        seen["setup"] += 1

    hook = loop.Hook(3, lambda state: seen["hook"].append((state.step, state.done)), setup)
    result = loop.train(cfg, tmp_path / "run", progress=False, log=lambda *_: None,
                        hooks=[hook], loss_fn=loss_fn)
    assert result.step == 7 and result.grid is None and not (tmp_path / "run" / "samples").exists()
    assert seen["setup"] == 1 and seen["hook"] == [(3, False), (6, False), (7, True)]
    assert len(seen["losses"]) == 7
    for shape, low, high, y in seen["losses"]:
        assert shape == (4, 1, 32, 32) and -1 <= low < high <= 1 and y is None


def test_training_imports_neither_sampling_nor_metrics():
    code = ("import sys, pixeldiffusion.train; "
            "print(' '.join(m for m in sys.modules if m.startswith('pixeldiffusion.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    loaded = set(done.stdout.split())
    assert "pixeldiffusion.train" in loaded
    # samplers.py (pure functions) is there through config.py, which reads the sampler names and
    # defaults from it; the sampling stack and the metrics are not
    assert not loaded & {"pixeldiffusion.generate", "pixeldiffusion.optimal_steps",
                         "pixeldiffusion.evaluate", "pixeldiffusion.metrics",
                         "pixeldiffusion.features", "pixeldiffusion.reference",
                         "pixeldiffusion.serve", "pixeldiffusion.run"}


def test_one_loss_meter_serves_the_log_line_and_the_save_score():
    """Readers at different intervals each get the mean of the finite losses since their own
    previous read; a flagged (skipped) step counts for neither."""
    from pixeldiffusion.train import LossMeter

    class OneProcess:
        def reduce(self, tensor, reduction):
            return tensor

    meter, acc = LossMeter(torch.device("cpu")), OneProcess()
    for loss, bad in [(1.0, 0.0), (2.0, 0.0)]:
        meter.add(torch.tensor(loss), torch.tensor(bad))
    assert meter.mean("log", acc) == 1.5 and meter.steps_since("log") == 0
    for loss, bad in [(float("nan"), 1.0), (4.0, 0.0)]:
        meter.add(torch.tensor(loss), torch.tensor(bad))
    assert meter.steps_since("log") == 2 and meter.steps_since("save") == 4
    assert meter.mean("save", acc) == pytest.approx((1 + 2 + 4) / 3)
    assert meter.mean("log", acc) == 4.0
    meter.add(torch.tensor(float("inf")), torch.tensor(1.0))
    assert math.isnan(meter.mean("log", acc))  # every step of the interval was skipped
    assert meter.mean("save", acc) == pytest.approx(float("nan"), nan_ok=True)
