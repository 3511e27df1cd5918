"""Sweep launchers: several runs at once on this machine, and Slurm jobs through submitit (tried
with submitit's in-process debug executor, and the sbatch script it would submit)."""
from __future__ import annotations

from pathlib import Path

import pytest

from da_seg.engine.compare import collect_runs, summarize
from da_seg.stages import sweep
from da_seg.stages.launch import SlurmOptions, SweepJob, log_path, slurm_executor, waves


def _job(label, alone=False):
    return SweepJob(Path("r.toml"), "train", (), label, alone=alone)


def test_jobs_that_feed_later_ones_run_by_themselves():
    jobs = [_job("a0"), _job("a1"), _job("translate", alone=True), _job("b0"), _job("b1"), _job("c", alone=True)]
    assert [[j.label for j in wave] for wave in waves(jobs)] == [["a0", "a1"], ["translate"], ["b0", "b1"], ["c"]]
    assert log_path(Path("runs"), _job("tiny seed 0")) == Path("runs/sweep_logs/tiny_seed_0.log")


def test_slurm_sweep_submits_each_recipe_seed_once_and_skips_finished_runs(write_recipe, tmp_path, capsys):
    pytest.importorskip("submitit")
    path = write_recipe(iters=2, extra="eval_every = 2")
    runs = tmp_path / "runs"
    debug = SlurmOptions(cluster="debug", gpus_per_job=0)   # the jobs run here, in this process
    folders = sweep([path], seeds=2, runs_root=runs, progress=False, launcher="slurm", slurm=debug)
    out = capsys.readouterr().out
    assert out.count("[sweep] submitted") == 2 and "tiny seed 1: job" in out
    assert [f.relative_to(runs).parts[:2] for f in folders] == [("tiny", "tiny_src_to_tiny_tgt")] * 2
    assert [f.name.split("-")[0] for f in folders] == ["0", "1"]
    (row,) = summarize(collect_runs(folders))
    assert row.seeds == 2
    # Again: both are finished, so nothing is submitted and the same folders come back.
    assert sweep([path], seeds=2, runs_root=runs, progress=False, launcher="slurm", slurm=debug) == folders
    out = capsys.readouterr().out
    assert "submitted" not in out and out.count("skipped") == 2 and "0 of 2 runs to do" in out


def test_slurm_jobs_ask_for_the_gpus_nodes_and_tasks_of_a_multi_gpu_run(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    fake_bin = tmp_path / "bin"   # submitit looks for srun before it writes a Slurm script
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{__import__('os').environ['PATH']}")
    options = SlurmOptions(cluster="slurm", partition="gpu", gpus_per_job=4, nodes=2, timeout_min=90,
                           extra={"slurm_account": "lab"})
    executor = slurm_executor(tmp_path / "runs", options)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--partition=gpu", "--time=90",
                 "--account=lab", "--job-name=da_seg"):
        assert f"#SBATCH {line}" in script, line
    assert str(tmp_path / "runs" / "slurm") in script        # logs next to the runs
    with pytest.raises(ValueError, match="launcher 'kubernetes'; valid: local, slurm"):
        sweep([], seeds=1, runs_root=tmp_path / "runs", launcher="kubernetes")


def test_local_launcher_runs_seeds_at_once_with_a_log_each(write_recipe, tmp_path, capsys):
    path = write_recipe(iters=2, extra="eval_every = 2")
    runs = tmp_path / "runs"
    folders = sweep([path], seeds=2, runs_root=runs, device="cpu", progress=False, jobs=2)
    out = capsys.readouterr().out
    assert "2 at once" in out and out.count("[sweep] done") == 2
    assert [f.name.split("-")[0] for f in folders] == ["0", "1"]
    assert all((f / "metrics.json").exists() for f in folders)
    for seed in (0, 1):
        log = (runs / "sweep_logs" / f"tiny_seed_{seed}.log").read_text()
        assert "run folder" in log and "tiny" in log                    # each run's output in its own file
