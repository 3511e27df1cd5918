"""Whole-process behaviour: SIGKILL + resume, and a 2-process gloo (DDP) run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from da_seg.engine.checkpoint import load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.rglob("recipe.toml"))


def test_sigkill_then_resume_ends_at_the_same_iteration(write_recipe, tmp_path):
    recipe = write_recipe(iters=30, extra="checkpoint_every = 4\neval_every = 15")
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "da_seg", "train", str(recipe), "--runs", str(runs), "--no-progress"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    killed_at = None
    try:
        while time.time() < deadline and proc.poll() is None:
            dirs = run_dirs(runs)
            if dirs and (dirs[0] / "last.pt").exists():
                state = load_checkpoint(dirs[0] / "last.pt")
                if state["iteration"] >= 8:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = state["iteration"]
                    break
            time.sleep(0.05)
    finally:
        proc.wait(timeout=60)
    assert killed_at is not None, "the run finished or stalled before it could be killed"
    (run_dir,) = run_dirs(runs)
    assert not (run_dir / "metrics.json").exists() or not json.loads((run_dir / "metrics.json").read_text())["finished"]
    done = subprocess.run(cmd + ["--resume", "auto"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] and metrics["iteration"] == 30
    assert [e["iteration"] for e in metrics["evaluations"]] == [15, 30]
    assert metrics["last"]["domains"]["tiny_tgt"]["miou"] is not None
    assert run_dirs(runs) == [run_dir]  # resumed in place, no second run folder


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_process_gloo_run(write_recipe, tmp_path):
    recipe = write_recipe(iters=4, extra="checkpoint_every = 2\neval_every = 4")
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "da_seg", "train", str(recipe), "--runs", str(runs), "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = run_dirs(runs)  # one folder: rank 0 chose it and told rank 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] and metrics["iteration"] == 4
    # 4 target val images split over 2 ranks and summed: the confusion covers every pixel once.
    assert metrics["last"]["domains"]["tiny_tgt"]["pixel_accuracy"] is not None
