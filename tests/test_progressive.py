"""Progressive distillation (``distill --method pd``): the grids, the DDIM step and the target
against closed forms, a tiny teacher halved stage by stage through the real CLI, exact resume
inside a stage and at its first step, bad input in one sentence."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY
from pixeldiffusion.cli import main
from pixeldiffusion.config import load_config
from pixeldiffusion.distill import student_config, tune
from pixeldiffusion.formulations import bridge_for
from pixeldiffusion.progressive import (
    ProgressiveDistiller,
    check_nested,
    ddim_step,
    distillation_target,
    stage_sigmas,
    truncated_snr_weight,
)
from pixeldiffusion.schedule import sampling_timesteps, sigma_of
from pixeldiffusion.train import Hook, lr_factor

PD = ["--method", "pd", "--progressive.from_steps", "8", "--progressive.to_steps", "1",
      "--progressive.stage_steps", "2", "--train.steps", "6", "--train.save_every", "2",
      "--train.eval_samples", "0", "--sample.n_samples", "4", "--no_progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")  # TINY: 50 timesteps, so grids up to 32 steps
    assert main(["train", "-e", str(run), *TINY, "--no_progress"]) == 0
    return run


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# --- the math ------------------------------------------------------------------------------------


def test_stage_grids_are_what_ddim_steps_through_and_halve_exactly():
    """stage_sigmas(N) is the sigma of each timestep of the uniform spacing, then 0 (the data);
    every grid from 512 steps down to 1 is every other point of the one before (T = 1000), and a
    chain of grids that is not (24 -> 3 steps of 50) is refused naming one that works."""
    ac = bridge_for(load_config(None).diffusion).alphas_cumprod
    grid = stage_sigmas(ac, 8)
    t = sampling_timesteps(1000, 8, "uniform")
    torch.testing.assert_close(grid[:-1], sigma_of(ac.double()[t]), rtol=0, atol=0)
    assert grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())
    for steps in (512, 256, 128, 64, 32, 16, 8, 4, 2):
        assert torch.equal(stage_sigmas(ac, steps)[::2], stage_sigmas(ac, steps // 2))
    check_nested(ac, 512, 1)
    check_nested(ac, 1000, 125)
    with pytest.raises(ValueError, match="cannot halve the 24-step DDIM grid of this model's 50 "
                                         "timesteps down to 3 .* the largest that works here"):
        check_nested(ac[:50], 24, 3)  # 50 / 24 is not exact in binary: the rounding differs


def test_ddim_steps_on_the_stage_grid_are_the_ddim_sampler(teacher):
    """What a student is trained to do is what ``sample --sampler ddim --spacing uniform`` does:
    chaining ``ddim_step`` over ``stage_sigmas`` with the model's EDM denoiser from the same
    noise gives the sampler's images (VP x_T = x / sqrt(1 + sigma_max^2)), for 1, 2 and 8 steps."""
    from pixeldiffusion.checkpoint import load_checkpoint
    from pixeldiffusion.consistency import teacher_denoiser
    from pixeldiffusion.samplers import sample

    loaded = load_checkpoint(teacher)
    bridge = bridge_for(loaded.config.diffusion)
    D = teacher_denoiser(loaded.model, bridge)
    z = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for steps in (1, 2, 8):
            expected = sample(bridge.wrap(loaded.model), z, bridge.alphas_cumprod, sampler="ddim",
                              steps=steps, spacing="uniform", prediction=bridge.prediction,
                              clip_x0=False, eta=0.0)
            grid = stage_sigmas(bridge.alphas_cumprod, steps).float()
            x = z * (1 + grid[0] ** 2).sqrt()  # the VP point x_T in EDM's coordinates
            for sigma, sigma_next in zip(grid[:-1], grid[1:], strict=True):
                x = ddim_step(D, x, sigma.expand(3), sigma_next.expand(3))
            torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def _gaussian_denoiser(s):
    """The exact denoiser of data ~ N(0, s^2): D(x, sigma) = s^2 / (s^2 + sigma^2) x."""
    def D(x, sigma, y=None):
        return (s**2 / (s**2 + sigma**2)).reshape(-1, 1, 1, 1) * x
    return D


def test_the_target_of_two_exact_gaussian_steps_matches_the_closed_form():
    """Gaussian data: a DDIM step is linear, x' = g(sigma, sigma') x with g = k + (sigma' /
    sigma)(1 - k), k = s^2 / (s^2 + sigma^2); two steps give g_ab g_bc x, and the target x~
    (Salimans & Ho 2022, Alg. 2) is (g_ab g_bc - sigma_c / sigma_a) / (1 - sigma_c / sigma_a)
    x; one DDIM step with x0 = x~ lands on the two steps' point. At sigma_c = 0 the target is
    the second step's x0."""
    s, D = 0.5, _gaussian_denoiser(0.5)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)

    def g(a, b):
        k = s**2 / (s**2 + a**2)
        return k + (b / a) * (1 - k)
    for sa, sb, sc in ((3.0, 1.0, 0.2), (80.0, 2.5, 0.0), (0.5, 0.3, 0.1)):
        sigma = {k: torch.full((3,), v, dtype=torch.float64)
                 for k, v in (("a", sa), ("b", sb), ("c", sc))}
        x_b = ddim_step(D, x, sigma["a"], sigma["b"])
        torch.testing.assert_close(x_b, g(sa, sb) * x)
        x_c = ddim_step(D, x_b, sigma["b"], sigma["c"])
        target = distillation_target(x, sigma["a"], x_c, sigma["c"])
        expected = (g(sa, sb) * g(sb, sc) - sc / sa) / (1 - sc / sa) * x
        torch.testing.assert_close(target, expected)
        one_step = target + (sc / sa) * (x - target)  # DDIM with x0 = x~
        torch.testing.assert_close(one_step, x_c)
        if sc == 0:
            torch.testing.assert_close(target, D(x_b, sigma["b"]))
    # a point mass at c: DDIM is exact, so two steps are one and the target is c itself
    c = torch.full((2, 1, 4, 4), 0.3, dtype=torch.float64)
    point = lambda x, sigma, y=None: c  # noqa: E731
    x = c + 5.0 * torch.randn_like(c)
    sa, sb, sc = (torch.full((2,), v, dtype=torch.float64) for v in (5.0, 1.0, 0.1))
    x_c = ddim_step(point, ddim_step(point, x, sa, sb), sb, sc)
    torch.testing.assert_close(distillation_target(x, sa, x_c, sc), c)


def test_the_weight_is_the_truncated_snr():
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0])
    torch.testing.assert_close(truncated_snr_weight(sigma), torch.tensor([100.0, 4.0, 1.0, 1.0]))


# --- through the CLI -----------------------------------------------------------------------------


def test_pd_distills_stage_by_stage_and_samples_with_ddim(teacher, tmp_path, capsys):
    """8 -> 4 -> 2 -> 1 DDIM steps, 2 optimizer steps a stage: the checkpoint is a diffusion
    model that says where it came from and samples with DDIM in 1 uniform step without x0
    clipping; each stage's teacher is the student's EMA at the stage's first step (checkpoint
    step 2's and 4's EMA weights), written under RUN/progressive; eval sweeps the steps."""
    student = tmp_path / "student"
    assert main(["distill", "-cp", str(teacher), "-e", str(student), *PD]) == 0
    log = capsys.readouterr().out
    assert "3 stages of 2 steps, 8 -> 1 DDIM steps" in log
    assert "stage 2 of 3, 4 -> 2 steps" in log and "stage 3 of 3, 2 -> 1 steps" in log
    weights = student / "checkpoints" / "step-0000006" / "weights.safetensors"
    cfg = json.loads(_metadata(weights)["config"])
    assert cfg["progressive"]["teacher"].endswith("weights.safetensors")
    assert cfg["consistency"]["method"] == "none"
    assert (cfg["sample"]["sampler"], cfg["sample"]["spacing"], cfg["sample"]["steps"],
            cfg["sample"]["clip_x0"]) == ("ddim", "uniform", 1, False)
    for stage, step in ((1, 2), (2, 4)):
        saved = student / "progressive" / f"stage-{stage}-teacher.safetensors"
        assert _metadata(saved)["step"] == str(step)
        ema = load_file(str(student / "checkpoints" / f"step-{step:07d}" / "weights.safetensors"))
        stage_teacher = load_file(str(saved))
        for key in stage_teacher:
            torch.testing.assert_close(stage_teacher[key], ema[key], rtol=0, atol=0)
    start, final = load_file(cfg["progressive"]["teacher"]), load_file(str(weights))
    assert any(not torch.equal(final[k], start[k]) for k in start if k.startswith("ema."))
    assert main(["sample", "-cp", str(student), "-bs", "4", "-sp", str(tmp_path / "s.png"),
                 "--save_dir", str(tmp_path / "s")]) == 0
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    assert images.shape == (4, 32, 32, 1)
    capsys.readouterr()
    assert main(["eval", "-cp", str(student), "-n", "8", "--micro_batch", "8", "--sweep",
                 "steps=1,2", "--out", str(tmp_path / "eval"), "--no_progress"]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [(r["setting"]["sampler"], r["nfe"]) for r in rows] == [("ddim", 1), ("ddim", 2)]


def test_the_learning_rate_falls_linearly_within_each_stage(teacher, tmp_path):
    """stage_lr linear, stages of 2, 2 and 3 steps (8 -> 1, 7 steps): train.lr times
    (end - step) / (end - start) in each, after the run's 2 warm-up steps, as the optimizer sees
    it at every step of a real run; stage_lr run (the default) is train.lr_schedule over the
    whole run instead."""
    base = student_config(teacher, ["--train.eval_samples", "0", "--progressive.from_steps",
                                    "8", "--progressive.stage_steps", "2", "--train.steps", "7",
                                    "--train.lr", "1e-3", "--progressive.stage_lr", "linear"],
                          method="pd")
    assert base.train.warmup_steps == 2
    expected = [1 / 2 * 1, 1 * 1 / 2, 1, 1 / 2, 1, 2 / 3, 1 / 3]
    assert [ProgressiveDistiller(base).lr_factor(s) for s in range(7)] == pytest.approx(expected)
    seen = []
    tune(base, tmp_path / "run", progress=False, log=lambda *_: None,
         hooks=[Hook(1, lambda state: seen.append(state.optimizer.param_groups[0]["lr"]))])
    # after step s (0-based) the optimizer holds the rate it will use for step s + 1
    assert seen[:6] == pytest.approx([1e-3 * f for f in expected[1:]], rel=1e-12)
    whole = student_config(teacher, ["--progressive.from_steps", "8", "--train.lr_schedule",
                                     "cosine", "--train.steps", "7"], method="pd")
    assert whole.progressive.stage_lr == "run"
    assert [ProgressiveDistiller(whole).lr_factor(s) for s in range(7)] == \
        [lr_factor(s, 2, "cosine", 7) for s in range(7)]


@pytest.mark.parametrize("stage_lr", ["run", "linear"])
@pytest.mark.parametrize("stop", [3, 4])
def test_pd_resumes_exactly_inside_a_stage_and_at_its_first_step(teacher, tmp_path, stop,
                                                                stage_lr):
    """6 steps in one go == ``stop`` steps, stop, resume to 6 (dropout on): inside stage 1
    (stop 3) the stage's teacher comes back from its file; at stage 2's first step (stop 4) it
    is made from the restored EMA, as the uninterrupted run made it; either LR schedule."""
    base = student_config(teacher, ["--train.eval_samples", "0", "--progressive.from_steps",
                                    "8", "--progressive.stage_steps", "2", "--train.steps", "6",
                                    "--progressive.stage_lr", stage_lr], method="pd")
    assert base.model.dropout == 0.1 and base.progressive.to_steps == 1
    quiet = {"progress": False, "log": lambda *_: None, "hooks": []}
    straight = tune(base, tmp_path / "a", **quiet)
    tune(replace(base, train=replace(base.train, steps=stop)), tmp_path / "b", **quiet)
    resumed = tune(base, tmp_path / "b", resume="auto", **quiet)
    assert straight.step == resumed.step == 6
    a = load_file(str(straight.checkpoint / "weights.safetensors"))
    b = load_file(str(resumed.checkpoint / "weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_pd_resumed_inside_a_stage_without_its_teacher_says_so(teacher, tmp_path):
    base = student_config(teacher, ["--train.eval_samples", "0", "--progressive.from_steps",
                                    "4", "--progressive.stage_steps", "2", "--train.steps", "4"],
                          method="pd")
    quiet = {"progress": False, "log": lambda *_: None, "hooks": []}
    tune(replace(base, train=replace(base.train, steps=3)), tmp_path / "b", **quiet)
    (tmp_path / "b" / "progressive" / "stage-1-teacher.safetensors").unlink()
    with pytest.raises(ValueError, match="resumes inside progressive distillation's stage 1, "
                                         "but its teacher .* is missing"):
        tune(base, tmp_path / "b", resume="auto", **quiet)


@pytest.mark.parametrize(("extra", "message"), [
    (["--progressive.from_steps", "6", "--progressive.to_steps", "2"],
     "must be progressive.to_steps (2) times a power of 2"),
    (["--progressive.from_steps", "2", "--progressive.to_steps", "2"],
     "must be progressive.to_steps (2) times a power of 2"),
    (["--progressive.from_steps", "64"], "must be at most diffusion.timesteps (50)"),
    (["--progressive.from_steps", "24", "--progressive.to_steps", "3"], "cannot halve"),
])
def test_bad_pd_settings_are_one_sentence(teacher, tmp_path, capsys, extra, message):
    capsys.readouterr()
    assert main(["distill", "-cp", str(teacher), "-e", str(tmp_path / "out"), "--method", "pd",
                 "--no_progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()
