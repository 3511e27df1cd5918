"""Helpers shared by the benchmark scripts (run them from the repository root or anywhere)."""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
from typing import Any, Callable

import torch


def parse_size(text: str) -> tuple[int, int]:
    """'512x1024' -> (512, 1024), as (H, W); an argparse type."""
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x1024 (HxW), got {text!r}") from None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new (spawned) process: its allocator, workers and peak-memory counters
    belong to that call alone. ``fn`` must be importable by name (a module-level function)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()
