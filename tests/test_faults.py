"""Issue 8, "nothing lost": every fault is injected for real, through the path a user hits.

Signals go to real training processes; a process is SIGKILLed in the middle of a checkpoint
write; files are truncated; a full disk is a real 1-checkpoint tmpfs (where user namespaces
allow mounting one) and an ``OSError(ENOSPC)`` raised at the write call; pickle payloads that
would write a file are planted where a user would load them.

Faults that need code inside the training process (a slow write, ENOSPC, a NaN loss) run the
real CLI entry point, ``pixeldiffusion.cli.main``, in ``python -c`` after patching one function.
"""

import errno
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import MISSING_DEVICE, MISSING_DEVICE_REFUSAL
from pixeldiffusion.checkpoint import (
    best_checkpoint,
    find_resumable,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from pixeldiffusion.config import DataConfig, load_config
from pixeldiffusion.data import load_dataset
from pixeldiffusion.errors import CheckpointError
from pixeldiffusion.train import train
from pixeldiffusion.unet import build_unet

EXE = shutil.which("pixeldiffusion", path=str(Path(sys.executable).parent)) or "pixeldiffusion"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """The installed ``pixeldiffusion`` command, as a user runs it."""
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env or ENV)


def cli_with_fault(fault: str, *args) -> list[str]:
    """argv of a process that runs ``fault`` (Python that patches one function), then the real
    CLI entry point with ``args``."""
    code = ("import sys\nfrom pixeldiffusion.cli import main\n" + textwrap.dedent(fault)
            + "\nsys.exit(main(sys.argv[1:]))\n")
    return [sys.executable, "-c", code, *map(str, args)]


def quiet_train(cfg, run_dir, **kwargs):
    return train(cfg, run_dir, progress=False, log=lambda *_: None, **kwargs)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-2000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def latest_name(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def assert_clean_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    last_line = done.stderr.strip().splitlines()[-1]  # after any warnings naming files
    assert last_line.startswith("pixeldiffusion: error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr[-3000:])


# --------------------------------------------------------------------------- signals


def test_sigterm_saves_the_step_and_resume_auto_continues_bit_exactly(tmp_path, tiny_args):
    """SIGTERM to a real `pixeldiffusion train`: it saves the current step, says how to resume,
    exits 130; `--resume auto` then ends with the same weights, bit for bit, as a run that was
    never interrupted (dropout on: RNG states, data position, optimizer and EMA all matter).
    On the CPU: on a GPU cuDNN's autotuned kernels differ in the last bits from run to run."""
    run, tiny_args = tmp_path / "run", [*tiny_args, "--train.device", "cpu"]
    proc = subprocess.Popen([EXE, "train", "-e", run, *tiny_args, "--train.steps", "100000",
                             "--train.save_every", "3", "--no_progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(lambda: (run / "checkpoints" / "latest").exists(), proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = int(latest_name(run).split("-")[1])
    assert f"stopped by signal {int(signal.SIGTERM)} at step {step};" in err
    assert f"Resume with: pixeldiffusion train -e {run} --resume auto" in err
    assert "Traceback" not in err and not (run / "train.lock").exists()

    done = cli("train", "-e", run, "--resume", "auto", "--train.steps", step + 2, "--no_progress")
    assert done.returncode == 0, done.stderr
    assert f"resuming from {run / 'checkpoints' / f'step-{step:07d}'} at step {step}" in done.stdout
    straight = quiet_train(load_config(None, tiny_args + ["--train.steps", str(step + 2)]),
                           tmp_path / "straight")
    resumed = load_file(str(run / "checkpoints" / f"step-{step + 2:07d}" / "weights.safetensors"))
    expected = load_file(str(straight.checkpoint / "weights.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_and_resume_uses_it(
        tmp_path, tiny_args):
    """SIGKILL while step 4's weights are half on disk: step 2 stays `latest` and loads, the
    half-written directory is never taken for a checkpoint, and `--resume auto` (not blocked by
    the dead run's lock) continues from step 2 and cleans the debris up."""
    run, marker = tmp_path / "run", tmp_path / "writing"
    fault = f"""
        import time
        import pixeldiffusion.checkpoint as checkpoint
        real_save_file = checkpoint.save_file
        def save_file_then_hang(tensors, path, metadata=None):
            real_save_file(tensors, path, metadata=metadata)
            if "step-0000004" in str(path):  # leave half of step 4's weights on disk and hang
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
                open({str(marker)!r}, "w").close()
                time.sleep(600)
        checkpoint.save_file = save_file_then_hang
    """
    proc = subprocess.Popen(cli_with_fault(fault, "train", "-e", run, *tiny_args,
                                           "--train.steps", "100", "--train.save_every", "2",
                                           "--no_progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(marker.exists, proc, "the write of step 4")
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = run / "checkpoints" / ".step-0000004.tmp" / "weights.safetensors"
    assert partial.is_file()  # the debris of the interrupted write is really there
    assert latest_name(run) == "step-0000002"
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]
    assert load_checkpoint(run).step == 2

    done = cli("train", "-e", run, "--resume", "auto", "--train.steps", "5", "--no_progress")
    assert done.returncode == 0, done.stderr
    assert "step-0000002 at step 2" in done.stdout
    assert not partial.parent.exists()
    assert latest_name(run) == "step-0000005" and load_checkpoint(run).step == 5


# --------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture
def run_with_two_checkpoints(tmp_path, tiny_args) -> Path:
    run = tmp_path / "run"
    quiet_train(load_config(None, tiny_args + ["--train.save_every", "2"]), run)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002", "step-0000004"]
    return run


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_naming_both(
        run_with_two_checkpoints):
    run = run_with_two_checkpoints
    weights = run / "checkpoints" / "step-0000004" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    done = cli("train", "-e", run, "--resume", "auto", "--train.steps", "6", "--no_progress")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"newest checkpoint {weights.parent} cannot be loaded" in out and "truncated" in out
    assert f"falling back to {run / 'checkpoints' / 'step-0000002'}" in out
    assert "at step 2" in out and latest_name(run) == "step-0000006"


def test_a_corrupt_training_state_is_skipped_and_none_loadable_is_one_error(
        run_with_two_checkpoints):
    run = run_with_two_checkpoints
    (run / "checkpoints" / "step-0000004" / "state.pt").write_bytes(b"")
    point = find_resumable(run)
    assert point.path.name == "step-0000002" and point.state["step"] == 2
    assert [(p.name, "state.pt" in why) for p, why in point.skipped] == [("step-0000004", True)]
    weights = run / "checkpoints" / "step-0000002" / "weights.safetensors"
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be loaded: "
                                              "step-0000004: .*; step-0000002: "):
        find_resumable(run)


# --------------------------------------------------------------------------- full disk


def test_enospc_at_the_write_call_is_one_clear_error_and_keeps_the_previous_checkpoint(
        tmp_path, tiny_args):
    """torch.save raises ENOSPC halfway through step 4's training state."""
    run = tmp_path / "run"
    fault = """
        import errno, os
        import torch
        real_save = torch.save
        def save_until_the_disk_is_full(obj, path, *args, **kwargs):
            if "step-0000004" in str(path):
                with open(path, "wb") as f:
                    f.write(b"PK\\x03\\x04 the first bytes of a zip file")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_save(obj, path, *args, **kwargs)
        torch.save = save_until_the_disk_is_full
    """
    done = subprocess.run(cli_with_fault(fault, "train", "-e", run, *tiny_args, "--train.steps",
                                         "6", "--train.save_every", "2", "--no_progress"),
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert_clean_error(done, "could not save checkpoint step-0000004: the disk is full",
                       f"'latest' still names {run / 'checkpoints' / 'step-0000002'}, which is "
                       f"intact", "--resume auto")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["best", "latest", "step-0000002"]
    assert latest_name(run) == "step-0000002" and load_checkpoint(run).step == 2
    assert not (run / "train.lock").exists()


def _checkpoint_bytes(tiny_config) -> int:
    params = sum(p.numel() for p in build_unet(tiny_config.model, in_channels=1,
                                               image_size=32).parameters())
    return 4 * params * 4  # raw + EMA weights, AdamW's two moments; float32


def test_a_really_full_disk_tmpfs(tmp_path, tiny_args, tiny_config):
    """A tmpfs with room for one checkpoint and a half, mounted in a user namespace: the second
    save fills it. Skipped where unprivileged user namespaces are not allowed."""
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True)
    if not probe or probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    run = tmp_path / "run"
    size_kib = (_checkpoint_bytes(tiny_config) * 3 // 2 + 64 * 1024) // 1024
    check = ("from pixeldiffusion.checkpoint import load_checkpoint; import sys; "
             "print('loads step', load_checkpoint(sys.argv[1]).step)")
    script = (f"mkdir -p {run} && mount -t tmpfs -o size={size_kib}k tmpfs {run} && "
              f"{EXE} train -e {run} {' '.join(tiny_args)} --train.steps 6 "
              f"--train.save_every 2 --no_progress; echo rc=$?; ls -A {run}/checkpoints; "
              f"{sys.executable} -c \"{check}\" {run}")
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=600, env=ENV)  # two processes
    assert "rc=2" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "pixeldiffusion: error: could not save checkpoint step-0000004: the disk is full" \
        in done.stderr and "Traceback" not in done.stderr
    listing = done.stdout.split("rc=2")[1].split()
    assert "step-0000002" in listing and "step-0000004" not in listing
    assert not [name for name in listing if name.endswith(".tmp")]
    assert "loads step 2" in done.stdout


# --------------------------------------------------------------------------- NaN / Inf


def test_nan_steps_are_skipped_exactly_and_counted(tmp_path, tiny_args, monkeypatch):
    """A NaN loss at step 3 leaves weights, EMA and AdamW's moments exactly as after step 2."""
    loss_module = importlib.import_module("pixeldiffusion.formulations")  # the loop's DDPM loss
    real_loss, calls = loss_module.training_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(loss_module, "training_loss", nan_at_step_3)
    lines = []
    cfg = load_config(None, tiny_args + ["--train.save_every", "1", "--train.keep_last", "10",
                                         "--train.log_every", "1"])
    result = train(cfg, tmp_path, progress=False, log=lines.append)
    assert result.step == 4
    ckpt = tmp_path / "checkpoints"
    before, after = (load_file(str(ckpt / f"step-000000{s}" / "weights.safetensors"))
                     for s in (2, 3))
    for key in before:
        assert torch.equal(before[key], after[key]), key
    states = [torch.load(ckpt / f"step-000000{s}" / "state.pt", weights_only=True)
              for s in (2, 3, 4)]
    moments = [s["optimizer"]["state"][0]["exp_avg"] for s in states]
    assert torch.equal(moments[0], moments[1]) and not torch.equal(moments[1], moments[2])
    assert [s["nonfinite_steps"] for s in states] == [0, 1, 1]
    assert any("skipped 1 step(s) with a NaN/Inf loss or gradient before step 3" in line
               for line in lines)
    final = load_file(str(result.checkpoint / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_nan_patience_stops_the_run_naming_the_cause_and_the_last_good_checkpoint(
        tmp_path, tiny_args):
    """From step 5 on every loss is NaN; with nan_patience 3 the run stops at the next log
    interval (step 8) through the real CLI, and every checkpoint on disk is finite."""
    run = tmp_path / "run"
    fault = """
        import importlib
        loss_module = importlib.import_module("pixeldiffusion.formulations")
        real_loss, calls = loss_module.training_loss, []
        def nan_from_step_5(*args, **kwargs):
            calls.append(1)
            loss = real_loss(*args, **kwargs)
            return loss * float("nan") if len(calls) >= 5 else loss
        loss_module.training_loss = nan_from_step_5
    """
    done = subprocess.run(cli_with_fault(fault, "train", "-e", run, *tiny_args, "--train.steps",
                                         "20", "--train.save_every", "2", "--train.nan_patience",
                                         "3", "--no_progress"),
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert_clean_error(done, "NaN/Inf for 4 steps in a row before step 8",
                       "Lower --train.lr", "fp16",
                       f"Last good checkpoint: {run / 'checkpoints' / 'step-0000006'}")
    assert latest_name(run) == "step-0000006"
    for path in list_checkpoints(run):
        weights = load_file(str(path / "weights.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values()), path


# --------------------------------------------------------------------------- foreign checkpoints


def test_another_architecture_is_a_list_of_mismatches_not_a_traceback(
        run_with_two_checkpoints, tmp_path):
    run = run_with_two_checkpoints
    done = cli("train", "-e", run, "--resume", "auto", "--train.steps", "8",
               "--model.channels", "16")
    assert_clean_error(done, "does not fit this model configuration", "shape: ",
                       "checkpoint (8,", "vs model (16,")
    # a weights file whose metadata describes another model than its tensors hold
    weights = run / "checkpoints" / "step-0000004" / "weights.safetensors"
    metadata = read_metadata(weights)
    metadata["config"] = metadata["config"].replace('"num_res_blocks": 1', '"num_res_blocks": 2')
    forged = tmp_path / "forged.safetensors"
    save_file(load_file(str(weights)), str(forged), metadata=metadata)
    done = cli("sample", "-cp", forged, "-sp", tmp_path / "grid.png", "--steps", "2")
    assert_clean_error(done, "does not fit this model configuration", "missing: ")
    assert not (tmp_path / "grid.png").exists()


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_pickle_payloads_are_never_executed(run_with_two_checkpoints, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is real: plain unpickling runs it
    assert marker.read_text() == "pwned"
    marker.unlink()
    shutil.copy(evil, tmp_path / "model.pth")
    for path in (evil, tmp_path / "model.pth"):
        done = cli("sample", "-cp", path, "-sp", tmp_path / "grid.png")
        assert_clean_error(done, "never unpickles .pt/.pth")
    state = run_with_two_checkpoints / "checkpoints" / "step-0000004" / "state.pt"
    shutil.copy(evil, state)
    done = cli("train", "-e", run_with_two_checkpoints, "--resume", state.parent)
    assert_clean_error(done, "could not be loaded safely")
    assert not marker.exists()


# --------------------------------------------------------------------------- image folders


def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _truncated_jpeg(path: Path, seed: int) -> None:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Five good images of different sizes and modes, and three bad files."""
    root = tmp_path / "pictures"
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = 255  # opaque green
    _save(root / "a_rgba.png", Image.fromarray(rgba, "RGBA"))
    _save(root / "b_palette.gif", Image.new("RGB", (9, 7), (255, 0, 0)).convert("P"))
    _save(root / "c_sixteen.png", Image.fromarray(np.full((30, 30), 65535, np.uint16)))
    _save(root / "d_grey.jpg", Image.new("L", (64, 48), 0))
    _save(root / "sub" / "e_large.png", Image.new("RGB", (100, 80), (0, 0, 255)))
    (root / "f_empty.png").write_bytes(b"")
    (root / "g_garbage.jpg").write_bytes(b"this is not a jpeg at all")
    _truncated_jpeg(root / "h_truncated.jpg", 0)
    return root


def test_mixed_modes_and_sizes_are_converted_to_the_configured_shape(mixed_folder):
    with pytest.warns(UserWarning, match="skipped 2 unreadable image file"):
        ds = load_dataset(DataConfig(dataset="folder", root=str(mixed_folder), image_size=16,
                                     channels=3))
    expected = {"a_rgba.png": (-1, 1, -1), "b_palette.gif": (1, -1, -1),
                "c_sixteen.png": (1, 1, 1), "d_grey.jpg": (-1, -1, -1),
                "e_large.png": (-1, -1, 1)}
    x = {p.name: ds[i][0] for i, p in enumerate(ds.files) if p.name in expected}
    assert x.keys() == expected.keys()
    assert all(v.shape == (3, 16, 16) and v.dtype == torch.float32 for v in x.values())
    for name, rgb in expected.items():
        torch.testing.assert_close(x[name].mean(dim=(1, 2)), torch.tensor(rgb, dtype=torch.float),
                                   atol=0.02, rtol=0, msg=name)


def test_bad_images_are_skipped_named_and_counted_at_the_end(mixed_folder, tmp_path, tiny_args):
    run = tmp_path / "run"
    done = cli("train", "-e", run, *tiny_args, "--data.dataset", "folder", "--data.root",
               mixed_folder, "--data.channels", "3", "--data.image_size", "16",
               "--train.batch_size", "6", "--no_progress")  # all 6 readable headers a step
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("f_empty.png", "g_garbage.jpg", "h_truncated.jpg"):
        assert name in done.stderr, name  # a warning names each file when it is skipped
    summary = [line for line in done.stdout.splitlines() if "skipped 3 unreadable" in line]
    assert len(summary) == 1, done.stdout
    assert all(name in summary[0] for name in ("f_empty.png", "g_garbage.jpg", "h_truncated"))
    assert load_checkpoint(run).step == 4


def test_strict_mode_fails_on_the_first_bad_image_and_writes_nothing(mixed_folder, tmp_path,
                                                                     tiny_args):
    run = tmp_path / "run"
    done = cli("train", "-e", run, *tiny_args, "--data.dataset", "folder", "--data.root",
               mixed_folder, "--data.channels", "3", "--data.strict", "true")
    assert_clean_error(done, f"image '{mixed_folder / 'f_empty.png'}' cannot be read",
                       "--data.strict false")
    assert not run.exists()


def test_a_folder_of_only_broken_images_fails_clearly(tmp_path, tiny_args):
    root, run = tmp_path / "broken", tmp_path / "run"
    for k in range(3):
        _truncated_jpeg(root / f"{k}.jpg", k)  # headers fine, pixels missing
    done = cli("train", "-e", run, *tiny_args, "--data.dataset", "folder", "--data.root", root)
    assert_clean_error(done, f"none of the 3 images in '{root}' can be decoded")
    assert not run.exists()


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_args) -> Path:
    run = tmp_path_factory.mktemp("faults") / "run"
    quiet_train(load_config(None, tiny_args), run)
    return run


@pytest.mark.parametrize("args, message", [
    (["sample", "--eta", "-1"], "'sample.eta' must be in [0, 10]"),
    (["sample", "--steps", "100000"], "more than the model's 50 timesteps"),
    (["sample", "--sampler", "no_such_sampler"], "'no_such_sampler'"),
    (["sample", "--interval", "0"], "expected a positive integer"),
    (["sample", "--device", MISSING_DEVICE], MISSING_DEVICE_REFUSAL),
])
def test_impossible_sampler_arguments_write_nothing(trained_run, tmp_path, args, message):
    grid = tmp_path / "grid.png"
    done = cli(args[0], "-cp", trained_run, "-sp", grid, *args[1:], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("yaml_text, extra, message", [
    ("train:\n  stpes: 10\n", [], "did you mean 'train.steps'"),
    ("train:\n  lr: 5\n", [], "'train.lr' must be in [1e-09, 1]; got 5"),
    ("data:\n  channels: 2\n", [], "'data.channels' must be one of 1, 3; got 2"),
    ("", ["--train.nan_patience", "0"], "'train.nan_patience' must be in [1, 1e+06]"),
    ("", ["--device", MISSING_DEVICE], MISSING_DEVICE_REFUSAL),
])
def test_bad_config_values_give_one_message_and_write_nothing(tmp_path, yaml_text, extra,
                                                              message):
    config = tmp_path / "my.yaml"
    config.write_text(yaml_text)
    run = tmp_path / "run"
    done = cli("train", "-c", config, "-e", run, *extra, cwd=tmp_path)
    assert_clean_error(done, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my.yaml"]


# --------------------------------------------------------------------------- two runs, one dir


def test_a_second_run_on_a_live_exp_dir_is_refused_and_a_dead_ones_lock_is_not_stale(
        tmp_path, tiny_args):
    run = tmp_path / "run"
    first = subprocess.Popen([EXE, "train", "-e", run, *tiny_args, "--train.steps", "100000",
                              "--train.save_every", "2", "--no_progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").exists(), first, "the first save")
        for extra in ([], ["--resume", "auto"]):
            done = cli("train", "-e", run, *tiny_args, *extra)
            assert_clean_error(done, f"another training run (pid {first.pid} on ",
                               f"is using '{run}'")
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (run / "train.lock").exists()  # SIGKILL leaves the file; the kernel dropped the lock
    done = cli("train", "-e", run, "--resume", "auto", "--train.steps",
               int(latest_name(run).split("-")[1]) + 1, "--no_progress")
    assert done.returncode == 0, done.stderr
    assert not (run / "train.lock").exists()


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_the_newest_k_and_the_best(tmp_path, tiny_config):
    model, ema = (build_unet(tiny_config.model, in_channels=1, image_size=32) for _ in "ab")
    scores = {1: 0.5, 2: 0.2, 3: 0.4, 4: 0.3, 5: 0.6, 6: 0.1, 7: 0.7}
    kept = []
    for step, score in scores.items():
        save_checkpoint(tmp_path, step, model, ema, {"step": step}, tiny_config, keep_last=2,
                        score=score)
        kept.append([int(p.name[-2:]) for p in list_checkpoints(tmp_path)])
        assert latest_checkpoint(tmp_path).name == f"step-{step:07d}"
        assert load_checkpoint(tmp_path).step == step  # always one that loads
    assert kept == [[1], [1, 2], [2, 3], [2, 3, 4], [2, 4, 5], [5, 6], [6, 7]]
    assert best_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "step-0000006", 0.1)


def test_enospc_in_the_library_call_removes_the_partial_files(tmp_path, tiny_config,
                                                              monkeypatch):
    model, ema = (build_unet(tiny_config.model, in_channels=1, image_size=32) for _ in "ab")
    save_checkpoint(tmp_path, 1, model, ema, {"step": 1}, tiny_config)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("pixeldiffusion.checkpoint.torch.save", full)
    with pytest.raises(CheckpointError, match="the disk is full .* still names .*step-0000001"):
        save_checkpoint(tmp_path, 2, model, ema, {"step": 2}, tiny_config)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", "step-0000001"]
