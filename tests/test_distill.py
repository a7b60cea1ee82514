"""``pixeldiffusion distill``: a tiny teacher tuned into a consistency model through the real CLI,
resumed exactly, sampled in 1 and 2 steps, swept by eval; the teacher of any formulation seen as
EDM's raw network; bad input refused in one sentence."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY
from pixeldiffusion.cli import main
from pixeldiffusion.config import DiffusionConfig, from_dict, load_config
from pixeldiffusion.consistency import EDMRawNetwork, student_function, teacher_denoiser
from pixeldiffusion.distill import student_config, tune
from pixeldiffusion.formulations import bridge_for, edm_scalings
from pixeldiffusion.schedule import sigma_of
from pixeldiffusion.unet import UNet

DISTILL = ["--train.steps", "4", "--train.save_every", "2", "--train.log_every", "2",
           "--train.eval_samples", "0", "--sample.n_samples", "4", "--no_progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    assert main(["train", "-e", str(run), *TINY, "--no_progress"]) == 0
    return run


def _config_of(weights):
    with safe_open(str(weights), framework="pt") as f:
        return json.loads(f.metadata()["config"])


def test_distill_trains_samples_and_sweeps_through_the_cli(teacher, tmp_path, capsys):
    student = tmp_path / "student"
    assert main(["distill", "-cp", str(teacher), "-e", str(student), *DISTILL]) == 0
    weights = student / "checkpoints" / "step-0000004" / "weights.safetensors"
    section = _config_of(weights)["consistency"]
    assert section["method"] == "ect" and section["teacher"].endswith("weights.safetensors")
    assert 0 < section["sigma_max"] <= 80 and section["sigma_min"] == 0.002
    assert _config_of(weights)["sample"]["sampler"] == "consistency"
    # tuning moved the weights away from the teacher's
    tuned, start = load_file(str(weights)), load_file(section["teacher"])
    assert any(not torch.equal(tuned[k], start[k]) for k in start if k.startswith("ema."))
    for steps in ("1", "2"):
        out = tmp_path / f"s{steps}.png"
        assert main(["sample", "-cp", str(student), "--steps", steps, "-bs", "4",
                     "-sp", str(out), "--save_dir", str(tmp_path / steps)]) == 0
        assert out.is_file()
    a = np.load(tmp_path / "1" / "samples.npz")["images"]
    b = np.load(tmp_path / "2" / "samples.npz")["images"]
    assert a.shape == b.shape == (4, 32, 32, 1) and not np.array_equal(a, b)
    capsys.readouterr()
    assert main(["eval", "-cp", str(student), "-n", "8", "--micro_batch", "8", "--sweep",
                 "steps=1,2,4", "--out", str(tmp_path / "eval"), "--no_progress"]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["nfe"] for r in rows] == [1, 2, 4]


def test_cd_distills_through_the_cli_with_the_teachers_ode_step(teacher, tmp_path):
    """``distill --method cd``: the checkpoint says cd and its solver, sampling works, and the
    tuned weights differ from ECT's on the same data, seeds and steps (the target is the
    teacher's ODE step, not x0 + r eps)."""
    runs = {}
    for method in ("ect", "cd"):
        runs[method] = tmp_path / method
        assert main(["distill", "-cp", str(teacher), "-e", str(runs[method]), "--method", method,
                     *DISTILL, "--consistency.d", "1"]) == 0
    weights = {m: run / "checkpoints" / "step-0000004" / "weights.safetensors"
               for m, run in runs.items()}
    section = _config_of(weights["cd"])["consistency"]
    assert section["method"] == "cd" and section["solver"] == "euler"
    cd, ect = load_file(str(weights["cd"])), load_file(str(weights["ect"]))
    assert any(not torch.equal(cd[k], ect[k]) for k in cd)
    assert main(["sample", "-cp", str(runs["cd"]), "--steps", "1", "-bs", "4",
                 "-sp", str(tmp_path / "cd.png")]) == 0


def test_sample_takes_the_intermediate_sigmas(teacher, tmp_path, capsys):
    """``sample --mid_sigmas``: other intermediate noise levels change the 2-step images (same
    noise); a count that does not fit --steps, and the flag on a diffusion model, are one line."""
    student = tmp_path / "student"
    assert main(["distill", "-cp", str(teacher), "-e", str(student), *DISTILL]) == 0
    drawn = {}
    for mids in ("0.5", "0.2"):  # this tiny teacher's 50-step table ends at sigma 0.81
        out = tmp_path / mids
        assert main(["sample", "-cp", str(student), "--steps", "2", "-bs", "4", "--mid_sigmas",
                     mids, "-sp", str(out / "grid.png"), "--save_dir", str(out)]) == 0
        drawn[mids] = np.load(out / "samples.npz")["images"]
    assert not np.array_equal(drawn["0.5"], drawn["0.2"])
    capsys.readouterr()
    for argv, message in [
            (["-cp", str(student), "--steps", "3", "--mid_sigmas", "0.5"], "mid_sigmas"),
            (["-cp", str(teacher), "--mid_sigmas", "2.5"], "is a diffusion model")]:
        assert main(["sample", *argv, "-bs", "2", "-sp", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_eval_takes_and_sweeps_the_intermediate_sigmas(teacher, tmp_path, capsys):
    """``eval --sweep mid_sigmas=...`` (several levels of one point joined by /) scores each
    point with its own levels; ``eval --mid_sigmas`` fixes them; a count that does not fit the
    steps is refused before any sampling, and the flag on a diffusion model is one line."""
    student = tmp_path / "student"
    assert main(["distill", "-cp", str(teacher), "-e", str(student), *DISTILL]) == 0
    common = ["-n", "8", "--micro_batch", "8", "--no_progress"]

    def table(*argv):
        capsys.readouterr()
        assert main(["eval", "-cp", str(student), *common, "--out", str(tmp_path / "ev"),
                     *argv]) == 0
        header, *rows = capsys.readouterr().out.splitlines()
        cells = [dict(zip(header.split(), row.split(), strict=True))
                 for row in rows if row.split() and row.split()[0] == "consistency"]
        return cells

    two = table("--steps", "2", "--sweep", "mid_sigmas=0.5,0.2")
    assert [c["mid_sigmas"] for c in two] == ["0.5", "0.2"]
    assert two[0]["digit_fid"] != two[1]["digit_fid"]
    four = table("--steps", "4", "--sweep", "mid_sigmas=0.6/0.3/0.1")
    assert [(c["steps"], c["nfe"], c["mid_sigmas"]) for c in four] == [("4", "4", "0.6/0.3/0.1")]
    fixed = table("--steps", "2", "--mid_sigmas", "0.5")
    assert fixed[0]["digit_fid"] == two[0]["digit_fid"]  # same noise, same levels
    for argv, message in [
            (["-cp", str(student), "--sweep", "steps=1,2", "--mid_sigmas", "0.5"], "mid_sigmas"),
            (["-cp", str(teacher), "--mid_sigmas", "0.5"], "is a diffusion model"),
            (["-cp", str(teacher), "--sweep", "mid_sigmas=0.5"], "is a diffusion model")]:
        capsys.readouterr()
        assert main(["eval", *argv, *common, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("pixeldiffusion: error")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method, solver", [("ect", "euler"), ("cd", "heun")])
def test_distill_resumes_exactly(teacher, tmp_path, method, solver):
    """4 steps in one go == 2 steps, stop, resume, 2 more (dropout on: the RNG states, the
    optimizer, the step that ECT's r(t) reads and the EMA must all be restored; cd's frozen
    teacher is loaded again on resume)."""
    base = student_config(teacher, ["--train.eval_samples", "0", "--consistency.d", "1",
                                    "--consistency.solver", solver], method=method)
    assert base.consistency.method == method
    assert base.model.dropout == 0.1  # the teacher's dropout, kept
    quiet = {"progress": False, "log": lambda *_: None, "hooks": []}
    straight = tune(base, tmp_path / "a", **quiet)
    tune(replace(base, train=replace(base.train, steps=2)), tmp_path / "b", **quiet)
    resumed = tune(base, tmp_path / "b", resume="auto", **quiet)
    assert straight.step == resumed.step == base.train.steps
    a = load_file(str(straight.checkpoint / "weights.safetensors"))
    b = load_file(str(resumed.checkpoint / "weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(("argv", "message"), [
    (["distill", "-cp", "NOWHERE", "-e", "OUT"], "does not exist"),
    (["distill", "-cp", "FILE", "-e", "OUT"], "is not a readable safetensors checkpoint"),
    (["distill", "-e", "OUT"], "distill needs a teacher"),
    (["distill", "-cp", "TEACHER", "-e", "OUT", "--resume", "auto"], "--resume needs"),
    (["sample", "-cp", "TEACHER", "--sampler", "consistency"], "needs a consistency model"),
])
def test_bad_input_is_one_sentence(teacher, tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("not a checkpoint")
    paths = {"NOWHERE": tmp_path / "nowhere", "FILE": tmp_path / "FILE", "TEACHER": teacher,
             "OUT": tmp_path / "out"}
    argv = [str(paths.get(a, a)) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_consistency_model_refuses_diffusion_samplers_teachers_and_zero_steps(
        teacher, tmp_path, capsys):
    student = tmp_path / "student"
    assert main(["distill", "-cp", str(teacher), "-e", str(student), *DISTILL,
                 "--train.steps", "1"]) == 0
    capsys.readouterr()
    assert main(["sample", "-cp", str(student), "--sampler", "ddim"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a consistency model" in err[0] and "--steps 1, 2 or 4" in err[0]
    assert main(["distill", "-cp", str(student), "-e", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already a consistency model" in err[0]
    with pytest.raises(SystemExit) as stop:
        main(["sample", "-cp", str(student), "--steps", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "expected a positive integer, got 0" in err[-1]


# --- any formulation as EDM's raw network ------------------------------------------------------


def _unet(num_classes=0):
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), norm_groups=4, num_classes=num_classes).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return net


def test_an_edm_teacher_is_its_own_raw_network():
    """EDM's D = c_skip x + c_out F, so (D - c_skip x) / c_out gives back F itself."""
    net = _unet()
    raw = EDMRawNetwork(net, bridge_for(DiffusionConfig(formulation="edm", timesteps=100)))
    sigma = torch.tensor([0.01, 0.3, 2.0, 60.0])
    _, _, c_in, c_noise = edm_scalings(sigma)
    x_in = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) \
        * (c_in * (1 + sigma)).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(raw(x_in, c_noise), net(x_in, c_noise), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_ddpm_teacher_denoises_as_its_sampler_does(prediction):
    """At a table timestep t the bridge's D(x; sigma_t) is the x0 the samplers get from the
    network at x_t = x / sqrt(1 + sigma_t^2), and at sigma_min = 0 the student f is that D."""
    d = DiffusionConfig(prediction=prediction, timesteps=50)
    bridge = bridge_for(d)
    net = _unet()
    t = torch.tensor([0, 10, 30, 49])
    abar = bridge.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    sigma = sigma_of(bridge.alphas_cumprod[t]).float()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * (1 + sigma).reshape(
        -1, 1, 1, 1)
    with torch.no_grad():
        x_t = x * abar.sqrt()
        out = net(x_t, t)
        x0 = (x_t - (1 - abar).sqrt() * out) / abar.sqrt() if prediction == "eps" else \
            abar.sqrt() * x_t - (1 - abar).sqrt() * out
        torch.testing.assert_close(teacher_denoiser(net, bridge)(x, sigma), x0, rtol=1e-4,
                                   atol=1e-4)
        f = student_function(net, bridge, sigma_min=0.0)
        torch.testing.assert_close(f(x, sigma), x0, rtol=1e-3, atol=1e-3)
        assert torch.equal(student_function(net, bridge)(x, 0.002), x)  # the boundary


def test_guided_sampling_of_a_conditional_student(tmp_path):
    """A class-conditional teacher's student samples each class with guidance through the same
    generate() call (one batched pass of 2N per step at w > 1)."""
    from pixeldiffusion.generate import generate

    cfg = load_config(None, [*TINY, "--model.num_classes", "3", "--data.image_size", "8",
                             "--model.attn_resolutions", "4",
                             "--sample.n_samples", "6", "--sample.nrow", "2",
                             "--sample.batch_size", "6"])
    cfg = from_dict({"consistency": {"method": "ect", "sigma_max": 0.8},
                     "sample": {"sampler": "consistency", "steps": 2}}, base=cfg)
    net = _unet(num_classes=3)
    calls = []

    def hook(module, args, kwargs):
        calls.append(kwargs["y"].tolist())
    net.register_forward_pre_hook(hook, with_kwargs=True)
    out = generate(net, cfg, torch.device("cpu"), guidance=2.0, class_label="all")
    assert out.images.shape == (6, 1, 8, 8) and out.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(calls) == 2 and calls[0] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]


def test_few_step_benchmark_runs_at_a_tiny_size(teacher, tmp_path):
    """benchmarks/few_step.py end to end: tune (2 steps), sample, score, table and picture."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "few_step.py"
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(script), str(teacher), "--minutes", "5", "--samples", "20",
         "--steps", "1,2", "--nfe", "1,2", "--distill", "--train.steps 2", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| (.+?) \| (\d*) \| ([\d.]+) \|", result.stdout, re.M)
    names = [name for name, _, _ in rows]
    assert names[0] == "held-out real digits (floor)"
    assert "tuned (2 steps of ECT), 1 step(s)" in names
    assert any(name.startswith("teacher") for name in names)
    assert all(float(fid) > 0 for _, _, fid in rows)
    assert (out / "same_noise.png").is_file()


def test_few_step_benchmark_samples_each_progressive_stage_at_its_own_steps(teacher, tmp_path):
    """``--distill "--method pd ..."``: 4 -> 1 steps; the 1-step row is the final checkpoint, the
    2-step row the stage that ended at 2 steps (the last stage's teacher file), and a step count
    no stage made (3) is said and skipped, not sampled from the wrong student."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "few_step.py"
    out = tmp_path / "out"
    pd = ("--method pd --progressive.from_steps 4 --progressive.to_steps 1 "
          "--progressive.stage_steps 2 --train.steps 4")
    result = subprocess.run(
        [sys.executable, str(script), str(teacher), "--minutes", "5", "--samples", "20",
         "--steps", "1,2,3", "--nfe", "2", "--distill", pd, "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = re.findall(r"^\| (tuned .+?) \|", result.stdout, re.M)
    assert names == ["tuned (4 steps of PD), 1 step(s)", "tuned (4 steps of PD), 2 step(s)"]
    assert "no 3-step student" in result.stdout
    assert (out / "tuned" / "progressive" / "stage-1-teacher.safetensors").is_file()
