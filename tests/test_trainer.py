"""End-to-end behaviour of the one training loop on tiny domains (CPU, seconds)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from da_seg.config import load_recipe
from da_seg.engine.checkpoint import load_checkpoint
from da_seg.engine.checkpoint import IncompatibleResumeError
from da_seg.engine.logging import NonFiniteLossError
from da_seg.engine.trainer import Trainer
from da_seg.methods import METHODS
from da_seg.methods.base import Component
from da_seg.runs import find_runs, run_status, train


@dataclass(frozen=True)
class _NoOptions:
    nan_after: int = -1


class TargetProbe(Component):
    """Test component: reads the cached target forward twice (as two methods would)."""

    name = "target_probe"
    Options = _NoOptions
    uses_target = True

    def losses(self, ctx):
        first = ctx.target_out.logits
        second = ctx.target_out.logits
        assert first is second  # one cached forward, however many readers
        loss = 0.0 * first.float().mean()
        if 0 <= self.options.nan_after < ctx.iteration:
            loss = loss + float("nan")
        return {"probe": loss}


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(METHODS, TargetProbe.name, TargetProbe)


def test_source_only_run_writes_metrics_checkpoints_and_logs(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe())
    metrics = train(recipe, tmp_path / "runs", progress=False)
    (run_dir,) = find_runs(tmp_path / "runs", recipe)
    # recipe first (TensorBoard's run names start with it), then the pair
    assert run_dir.relative_to(tmp_path / "runs").parts[:2] == ("tiny", "tiny_src_to_tiny_tgt")
    assert {"recipe.toml", "metrics.json", "last.pt", "best.pt"} <= {p.name for p in run_dir.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["finished"] and saved["iteration"] == 6 and run_status(run_dir) == "finished"
    assert [e["iteration"] for e in saved["evaluations"]] == [3, 6]
    target = saved["last"]["domains"]["tiny_tgt"]
    assert 0 <= target["miou"] <= 100 and len(target["iou"]) == 3
    assert "tiny_src" in saved["last"]["domains"]  # source val reported at the end
    assert metrics["best"]["iteration"] in (3, 6)
    state = load_checkpoint(run_dir / "last.pt")
    assert state["iteration"] == 6 and state["model_meta"]["input_norm"]["mean"][0] == pytest.approx(0.485)


def test_tensorboard_has_losses_lr_miou_images_and_hparams(write_recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(write_recipe())
    train(recipe, tmp_path / "runs", progress=False)
    (run_dir,) = find_runs(tmp_path / "runs", recipe)
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/source_ce/ce", "lr/head", "eval/mIoU", "eval/tiny_tgt/mIoU",
            "eval/tiny_tgt/IoU/red", "hparam/last_mIoU"} <= scalars
    assert {"confusion/tiny_tgt", "panels/tiny_tgt", "alignment/output_pca"} <= set(acc.Tags()["images"])
    assert 0 <= acc.Scalars("alignment/output_separability")[-1].value <= 100
    assert [e.step for e in acc.Scalars("eval/mIoU")] == [3, 6]


def test_target_train_labels_are_never_opened(write_recipe, unlabelled_target, tmp_path, probe):
    recipe = load_recipe(write_recipe("[components.source_ce]\n[components.target_probe]\n"),
                         [f"data.target={unlabelled_target}", "eval.adabn=true", "eval.adabn_batches=2"])
    metrics = train(recipe, tmp_path / "runs", progress=False)
    assert metrics["finished"]


def test_nan_loss_stops_with_term_name_and_keeps_last_good_checkpoint(write_recipe, tmp_path, probe):
    recipe = load_recipe(write_recipe("[components.source_ce]\n[components.target_probe]\nnan_after = 4\n",
                                      iters=9))
    with pytest.raises(NonFiniteLossError, match=r"target_probe/probe=nan.*iteration 3"):
        train(recipe, tmp_path / "runs", progress=False)
    (run_dir,) = find_runs(tmp_path / "runs", recipe)
    state = load_checkpoint(run_dir / "last.pt")
    assert state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert json.loads((run_dir / "metrics.json").read_text())["status"].startswith("failed")


def test_resume_continues_to_the_end_and_rejects_a_different_recipe(write_recipe, tmp_path):
    path = write_recipe(iters=6)
    recipe = load_recipe(path)
    runs = tmp_path / "runs"
    # Train 3 iterations, as if killed right after the checkpoint at iteration 3.
    train(load_recipe(path, ["schedule.iters=3"]), runs, progress=False)
    assert find_runs(runs, recipe) == []            # another identity: never found for the 6-iteration recipe
    (run_dir,) = find_runs(runs, load_recipe(path, ["schedule.iters=3"]))
    with pytest.raises(IncompatibleResumeError, match="schedule.iters: checkpoint 3, now 6.*--allow-change schedule.iters"):
        Trainer(recipe, run_dir, resume=True, progress=False)
    # Same recipe as the checkpoint (only a log setting changed): continues from iteration 3.
    trainer = Trainer(load_recipe(path, ["schedule.iters=3", "train.log_every=1"]), run_dir, resume=True,
                      progress=False)
    assert trainer.iteration == 3 and len(trainer.evaluations) == 1


def test_resumed_run_matches_uninterrupted_run(write_recipe, tmp_path):
    path = write_recipe(iters=6, extra="checkpoint_every = 2")
    full = train(load_recipe(path), tmp_path / "a", progress=False)
    recipe = load_recipe(path)
    trainer = Trainer(recipe, tmp_path / "b" / "run", progress=False)
    while trainer.iteration < 2:
        trainer.step()
    trainer.flush_logs()
    trainer.save()
    del trainer
    resumed = Trainer(recipe, tmp_path / "b" / "run", resume=True, progress=False).fit()
    assert resumed["iteration"] == 6
    assert resumed["last"]["domains"]["tiny_tgt"]["miou"] == pytest.approx(
        full["last"]["domains"]["tiny_tgt"]["miou"], abs=1e-4)


def test_oracle_trains_on_target_labels_only(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe("[components.target_ce]\n"))
    trainer = Trainer(recipe, None, progress=False)
    assert not trainer.uses_source and trainer.uses_target and trainer.target_labels
    trainer.step()
    assert trainer.source_stream is None and trainer.target_stream.with_labels


def test_unknown_method_and_model_list_valid_names(write_recipe):
    with pytest.raises(KeyError, match="unknown method 'advant'.*source_ce"):
        Trainer(load_recipe(write_recipe("[components.advant]\n")), None, progress=False)
    with pytest.raises(KeyError, match="unknown model 'deeplab_tiny'.*deeplab_small"):
        Trainer(load_recipe(write_recipe(), ["model.name=deeplab_tiny"]), None, progress=False)
    with pytest.raises(Exception, match=r"components.source_ce.wieght.*did you mean 'components.source_ce.weight'"):
        Trainer(load_recipe(write_recipe("[components.source_ce]\nwieght = 2\n")), None, progress=False)


def test_loader_workers_stop_when_the_run_ends(write_recipe):
    import multiprocessing

    recipe = load_recipe(write_recipe("[components.source_ce]\n[components.minent]\n", iters=2),
                         ("data.num_workers=1",))
    before = set(multiprocessing.active_children())
    trainer = Trainer(recipe, None, progress=False)
    trainer.step()
    assert len(set(multiprocessing.active_children()) - before) == 2     # source and target workers
    trainer.fit()
    # A sweep trains run after run in one process: no run may leave its loader workers behind.
    assert set(multiprocessing.active_children()) - before == set()


def test_resume_with_named_changes_continues_and_records_them(write_recipe, tmp_path):
    # What the divergence message advises: continue a run with a lower lr, naming the key.
    path = write_recipe(iters=6)
    runs = tmp_path / "runs"
    train(load_recipe(path, ["schedule.iters=3"]), runs, progress=False)
    (run_dir,) = find_runs(runs, load_recipe(path, ["schedule.iters=3"]))
    changed = load_recipe(path, ["optim.lr=1e-4"])
    with pytest.raises(IncompatibleResumeError, match="optim.lr"):
        train(changed, runs, resume=run_dir, progress=False, allow_changes=["schedule.iters"])
    metrics = train(changed, runs, resume=run_dir, progress=False, allow_changes=["schedule.iters", "optim.lr"])
    assert metrics["finished"] and metrics["iteration"] == 6
    (record,) = metrics["resume_changes"]
    assert record["iteration"] == 3 and record["changes"] == {"optim.lr": [1e-3, 1e-4], "schedule.iters": [3, 6]}
    with pytest.raises(IncompatibleResumeError, match="does not change"):
        Trainer(changed, run_dir, resume=True, progress=False, allow_changes=["optim.momentum"])


def test_nonfinite_buffer_stops_before_evaluation_and_checkpoint(write_recipe, tmp_path, monkeypatch):
    # A loss can stay finite while a BatchNorm variance overflows: the checkpoint must not take it.
    recipe = load_recipe(write_recipe(iters=6))
    runs = tmp_path / "runs"
    import da_seg.engine.trainer as trainer_module

    original = trainer_module.Trainer.step

    def step(self):
        original(self)
        if self.iteration == 5:
            bn = next(m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    with pytest.raises(NonFiniteLossError, match=r"non-finite parameters or buffers after iteration 6: model\..*running_var"):
        train(recipe, runs, progress=False)
    (run_dir,) = find_runs(runs, recipe)
    state = load_checkpoint(run_dir / "last.pt")
    assert state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_removes_temporary_checkpoint_files_a_kill_left_behind(write_recipe, tmp_path, caplog):
    import logging

    recipe = load_recipe(write_recipe(iters=4, extra="checkpoint_every = 2"))
    run_dir = tmp_path / "run"
    trainer = Trainer(recipe, run_dir, progress=False)
    while trainer.iteration < 2:
        trainer.step()
    trainer.flush_logs()
    trainer.save()
    del trainer
    # What a SIGKILL during torch.save leaves: atomic_write's temporaries (random names, never renamed).
    stale = [run_dir / ".last.pt.k1ll3d_a.tmp", run_dir / ".best.pt.k1ll3d_b.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 part of a checkpoint")
    other = run_dir / "notes.tmp"  # not a checkpoint write: not ours to delete
    other.write_text("kept")
    with caplog.at_level(logging.INFO, logger="da_seg"):
        metrics = train(recipe, tmp_path, resume=run_dir, progress=False)
    assert metrics["finished"] and metrics["iteration"] == 4
    assert not any(path.exists() for path in stale) and other.exists()
    assert not list(run_dir.glob(".*.tmp"))  # and the resumed run's own writes completed
    assert f"removed {stale[0]}" in caplog.text
