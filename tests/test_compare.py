import csv
import io
import json
import math

import numpy as np
import pytest

from da_seg.engine.compare import collect_runs, compare_table, summarize

CLASSES = ["road", "car", "sky"]


def _entry(miou, iou=None):
    return {"miou": miou, "iou": iou if iou is not None else [miou] * 3, "subsets": {}}


def _write_run(root, source, target, recipe, seed, last, best, *, finished=True, extra=None,
               iou=None, stamp="20240101-000000"):
    folder = root / f"{source}_to_{target}" / recipe / f"{seed}-{stamp}"
    folder.mkdir(parents=True)
    last_domains = {target: _entry(last, iou), **(extra or {})}
    data = {
        "recipe": recipe, "source": source, "target": target, "seed": seed, "iterations": 100,
        "finished": finished, "primary_domain": target, "class_names": CLASSES,
        "evaluations": [{"iteration": 50, "domains": {target: _entry(best)}},
                        {"iteration": 100, "domains": last_domains}],
        "last": {"iteration": 100, "domains": last_domains},
        "best": {"iteration": 50, "domains": {target: _entry(best)}},
    }
    (folder / "metrics.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
def runs_dir(tmp_path):
    lasts, bests = [50.0, 51.0, 55.0], [52.0, 53.0, 57.5]
    for seed, (last, best) in enumerate(zip(lasts, bests)):
        _write_run(tmp_path, "gta", "city", "advent", seed, last, best,
                   extra={"gta": _entry(70.0 + seed)},
                   iou=[last + 1, None if seed else 10.0, last - 1])
    _write_run(tmp_path, "gta", "city", "source_only", 0, 40.0, 41.0)
    _write_run(tmp_path, "gta", "city", "source_only", 1, 30.0, 31.0, finished=False)
    _write_run(tmp_path, "synthia", "city", "source_only", 0, 60.0, 61.0)
    _write_run(tmp_path, "gta", "dg", "sansaw", 0, 45.0, 46.0, extra={"mean": _entry(44.0)})
    return tmp_path


def test_collect_runs_skips_unfinished_unless_asked(runs_dir):
    runs = collect_runs([runs_dir])
    assert len(runs) == 6
    assert {(r.recipe, r.seed) for r in runs if r.source == "gta" and r.target == "city"} == \
        {("advent", 0), ("advent", 1), ("advent", 2), ("source_only", 0)}
    assert len(collect_runs([runs_dir], include_unfinished=True)) == 7
    single = collect_runs([runs_dir / "synthia_to_city"])
    assert single[0].source == "synthia" and single[0].last_iteration == 100
    assert single[0].best_iteration == 50 and single[0].class_names == tuple(CLASSES)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        collect_runs([runs_dir / "nowhere"])


def test_translator_runs_that_score_no_domain_are_left_out(runs_dir):
    folder = runs_dir / "gta_to_city" / "translate" / "0-20240101-000000"
    folder.mkdir(parents=True)
    empty = {"iteration": 100, "domains": {}}
    (folder / "metrics.json").write_text(json.dumps(
        {"recipe": "translate", "source": "gta", "target": "city", "seed": 0, "finished": True,
         "primary_domain": "", "evaluations": [empty], "last": empty, "best": None}))
    assert "translate" not in {run.recipe for run in collect_runs([runs_dir], include_unfinished=True)}


def test_summary_means_and_sample_stds_over_seeds(runs_dir):
    rows = summarize(collect_runs([runs_dir]))
    assert [(r.pair, r.recipe) for r in rows] == [
        ("gta->city", "advent"), ("gta->city", "source_only"), ("gta->dg", "sansaw"),
        ("synthia->city", "source_only")]
    advent = rows[0]
    assert advent.seeds == 3
    assert advent.last.mean == pytest.approx(52.0)
    assert advent.last.std == pytest.approx(np.std([50.0, 51.0, 55.0], ddof=1))
    assert advent.best.mean == pytest.approx(np.mean([52.0, 53.0, 57.5]))
    assert advent.best.std == pytest.approx(np.std([52.0, 53.0, 57.5], ddof=1))
    assert advent.source_val.mean == pytest.approx(71.0) and advent.source_val.std == pytest.approx(1.0)
    assert advent.per_class == pytest.approx({"road": 53.0, "car": 10.0, "sky": 51.0})
    assert rows[1].seeds == 1 and math.isnan(rows[1].last.std)
    assert rows[2].dg_mean.mean == 44.0 and math.isnan(rows[0].dg_mean.mean)


def test_table_formats(runs_dir):
    runs = collect_runs([runs_dir])
    table = compare_table(runs)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["pair", "recipe", "seeds"]
    assert "source mIoU" in lines[0] and "DG mean" in lines[0]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned
    advent_line = next(line for line in lines if "advent" in line)
    assert f"52.0 ± {np.std([50.0, 51.0, 55.0], ddof=1):.1f}" in advent_line
    assert "71.0 ± 1.0" in advent_line
    assert "40.0 (1 seed)" in next(line for line in lines if "gta->city" in line and "source_only" in line)
    assert lines.index(advent_line) < next(i for i, line in enumerate(lines) if "source_only" in line)

    markdown = compare_table(runs, fmt="markdown", per_class=True)
    assert markdown.splitlines()[1].startswith("|:---|:---|---:|")
    assert "| road | car | sky |" in markdown.splitlines()[0]
    assert "| 53.0 | 10.0 | 51.0 |" in markdown

    rows = list(csv.DictReader(io.StringIO(compare_table(runs, fmt="csv", per_class=True))))
    assert float(rows[0]["last_miou"]) == pytest.approx(52.0)
    assert float(rows[0]["iou_car"]) == pytest.approx(10.0)
    assert rows[1]["last_miou_std"] == ""
    with pytest.raises(ValueError, match="valid"):
        compare_table(runs, fmt="latex")


def test_domain_option_scores_another_domain(runs_dir):
    rows = summarize(collect_runs([runs_dir / "gta_to_city" / "advent"]), domain="gta")
    assert rows[0].last.mean == pytest.approx(71.0)
    assert math.isnan(rows[0].best.mean)  # best holds only the primary domain


def test_unfinished_run_without_last_uses_its_evaluations(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    evaluations = [{"iteration": i, "domains": {"b": _entry(m)}} for i, m in [(1, 30.0), (2, 35.0), (3, 33.0)]]
    (folder / "metrics.json").write_text(json.dumps(
        {"recipe": "r", "source": "a", "target": "b", "seed": 0, "finished": False,
         "evaluations": evaluations}))
    (run,) = collect_runs([tmp_path], include_unfinished=True)
    assert run.miou("last", "b") == 33.0 and run.miou("best", "b") == 35.0
    (folder / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json"):
        collect_runs([tmp_path])


def test_runs_of_one_name_with_different_recipes_are_separate_rows(tmp_path):
    # A 10- and a 150-iteration run of one recipe name are two experiments, not two seeds.
    short = _write_run(tmp_path, "gta", "city", "advent", 0, 20.0, 20.0)
    long = _write_run(tmp_path, "gta", "city", "advent", 0, 38.0, 38.0, stamp="20240101-000500")
    for folder, identity in ((short, "1111aaaa"), (long, "2222bbbb")):
        data = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**data, "identity": identity}))
    rows = summarize(collect_runs([tmp_path]))
    assert sorted((r.recipe, r.seeds, r.last.mean) for r in rows) == [("advent [1111aaaa]", 1, 20.0),
                                                                      ("advent [2222bbbb]", 1, 38.0)]
    text = compare_table(collect_runs([tmp_path]))
    assert "29.0" not in text and "20.0 (1 seed)" in text


def test_identity_of_runs_without_it_in_metrics_comes_from_their_saved_recipe(tmp_path, write_recipe):
    from da_seg.config import load_recipe, recipe_identity, to_toml

    recipe = load_recipe(write_recipe())
    folder = _write_run(tmp_path, "gta", "city", "advent", 0, 30.0, 30.0)
    (folder / "recipe.toml").write_text(to_toml(recipe.to_dict()))
    (run,) = collect_runs([tmp_path])
    assert run.identity == recipe_identity(recipe)
