"""The benchmark scripts' own paths that need no benchmark extra (diffusers), run for real.

The numbers they print are measurements for the README, not asserted here; what is checked is
that the script runs end to end and trains each recipe as it was given.
"""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import TINY

REPO = Path(__file__).resolve().parent.parent


def test_quality_per_minute_runs_our_recipes_alone(tmp_path):
    """``--diffusers_minutes`` with no value: our recipes only (a path that once crashed). A
    recipe given as a config file keeps its own ``train.steps``; one given as overrides trains
    until the budget unless it sets them. A class-conditional recipe is sampled with its own
    labels and says so in its row."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"steps": 3}, "model": {"num_classes": 10},
                                      "sample": {"class_label": "random"}}))
    tiny = " ".join(TINY)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality_per_minute.py"), "--cores", "1",
         "--diffusers_minutes", "--ours_minutes", "5", "--samples", "100", "--out", str(out),
         "--ours", f"fromfile=-c {recipe} {tiny.replace('--train.steps 4', '')}",
         "--ours", f"overrides={tiny}"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {m[1]: (int(m[2]), float(m[3])) for m in re.finditer(
        r"^\| pixeldiffusion (\w+) .*? \| [\d.]+ \| (\d+) \| ([\d.]+) \|", result.stdout, re.M)}
    assert rows.keys() == {"fromfile", "overrides"}, result.stdout
    assert rows["fromfile"][0] == 3 and rows["overrides"][0] == 4
    labels = dict(re.findall(r"^\| pixeldiffusion (\w+) [^|]*\), ([^|]*) \|", result.stdout, re.M))
    assert labels["fromfile"].endswith(", class random, w 1"), labels  # a conditional recipe
    assert "class" not in labels["overrides"], labels
    assert "held-out real digits (floor)" in result.stdout
    assert (out / "side_by_side.png").is_file()
    assert all(fid > 0 for _, fid in rows.values())


def _quality_per_minute(*args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality_per_minute.py"),
                           "--cores", "1", "--diffusers_minutes", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_quality_per_minute_autoguides_each_recipe_by_its_own_early_ema(tmp_path):
    """``--autoguidance STEP:W``: a second row per recipe, sampled with the run's own post-hoc EMA
    (sigma_rel 0.05) at the last snapshot by STEP as the guide; the guide file is that
    reconstruction, and its images differ from the unguided row's."""
    from pixeldiffusion.checkpoint import read_metadata

    out = tmp_path / "out"
    tiny = " ".join(TINY)
    done = _quality_per_minute("--ours_minutes", "5", "--samples", "60", "--out", out,
                               "--ours", f"tiny={tiny} --train.posthoc_ema_every 2",
                               "--autoguidance", "3:2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| pixeldiffusion tiny (.*?) \| [\d.]+ \| (\d+) \| ([\d.]+) \|",
                      done.stdout, re.M)
    assert len(rows) == 2, done.stdout
    assert "autoguided" not in rows[0][0]
    assert "autoguided by its own step-2 post-hoc EMA (sigma_rel 0.05), w 2" in rows[1][0]
    assert rows[0][1] == rows[1][1] == "4"  # the same trained model
    assert float(rows[0][2]) != float(rows[1][2])
    metadata = read_metadata(out / "ours-tiny-guide.safetensors")
    assert metadata["step"] == "2" and float(metadata["sigma_rel"]) == 0.05, metadata
    assert (out / "ours-tiny-autoguided.png").is_file()


def test_quality_per_minute_refuses_autoguidance_without_snapshots_before_training(tmp_path):
    """A recipe that records no post-hoc EMA snapshots (or the first too late) cannot give a
    guide: one message naming the fix, before any minute is spent on training."""
    out = tmp_path / "out"
    for extra, step in (("", "2"), (" --train.posthoc_ema_every 4", "3")):
        done = _quality_per_minute("--ours_minutes", "5", "--out", out, "--autoguidance",
                                   f"{step}:2", "--ours", f"tiny={' '.join(TINY)}{extra}")
        assert done.returncode != 0
        assert "records none by then" in done.stderr and "--train.posthoc_ema_every" in \
            done.stderr, done.stderr[-2000:]
        assert not (out / "ours-tiny").exists()
    bad = _quality_per_minute("--autoguidance", "two:2", "--out", out)
    assert bad.returncode == 2 and "expected STEP:W" in bad.stderr


def _guidance_diversity(*args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "guidance_diversity.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=600)


def test_guidance_diversity_scores_each_setting_against_the_unguided_model(tmp_path):
    """A tiny class-conditional run and its step-2 checkpoint as the guide: the table has the
    unguided row first (1.00 x itself), one row per setting, autoguidance at twice the model
    calls (two networks), an interval that guides only some steps in between, and every class
    accuracy a percentage; a grid per row. Bad input is one line, exit 2."""
    from pixeldiffusion.cli import main

    run = tmp_path / "run"
    assert main(["train", "-e", str(run), "--no_progress", *TINY, "--model.num_classes", "10",
                 "--train.save_every", "2", "--diffusion.timesteps", "1000"]) == 0
    guide = run / "checkpoints" / "step-0000002"
    out = tmp_path / "out"
    done = _guidance_diversity(run, "--guide", guide, "--samples", "40", "--out", out,
                               "--settings", "cfg=1.5", "auto=2", "auto=2@0.5-5",
                               "auto=2+cfg=1.2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| ([^|]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| "
                      r"([\d.]+)% \|", done.stdout, re.M)
    names = [r[0] for r in rows]
    assert names == ["unguided (w = 1)", "cfg w=1.5", "auto w=2", "auto w=2 sigma in (0.5, 5]",
                     "auto w=2 + cfg w=1.2"]
    nfe = {name: int(n) for name, n, *_ in rows}
    assert nfe["cfg w=1.5"] == nfe["unguided (w = 1)"] == 3  # CFG: one batched pass a step
    assert nfe["auto w=2"] == 6  # autoguidance: the model and the guide every step
    assert 3 < nfe["auto w=2 sigma in (0.5, 5]"] < 6, nfe  # guided on some steps only
    assert nfe["auto w=2 + cfg w=1.2"] == 6  # the model's 2N batch and the guide
    fid = {name: float(f) for name, _, f, *_ in rows}
    assert fid["auto w=2 + cfg w=1.2"] != fid["auto w=2"]
    assert float(rows[0][3]) == 1.0
    assert all(0 <= float(r[4]) <= 100 for r in rows)
    assert len(list(out.glob("*.png"))) == 5

    # from 650 samples the table adds digit-FID_inf and the ratio of those
    done = _guidance_diversity(run, "--samples", "650", "--out", out, "--settings", "cfg=1.5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| digit-FID inf | x unguided inf |" in done.stdout
    inf_rows = re.findall(r"^\| (unguided \(w = 1\)|cfg w=1.5) \| \d+ \| [\d.]+ \| [\d.]+ \| "
                          r"(-?[\d.]+) \| ([\d.]+|n/a) \|", done.stdout, re.M)
    assert [r[0] for r in inf_rows] == ["unguided (w = 1)", "cfg w=1.5"], done.stdout
    assert inf_rows[0][2] in ("1.00", "n/a")

    bad = _guidance_diversity(run, "--settings", "auto=2", "--out", out)
    assert bad.returncode == 2 and "need --guide" in bad.stderr
    for setting in ("cfg=two", "cfg=1.5+cfg=1.2", "auto=2+auto=3"):
        bad = _guidance_diversity(run, "--settings", setting, "--out", out)
        assert bad.returncode == 2 and "KIND=W" in bad.stderr
    bad = _guidance_diversity(run, "--guide", tmp_path / "nowhere.safetensors", "--out", out)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr
