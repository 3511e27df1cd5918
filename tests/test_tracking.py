"""What a run writes for TensorBoard's HParams tab, and the MLflow / Weights & Biases writers behind
the one RunLogger (MLflow against a local file store, W&B offline)."""
from __future__ import annotations

import json

import pytest
import torch

from da_seg.config import ConfigError, load_recipe
from da_seg.engine.logging import HPARAMS, RunLogger, run_hparams
from da_seg.runs import find_runs, train


def _hparams_records(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return acc, experiment, start


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    return store


def test_two_recipes_show_their_recipe_seed_components_and_scores_in_hparams(write_recipe, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    runs = tmp_path / "runs"
    plain = load_recipe(write_recipe(iters=4, name="plain.toml", extra="eval_every = 2"), ["name=plain"])
    entropy = load_recipe(write_recipe("[components.source_ce]\n[components.minent]\nweight = 0.25\n", iters=4,
                                       name="entropy.toml", extra='eval_every = 2\ntrackers = ["tensorboard", "mlflow"]'),
                          ["name=entropy", "train.seed=3"])
    train(plain, runs, progress=False)
    metrics = train(entropy, runs, progress=False)
    records = {}
    for recipe in (plain, entropy):
        (run_dir,) = find_runs(runs, recipe)
        assert run_dir.relative_to(runs).parts[0] == recipe.name          # TensorBoard's run name starts with it
        acc, experiment, start = _hparams_records(run_dir)
        records[recipe.name] = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
        infos = {info.name: info for info in experiment.hparam_infos}
        assert [info.name for info in experiment.hparam_infos] == [name for name, _, _ in HPARAMS]
        assert {name for name, info in infos.items() if info.differs} == {"recipe", "seed", "components", "augment",
                                                                          "schedule"}  # the five shown at first
        assert [m.name.tag for m in experiment.metric_infos] == ["hparam/last_mIoU", "hparam/best_mIoU",
                                                                 "hparam/source_mIoU"]
        scalars = set(acc.Tags()["scalars"])
        assert {"hparam/last_mIoU", "hparam/best_mIoU", "hparam/source_mIoU", "eval/tiny_tgt/mIoU"} <= scalars
        # the source is scored once, at the end: an HParams metric, not a one-point curve
        assert not any(tag.startswith("eval/tiny_src/") for tag in scalars)
        assert [e.step for e in acc.Scalars("eval/tiny_tgt/mIoU")] == [2, 4]
    assert records["plain"]["recipe"] == "plain" and records["entropy"]["recipe"] == "entropy"
    assert records["plain"]["seed"] == "0" and records["entropy"]["seed"] == "3"      # integers print as integers
    assert records["plain"]["components"] == "source_ce"
    assert records["entropy"]["components"] == "source_ce + minent 0.25"
    assert records["plain"]["iters"] == "4" and records["plain"]["lr"] == pytest.approx(1e-3)

    # the same run in MLflow (a local file store): params, metric history, images, finished
    (run_dir,) = find_runs(runs, entropy)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "entropy seed 3"
    assert run.data.params["recipe"] == "entropy" and run.data.params["seed"] == "3"
    assert [m.step for m in client.get_metric_history(run_id, "eval/mIoU")] == [2, 4]
    assert run.data.metrics["hparam/last_mIoU"] == pytest.approx(metrics["last"]["domains"]["tiny_tgt"]["miou"])
    assert client.get_experiment(run.info.experiment_id).name == "tiny_src_to_tiny_tgt"
    images = [a.path for a in client.list_artifacts(run_id, "images/confusion/tiny_tgt")]
    assert images == ["images/confusion/tiny_tgt/0000002.png", "images/confusion/tiny_tgt/0000004.png"]


def test_an_mlflow_run_continues_when_its_folder_is_logged_to_again(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    first = RunLogger(tmp_path, trackers=("mlflow",), run_name="r seed 0", experiment="a_to_b")
    first.scalars({"loss/total": 1.5, "skipped": float("nan")}, step=1)
    first.close("failed: non-finite loss")
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    again = RunLogger(tmp_path, trackers=("mlflow",), run_name="r seed 0", experiment="a_to_b")  # a resume
    again.scalars({"loss/total": 0.5}, step=2)
    again.hparams({"recipe": "r"}, {"hparam/last_mIoU": 40.0})
    again.hparams({"recipe": "r"}, {"hparam/last_mIoU": 41.0})  # params are write-once in MLflow: not an error
    again.close()
    client = MlflowClient()
    assert [m.value for m in client.get_metric_history(run_id, "loss/total")] == [1.5, 0.5]
    assert "skipped" not in client.get_run(run_id).data.metrics and client.get_run(run_id).info.status == "FINISHED"


def test_wandb_writer_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path, trackers=("wandb",), run_name="r seed 0", group="r", experiment="a_to_b")
    logger.scalars({"eval/mIoU": 33.0}, step=2)
    logger.image("panels/b", torch.zeros(3, 4, 5, dtype=torch.uint8), step=2)
    logger.hparams({"recipe": "r", "seed": "0"}, {"hparam/last_mIoU": 33.0}, step=2)
    logger.close()
    wandb.teardown()  # the W&B service writes the records file after finish(): wait for it
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    records = (offline / f"run-{run_id}.wandb").read_bytes()
    assert b"eval/mIoU" in records and b"hparam/last_mIoU" in records
    assert list((offline / "files" / "media" / "images").glob("panels/b_2_*.png"))


def test_trackers_are_checked_by_the_recipe_and_a_missing_package_names_its_extra(write_recipe, tmp_path,
                                                                                  monkeypatch):
    with pytest.raises(ConfigError, match=r"train.trackers = 'neptune'; valid: 'tensorboard', 'mlflow', 'wandb'"):
        load_recipe(write_recipe(extra='trackers = ["neptune"]'))
    recipe = load_recipe(write_recipe(), ['train.trackers=["tensorboard", "mlflow"]'])
    assert recipe.train.trackers == ("tensorboard", "mlflow")
    assert run_hparams(recipe)["recipe"] == "tiny"
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'da-seg\[mlflow\]'"):
        RunLogger(tmp_path / "run", trackers=("tensorboard", "mlflow"))
    assert RunLogger(tmp_path / "off", enabled=False, trackers=("mlflow",)).writers == []  # non-main ranks
