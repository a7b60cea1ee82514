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
