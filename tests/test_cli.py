"""The real ``pixeldiffusion`` entry point, as a user runs it."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MISSING_DEVICE, MISSING_DEVICE_REFUSAL

EXE = shutil.which("pixeldiffusion", path=str(Path(sys.executable).parent)) or "pixeldiffusion"


def run(*args, cwd=None):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_args):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    done = run("train", "-e", run_dir, *tiny_args, "--no_progress")
    assert done.returncode == 0, done.stderr
    assert "sample grid:" in done.stdout and "parameters" in done.stdout
    return run_dir


def test_train_then_sample_through_the_entry_point(trained, tmp_path):
    grid = tmp_path / "grid.png"
    done = run("sample", "-cp", trained, "--sampler", "ddpm", "--steps", "5", "-bs", "6",
               "--nrow", "3", "-sp", grid, "--save_dir", tmp_path / "each", "--seed", "1",
               "--device", "cpu")
    assert done.returncode == 0, done.stderr
    picture = Image.open(grid)
    assert picture.size == (3 * 34 + 2, 2 * 34 + 2) and picture.mode == "L"
    npz = np.load(tmp_path / "each" / "samples.npz")
    assert npz["images"].shape == (6, 32, 32, 1) and npz["images"].dtype == np.uint8
    assert len(list((tmp_path / "each").glob("*.png"))) == 6


def test_sampling_is_seeded_and_ema_is_the_default(trained, tmp_path):
    def draw(name, *extra):
        out = tmp_path / name
        assert run("sample", "-cp", trained, "--steps", "4", "-bs", "2", "-sp", out,
                   *extra).returncode == 0
        return np.asarray(Image.open(out))
    assert (draw("a.png") == draw("b.png")).all()
    assert (draw("c.png", "--seed", "5") != draw("a.png")).any()
    assert (draw("d.png", "--load_ema", "false") != draw("a.png")).any()


@pytest.mark.parametrize("mode", ["denoise", "progressive"])
def test_denoise_and_progressive_have_one_row_per_sample(trained, tmp_path, mode):
    out = tmp_path / f"{mode}.png"
    done = run("sample", "-cp", trained, "--mode", mode, "--steps", "6", "--interval", "2",
               "-bs", "3", "-sp", out, "--to_grayscale")
    assert done.returncode == 0, done.stderr
    # frames at steps 0, 2, 4 plus the final image: 4 columns, 3 rows
    assert Image.open(out).size == (4 * 34 + 2, 3 * 34 + 2)


@pytest.mark.parametrize("args, message", [
    (["train", "--train.lrr", "1"], "did you mean 'train.lr'"),
    (["train", "--train.steps", "-5"], "'train.steps' must be in"),
    (["train", "--data.dataset", "folder", "--data.root", "/nonexistent/pics"],
     "does not exist"),
    (["train", "-c", "/nonexistent.yaml"], "does not exist"),
    (["train", "--device", MISSING_DEVICE, "--train.steps", "1"], MISSING_DEVICE_REFUSAL),
    (["sample", "-cp", "/nonexistent/ckpt"], "does not exist"),
    (["sample", "-cp", "pyproject.toml"], "not a readable safetensors"),
])
def test_bad_input_gives_one_clear_message(args, message, tmp_path):
    root = Path(__file__).resolve().parent.parent
    done = run(*args, cwd=root if "pyproject.toml" in args else tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.safetensors"))


def test_a_folder_without_readable_images_is_refused(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "broken.png").write_bytes(b"not a png")
    done = run("train", "--data.dataset", "folder", "--data.root", tmp_path / "pics",
               cwd=tmp_path)
    assert done.returncode == 2 and "no readable images" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_cuda_sampling_without_a_gpu_is_refused(trained):
    done = run("sample", "-cp", trained, "--device", MISSING_DEVICE)
    assert done.returncode == 2 and f"--device {MISSING_DEVICE}" in done.stderr
