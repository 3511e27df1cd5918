"""The `da-seg` command line, as a user types it (click's runner, tiny domains)."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from da_seg.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_sweep_then_eval_then_compare(write_recipe, tiny_domains, tmp_path):
    recipe = write_recipe(iters=3, extra="eval_every = 3")
    runs = tmp_path / "runs"
    out = invoke("sweep", recipe, "--seeds", "2", "--runs", runs, "--no-progress", "--format", "markdown")
    rows = [line for line in out.splitlines() if line.startswith("| tiny_src->tiny_tgt | tiny |")]
    assert len(rows) == 1 and rows[0].split("|")[3].strip() == "2"  # one row, two seeds
    # Re-running the sweep skips finished runs instead of training again.
    again = invoke("sweep", recipe, "--seeds", "2", "--runs", runs, "--no-progress")
    assert again.count("skipped") == 2

    checkpoint = next(runs.rglob("best.pt"))
    out = invoke("eval", checkpoint, "--domain", tiny_domains["target"], "--per-class", "--flip")
    assert "tiny_tgt val: mIoU" in out and "red" in out

    table = invoke("compare", runs, "--format", "csv", "--per-class")
    header, row = table.strip().splitlines()[:2]
    assert "recipe" in header and "red" in header
    assert row.count(",") == header.count(",")


def test_list_commands():
    assert "deeplab_small" in invoke("list", "models")
    assert "source_ce" in invoke("list", "methods")
    assert "cityscapes" in invoke("list", "domains")


def test_bad_recipe_key_is_one_clear_line_and_exit_code_2(write_recipe, tmp_path):
    path = write_recipe()
    path.write_text(path.read_text().replace("[optim]", "[optim]\nmomentun = 0.9"))
    done = subprocess.run([sys.executable, "-m", "da_seg", "train", str(path), "--runs", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown key 'optim.momentun'; did you mean 'optim.momentum'?" in done.stderr
    assert "Traceback" not in done.stderr
