"""The throughput benchmark measures what it says: the step's own network calls, replayed bare."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _args(**overrides) -> argparse.Namespace:
    args = dict(device="cpu", amp="off", channels_last=False, compile=False, data="random",
                source_size=(32, 48), target_size=(40, 64), images=4, random_init=False, warmup=1, steps=2, threads=0,
                eval_size=None, eval_crop=(16, 16), eval_iters=1)
    args.update(overrides)
    return argparse.Namespace(**args)


def test_throughput_records_each_network_call_of_a_step_and_replays_them(write_recipe):
    throughput = _load("throughput")
    recipe = write_recipe("[components.source_ce]\n[components.advent]\nndf = 4\n[components.minent]\n")
    row = throughput.measure(str(recipe), [], _args(eval_size=(40, 64)))
    # AdvEnt + MinEnt share one target forward; D runs on the target (generator term) and on both
    # domains (its own update).
    assert row["calls"] == "segmenter x2, advent.discriminator_main x3"
    assert row["batch"] == "2+2"
    assert row["step_ms"] > 0 and row["bare_ms"] > 0
    assert row["ratio"] == pytest.approx(row["step_ms"] / row["bare_ms"])
    assert 0 <= row["wait_ms"] < row["step_ms"]
    assert [mode for mode, _ in row["eval"]] == ["whole", "slide"]


def test_bare_work_replays_shapes_grad_modes_and_steps_the_optimizers():
    import torch

    throughput = _load("throughput")
    net = torch.nn.Conv2d(3, 2, 3, padding=1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    recorder = throughput.CallRecorder({"net": net}, torch.device("cpu"))
    recorder.recording = True
    net(torch.rand(2, 3, 8, 8))
    with torch.no_grad():
        net(torch.rand(1, 3, 4, 4))
    recorder.remove()
    assert [(c.inputs[0][0], c.grad) for c in recorder.calls] == [((2, 3, 8, 8), True), ((1, 3, 4, 4), False)]
    before = net.weight.detach().clone()
    seen = []
    net.register_forward_hook(lambda m, a, o: seen.append((tuple(a[0].shape), torch.is_grad_enabled())))
    throughput.BareWork(recorder.calls, {"net": net}, [optimizer], torch.device("cpu"))()
    assert seen == [((2, 3, 8, 8), True), ((1, 3, 4, 4), False)]
    assert not torch.equal(net.weight, before) and net.weight.grad is None
