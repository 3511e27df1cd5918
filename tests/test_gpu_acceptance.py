"""benchmarks/gpu_acceptance.sh runs end to end: here on the CPU at tiny sizes, without the official code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.sh"


def test_gpu_acceptance_script_prints_every_figure_on_cpu_at_tiny_sizes(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=900)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for section in ("1. CUDA test subset", "2a. throughput: advent_deeplabv2_r101", "2b. throughput: daformer",
                    "3. da_seg vs the official ADVENT step", "4. summary against the targets"):
        assert section in out
    assert "skipped: no --official-src given" in out          # CI has no official checkout
    assert "CUDA test subset: passed" in out
    advent = json.loads((tmp_path / "advent.json").read_text())["rows"]
    daformer = json.loads((tmp_path / "daformer.json").read_text())["rows"]
    assert [r["batch"] for r in advent + daformer] == ["1+1", "2+2"]
    assert all(r["step_ms"] > 0 and r["peak_mib"] > 0 for r in advent + daformer)
    assert [mode for mode, _ in advent[0]["eval"]] == ["whole", "slide"]
    assert "overhead" in out and "MiB target" in out and "evaluation deeplab_small whole" in out
