"""RePaint inpainting and spherical interpolation: schedules, exactness of the known region, an
analytic denoiser that RePaint must follow, and the real commands on a tiny model."""

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pixeldiffusion.checkpoint import load_checkpoint, save_checkpoint
from pixeldiffusion.cli import main
from pixeldiffusion.config import load_config
from pixeldiffusion.edit import inpaint, interpolate, jump_schedule, repaint, slerp
from pixeldiffusion.samplers import sample
from pixeldiffusion.schedule import (
    alphas_cumprod_from_betas,
    alphas_cumprod_of,
    linear_betas,
    sampling_timesteps,
)
from pixeldiffusion.unet import build_unet


def test_jump_schedule_resamples_every_stretch_r_times():
    walk = jump_schedule(20, jump_length=5, jump_n_sample=3)
    assert walk[0] == 19 and walk[-1] == -1
    assert all(abs(a - b) == 1 for a, b in zip(walk, walk[1:], strict=False))
    downs = sum(b < a for a, b in zip(walk, walk[1:], strict=False))
    assert downs == 20 + 3 * (3 - 1) * 5  # jumps back from indices 0, 5 and 10, twice each
    assert jump_schedule(6, 10, 10) == [5, 4, 3, 2, 1, 0, -1]  # nothing to jump over
    assert jump_schedule(6, 2, 1) == [5, 4, 3, 2, 1, 0, -1]  # r = 1: plain DDPM


def _two_point_denoiser(alphas_cumprod):
    """The exact E[x0 | x_t] for data x0 = +-(1, 1) with equal odds:
    x0_hat = mu tanh(sqrt(abar) <x_t, mu> / (1 - abar)), mu = (1, 1)."""
    def denoise(x_t, t):
        abar = float(alphas_cumprod[t])
        score = x_t.sum(dim=(1, 2, 3), keepdim=True) * math.sqrt(abar) / (1 - abar)
        x0 = torch.tanh(score).expand_as(x_t)
        return x0, (x_t - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
    return denoise


def test_repaint_follows_the_data_and_keeps_the_known_pixel_exactly():
    """Images are two perfectly correlated pixels, +-(1, 1). Knowing the first is +1, the ideal
    filling of the second is +1; RePaint with the exact denoiser must get there, and keep the
    known pixel bit for bit."""
    alphas_cumprod = alphas_cumprod_from_betas(linear_betas(100, 1e-4, 0.05))
    denoise = _two_point_denoiser(alphas_cumprod)
    n = 200
    x_T = torch.randn(n, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    x0_known = torch.tensor([1.0, -0.3]).reshape(1, 1, 1, 2)  # the second value is ignored
    known = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    calls = []
    out = repaint(denoise, x_T, sampling_timesteps(100, 50), alphas_cumprod, x0_known=x0_known,
                  known=known, jump_length=5, jump_n_sample=5,
                  generator=torch.Generator().manual_seed(1), callback=calls.append)
    assert torch.equal(out[:, :, :, 0], torch.ones(n, 1, 1))
    filled = out[:, 0, 0, 1]
    print(f"RePaint: {float((filled > 0.9).float().mean()):.1%} of fills are +1")
    assert float((filled > 0.9).float().mean()) >= 0.95
    assert len(calls) == sum(b < a for a, b in zip(jump_schedule(50, 5, 5),
                                                   jump_schedule(50, 5, 5)[1:], strict=False))


def test_slerp_stays_on_the_great_circle():
    a = torch.zeros(1, 2, 2)
    b = torch.zeros(1, 2, 2)
    a[0, 0, 0], b[0, 1, 1] = 3.0, 3.0  # orthogonal, same norm
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.equal(path[0], a) and torch.allclose(path[-1], b, atol=1e-6)
    torch.testing.assert_close(path.flatten(1).norm(dim=1), torch.full((5,), 3.0))
    torch.testing.assert_close(path[2], (a + b) / math.sqrt(2))
    same = slerp(a, 2 * a, torch.tensor([0.5]))  # parallel: falls back to the straight line
    torch.testing.assert_close(same[0], 1.5 * a)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_args):
    cfg = load_config(None, tiny_args)
    torch.manual_seed(0)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return save_checkpoint(tmp_path / "run", 1, model, copy.deepcopy(model), {}, cfg)


def _pictures(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return image, mask


def test_inpaint_keeps_the_known_region_exactly(tmp_path, tiny_checkpoint):
    image, mask = _pictures(tmp_path)
    loaded = load_checkpoint(tiny_checkpoint)
    result = inpaint(loaded, tmp_path / "image.png", tmp_path / "mask.png", n_samples=3,
                     steps=10, jump_length=3, jump_n_sample=2, seed=0,
                     device=torch.device("cpu"))
    pixels = ((result.images + 1) * 127.5).round()[:, 0]
    keep = torch.from_numpy(mask == 0)
    assert torch.equal(pixels[:, keep], torch.from_numpy(image)[keep].float().expand(3, -1))
    assert not torch.equal(pixels[:, ~keep], torch.from_numpy(image)[~keep].float().expand(3, -1))

    grid = tmp_path / "grid.png"
    assert main(["inpaint", "-cp", str(tiny_checkpoint), "--image", str(tmp_path / "image.png"),
                 "--mask", str(tmp_path / "mask.png"), "-bs", "2", "--steps", "6", "--jump", "2",
                 "--resample", "2", "--device", "cpu", "-sp", str(grid)]) == 0
    picture = np.asarray(Image.open(grid))
    assert picture.shape[:2] == (36, 2 + 3 * 34)  # masked input + 2 fillings, 2 px padding
    for column in (1, 2):
        cell = picture[2:34, 2 + 34 * column:34 + 34 * column]
        cell = cell[..., 0] if cell.ndim == 3 else cell
        assert np.array_equal(cell[mask == 0], image[mask == 0])


def test_inpaint_errors_are_one_sentence(tmp_path, tiny_checkpoint, capsys):
    _pictures(tmp_path)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "black.png")
    args = ["inpaint", "-cp", str(tiny_checkpoint), "--image", str(tmp_path / "image.png"),
            "--device", "cpu", "-sp", str(tmp_path / "x.png")]
    assert main([*args, "--mask", str(tmp_path / "black.png")]) == 2
    assert "has no white pixels" in capsys.readouterr().err
    assert main([*args, "--mask", str(tmp_path / "nope.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_interpolation_ends_are_the_seeds_samples_and_files(tmp_path, tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    frames = interpolate(loaded, n_frames=4, seeds=(3, 4), steps=5,
                         device=torch.device("cpu"), options={"eta": 0.0})
    assert frames.shape == (4, 1, 32, 32)
    for end, seed in ((frames[0], 3), (frames[-1], 4)):
        x_T = torch.randn((1, 32, 32), generator=torch.Generator().manual_seed(seed))[None]
        direct = sample(loaded.model, x_T, alphas_cumprod_of(loaded.config), sampler="ddim",
                        steps=5, eta=0.0)
        torch.testing.assert_close(end, direct[0], atol=1e-5, rtol=0)
    assert not torch.equal(frames[1], frames[2])

    strip, gif = tmp_path / "strip.png", tmp_path / "walk.gif"
    common = ["interpolate", "-cp", str(tiny_checkpoint), "--n_frames", "4", "--steps", "3",
              "--device", "cpu"]
    assert main([*common, "-sp", str(strip)]) == 0
    assert main([*common, "-sp", str(gif)]) == 0
    assert Image.open(strip).size == (2 + 4 * 34, 36)
    with Image.open(gif) as animation:
        assert animation.format == "GIF" and animation.n_frames == 4 + 2  # there and back
