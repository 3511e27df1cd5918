"""Run identity and run folders: a sweep never reuses a run of another recipe, and concurrent
runs never share a folder."""
from __future__ import annotations

import threading

from da_seg.config import load_recipe, recipe_identity
from da_seg.engine.compare import collect_runs, summarize
from da_seg.runs import find_runs, new_run_dir, run_identity
from da_seg.stages import sweep


def test_sweep_with_another_setting_trains_again_and_compare_keeps_them_apart(write_recipe, tmp_path, capsys):
    path = write_recipe(iters=2, extra="eval_every = 2")
    runs = tmp_path / "runs"
    first = sweep([path], seeds=1, runs_root=runs, progress=False)
    changed = sweep([path], seeds=1, runs_root=runs, overrides=("optim.lr=1e-2",), progress=False)
    assert first != changed and "skipped" not in capsys.readouterr().out
    default, other = load_recipe(path, ["train.seed=0"]), load_recipe(path, ["train.seed=0", "optim.lr=1e-2"])
    assert find_runs(runs, default) == first and find_runs(runs, other) == changed
    assert run_identity(first[0]) == recipe_identity(default) != recipe_identity(other)
    assert first[0].name.endswith(recipe_identity(default))
    # Asked again, each is found and skipped (a log setting does not change what is trained).
    again = sweep([path], seeds=1, runs_root=runs, overrides=("train.log_every=1",), progress=False)
    assert again == first and "skipped" in capsys.readouterr().out
    rows = summarize(collect_runs([runs]))
    assert sorted(r.recipe for r in rows) == sorted(f"tiny [{recipe_identity(r)}]" for r in (default, other))
    assert all(r.seeds == 1 for r in rows)


def test_runs_started_in_the_same_second_get_their_own_folders(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe())
    folders, barrier = [], threading.Barrier(4)

    def start():
        barrier.wait()
        folders.append(new_run_dir(tmp_path / "runs", recipe)[0])

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 4 and all(f.is_dir() for f in folders)
    assert len({f.name.split("-")[3] for f in folders}) == 1     # one identity, four folders


def test_a_run_that_fails_to_start_leaves_no_folder(write_recipe, tmp_path):
    import pytest

    recipe = load_recipe(write_recipe(), ["data.target=nowhere_domain"])
    from da_seg.runs import train

    with pytest.raises(Exception, match="nowhere_domain"):
        train(recipe, tmp_path / "runs", progress=False)
    assert not any(p.is_dir() for p in (tmp_path / "runs").rglob("0-*"))


def test_a_runs_saved_recipe_trains_the_same_experiment(write_recipe, tmp_path):
    # recipe.toml is what `da-seg train <run>/recipe.toml` reads: valid TOML, same recipe, same identity,
    # including multi-line strings (the old writer put them on one line, which tomllib refused).
    text = write_recipe(iters=2, extra="eval_every = 2").read_text()
    path = tmp_path / "described.toml"
    path.write_text(text.replace('name = "tiny"', 'name = "tiny"\nreference = """two\nlines "quoted" \\\\ back"""'))
    recipe = load_recipe(path)
    from da_seg.runs import train

    train(recipe, tmp_path / "runs", progress=False)
    (run_dir,) = find_runs(tmp_path / "runs", recipe)
    saved = load_recipe(run_dir / "recipe.toml")
    assert saved == recipe and saved.reference == 'two\nlines "quoted" \\ back'
    assert recipe_identity(saved) == run_identity(run_dir)

def test_run_folders_start_with_the_recipe_and_runs_of_the_earlier_layout_are_still_found(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe())
    runs = tmp_path / "runs"
    new, _ = new_run_dir(runs, recipe)
    assert new.relative_to(runs).parts[:2] == ("tiny", "tiny_src_to_tiny_tgt")   # what TensorBoard names the run
    # A folder of the <pair>/<recipe> layout (runs made before this one) is one of the recipe's runs:
    # a sweep skips or resumes it instead of training it again.
    old = runs / "tiny_src_to_tiny_tgt" / "tiny" / f"0-20250101-000000-{recipe_identity(recipe)}"
    old.mkdir(parents=True)
    assert find_runs(runs, recipe) == [old, new]                                  # oldest first
