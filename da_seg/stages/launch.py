"""Where a sweep's runs execute: one after another in this process (``local``, the default),
several at once on this machine (``local`` with ``jobs > 1``: one process per run, one GPU each),
or each as a Slurm job through submitit (``slurm``, extra ``[slurm]``).

Every launcher keeps the rules of the plain sweep: the runs of one recipe x seed are found by
:func:`da_seg.runs.find_runs`, a finished one is skipped (not even submitted), an interrupted
one resumed by the job that runs it. A job whose stage is not ``runs_alongside`` (a translation
that later recipes train on, self-training that may train its warm-up recipe) runs by itself:
the jobs before it finish first, the jobs after it start when it is done.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

LAUNCHERS = ("local", "slurm")


@dataclass(frozen=True)
class SweepJob:
    """One recipe x seed of a sweep: what :func:`run_job` runs wherever it runs."""

    recipe_path: Path
    stage: str                    # a name of da_seg.stages.STAGES
    overrides: tuple[str, ...]
    label: str                    # "<recipe> seed <n>", for the sweep's messages and log files
    alone: bool = False           # its results are inputs of later jobs: run it by itself


@dataclass(frozen=True)
class SlurmOptions:
    """The resources of each Slurm job; ``gpus_per_job`` > 1 or ``nodes`` > 1 make each job a
    multi-GPU run (one task per GPU, joined by torch.distributed as under torchrun).
    ``cluster``: submitit's executor (None: Slurm when ``sbatch`` is there; "local" / "debug" run
    the same jobs on this machine, for trying a sweep before a cluster)."""

    partition: str = ""
    timeout_min: int = 24 * 60
    gpus_per_job: int = 1
    nodes: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 0               # 0: the partition's default
    parallel: int = 0             # at most this many jobs at once (Slurm array throttle); 0: no limit
    cluster: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # more submitit parameters (slurm_account=...)


def run_job(job: SweepJob, runs_root: str, device: str = "auto", progress: bool = False) -> str:
    """Run one job by its stage; returns its result folder (a string: it crosses processes)."""
    from da_seg.stages import STAGES

    return str(STAGES[job.stage].run(Path(job.recipe_path), overrides=job.overrides, runs_root=Path(runs_root),
                                     device=device, progress=progress, label=job.label))


def waves(jobs: Sequence[SweepJob]) -> list[list[SweepJob]]:
    """Consecutive jobs that may run at the same time; a job that runs ``alone`` is a wave of its own."""
    groups: list[list[SweepJob]] = []
    for job in jobs:
        if job.alone or not groups or groups[-1][0].alone:
            groups.append([job])
        else:
            groups[-1].append(job)
    return groups


def log_path(runs_root: Path, job: SweepJob) -> Path:
    return Path(runs_root) / "sweep_logs" / (re.sub(r"[^\w.-]+", "_", job.label).strip("_") + ".log")


# ------------------------------------------------------------------ several runs on this machine
_DEVICE_SLOTS = None


def _claim_device(slots) -> None:
    """Pool initializer: this worker process keeps one GPU (``CUDA_VISIBLE_DEVICES``) for its runs."""
    global _DEVICE_SLOTS
    _DEVICE_SLOTS = slots.get()
    if _DEVICE_SLOTS is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(_DEVICE_SLOTS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _run_logged(job: SweepJob, runs_root: str, device: str, log: str) -> str:
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as stream, contextlib.redirect_stdout(stream), \
            contextlib.redirect_stderr(stream):
        return run_job(job, runs_root, device, progress=False)


def run_local_parallel(jobs: Sequence[SweepJob], runs_root: Path, *, workers: int, device: str = "auto",
                       gpus: int | None = None) -> list[str]:
    """``jobs`` in up to ``workers`` processes at once, each with its own GPU when there are GPUs
    (worker k: GPU k mod count) and its output in ``<runs_root>/sweep_logs/<label>.log``. A failed
    job does not stop the others; RuntimeError naming every failed job (and its log) at the end."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    context = multiprocessing.get_context("spawn")  # no CUDA state or threads inherited from here
    slots = context.Queue()
    for k in range(workers):
        slots.put(k % gpus if gpus else None)
    results: dict[int, str] = {}
    failures: list[str] = []
    index = {id(job): k for k, job in enumerate(jobs)}
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_claim_device,
                             initargs=(slots,)) as pool:
        for wave in waves(jobs):
            pending = {}
            for job in wave:
                log = log_path(runs_root, job)
                print(f"[sweep] start {index[id(job)] + 1} of {len(jobs)}: {job.label} (log {log})", flush=True)
                worker_device = "cuda" if gpus and device == "auto" else device
                pending[pool.submit(_run_logged, job, str(runs_root), worker_device, str(log))] = job
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    try:
                        results[index[id(job)]] = future.result()
                        print(f"[sweep] done: {job.label} ({len(results)} of {len(jobs)}, "
                              f"{time.perf_counter() - started:.0f} s)", flush=True)
                    except Exception as err:  # the others go on; reported together below
                        failures.append(f"{job.label}: {type(err).__name__}: {err} (log {log_path(runs_root, job)})")
                        print(f"[sweep] FAILED: {failures[-1]}", flush=True)
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(jobs)} sweep runs failed:\n" + "\n".join(failures))
    return [results[k] for k in sorted(results)]


# ------------------------------------------------------------------ Slurm (submitit)
def _distributed_job(job: SweepJob, runs_root: str) -> str:
    """What a Slurm job runs: with several tasks (GPUs, nodes), each task joins torch.distributed
    from submitit's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) first."""
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export()
    return run_job(job, runs_root, "auto", progress=False)


def slurm_executor(runs_root: Path, options: SlurmOptions):
    try:
        import submitit
    except ImportError as err:
        raise ImportError("--launcher slurm needs submitit: pip install 'da-seg[slurm]'") from err
    executor = submitit.AutoExecutor(folder=str(Path(runs_root) / "slurm" / "%j"), cluster=options.cluster)
    parameters: dict[str, Any] = {
        "name": "da_seg", "timeout_min": options.timeout_min, "nodes": options.nodes,
        "gpus_per_node": options.gpus_per_job, "tasks_per_node": max(options.gpus_per_job, 1),
        "cpus_per_task": options.cpus_per_task,
    }
    if options.mem_gb:
        parameters["mem_gb"] = options.mem_gb
    if options.partition:
        parameters["slurm_partition"] = options.partition
    if options.parallel:
        parameters["slurm_array_parallelism"] = options.parallel
    executor.update_parameters(**parameters, **options.extra)
    return executor


def run_slurm(jobs: Sequence[SweepJob], runs_root: Path, options: SlurmOptions) -> list[str]:
    """Submit each wave of ``jobs`` (one Slurm array), wait for it, then the next; returns the
    result folders in job order. A failed job raises with its id and submitit's log folder."""
    executor = slurm_executor(runs_root, options)
    results: list[str] = []
    for wave in waves(jobs):
        with executor.batch():
            submitted = [executor.submit(_distributed_job, job, str(runs_root)) for job in wave]
        for job, handle in zip(wave, submitted):
            print(f"[sweep] submitted {job.label}: job {handle.job_id}", flush=True)
        for job, handle in zip(wave, submitted):
            try:
                results.append(handle.result())
            except Exception as err:
                raise RuntimeError(f"{job.label}: Slurm job {handle.job_id} failed ({err}); its output is in "
                                   f"{Path(runs_root) / 'slurm' / str(handle.job_id)}") from err
            print(f"[sweep] done: {job.label} ({len(results)} of {len(jobs)})", flush=True)
    return results
