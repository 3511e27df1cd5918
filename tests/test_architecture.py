"""The shape of the package: imports point downward, generic layers name no method or domain,
every shipped recipe passes `da-seg check`, and a sweep runs every kind of stage."""
from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from da_seg.cli import main
from da_seg.config import load_recipe, recipe_from_dict, to_toml
from da_seg.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "da_seg"
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


def _module_graph() -> dict[str, set[str]]:
    """module -> the da_seg modules it imports (at any depth of the file, lazy imports included)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _is_package_of(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_import_cycles_inside_the_package():
    graph = _module_graph()
    # A package's __init__ importing its own submodules is not a cycle between layers.
    edges = {m: {t for t in ts if not _is_package_of(m, t) and not _is_package_of(t, m)} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_utils_is_a_leaf_and_layers_point_downward():
    graph = _module_graph()
    for module, targets in graph.items():
        if module.startswith("da_seg.utils"):
            assert all(t.startswith("da_seg.utils") for t in targets), (module, targets)
        if module.startswith(("da_seg.methods", "da_seg.models", "da_seg.data")):
            upward = {t for t in targets if t.startswith(("da_seg.engine", "da_seg.stages", "da_seg.runs", "da_seg.cli"))}
            assert not upward, (module, upward)
    assert not any(t.startswith("da_seg.stages") for t in graph["da_seg.runs"])


def test_generic_layers_name_no_method_or_domain():
    domains = [tomllib.loads(p.read_text())["name"] for p in (ROOT / "datasets").glob("*.toml")]
    words = set(METHODS) | set(domains) | {"synth_", "cyclegan", "pseudo_ce", "mean_teacher"}
    files = [*(PACKAGE / "engine").glob("*.py"), PACKAGE / "runs.py", PACKAGE / "stages" / "__init__.py"]
    for path in files:
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        strings = re.findall(r"[\"']([^\"']*)[\"']", code)
        names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code)
        for word in words:
            # As a word inside strings (a short name such as "mic" is part of "atomic"); "synth_" as a prefix.
            end = "" if word.endswith("_") else "(?![A-Za-z0-9])"
            pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(word)}{end}")
            assert word not in names and not any(pattern.search(s) for s in strings), f"{path.name} names {word!r}"


def test_trainer_is_the_loop_only():
    source = (PACKAGE / "engine" / "trainer.py").read_text()
    tree = ast.parse(source)
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno + 1 <= 260
    body = ast.get_source_segment(source, trainer)
    for outsider in (".hparams(", "hparams_summary", "confusion_image", "alignment_image", "recompute_batchnorm", "torch.save"):
        assert outsider not in body, outsider


def test_each_method_file_stays_small():
    for path in (PACKAGE / "methods").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 270, path.name


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_round_trips_through_toml(path):
    recipe = load_recipe(path)
    text = to_toml(recipe.to_dict())
    assert recipe_from_dict(tomllib.loads(text), source=str(path)) == recipe


def test_da_seg_check_passes_every_shipped_recipe():
    result = CliRunner().invoke(main, ["check", *map(str, RECIPES)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(RECIPES) and all(": OK" in line for line in lines)


def test_da_seg_check_fails_a_broken_option_naming_file_and_key(tmp_path):
    shipped = ROOT / "recipes" / "gta5_to_cityscapes" / "advent_deeplabv2_r101.toml"
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(shipped), "--set", "components.advent.loss=wgan"])
    assert result.exit_code == 2
    assert f"{shipped}: error: " in result.output and "components.advent.loss = 'wgan'; valid: bce, lsgan" in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text(shipped.read_text().replace("[components.advent]", "[components.advent]\nndf = 0"))
    result = runner.invoke(main, ["check", str(broken), str(shipped)])
    assert result.exit_code == 2 and "components.advent.ndf = 0; expected a positive integer" in result.output
    assert result.output.count(": OK") == 1
    # A stage's table is checked too, and a component that belongs to another stage is refused.
    translate = ROOT / "recipes" / "synthetic" / "streets" / "translate.toml"
    result = runner.invoke(main, ["check", str(translate), "--set", "translate.tile_overlap=4096"])
    assert "translate.tile_overlap = 4096 must be smaller than tile" in result.output
    plain = tmp_path / "with_translator.toml"
    plain.write_text(shipped.read_text() + "\n[components.cyclegan]\n")
    result = runner.invoke(main, ["check", str(plain)])
    assert "components.cyclegan runs in the translate stage only" in result.output


def test_sweep_runs_a_plain_a_translate_and_a_self_training_recipe(write_recipe, unlabelled_target, tmp_path,
                                                                     monkeypatch):
    from da_seg.stages import sweep

    monkeypatch.setenv("DA_SEG_DATASETS", str(tmp_path / "descriptors"))
    monkeypatch.chdir(tmp_path)
    plain = write_recipe(iters=2, extra="eval_every = 2", name="plain.toml")
    translate = write_recipe("[components.cyclegan]\nngf = 4\nn_blocks = 1\nndf = 4\n[translate]\n"
                             f'output_dir = "{tmp_path / "translated"}"\n', iters=2, extra="eval_every = 2",
                             name="translate.toml", stage="translate")
    translate.write_text(translate.read_text().replace('name = "tiny"', 'name = "translator"'))
    warm = write_recipe(iters=2, extra="eval_every = 2", name="warm.toml")
    warm.write_text(warm.read_text().replace('name = "tiny"', 'name = "warm"'))
    cbst = write_recipe("[components.source_ce]\n[components.pseudo_ce]\n[self_train]\nrounds = 1\n"
                        'warmup_recipe = "warm.toml"\n', iters=2, extra="eval_every = 2", name="cbst.toml",
                        stage="self_train")
    cbst.write_text(cbst.read_text().replace('name = "tiny"', 'name = "cbst"'))
    runs = tmp_path / "runs"
    overrides = (f"data.target={unlabelled_target}",)
    done = sweep([plain, translate, cbst], seeds=2, runs_root=runs, overrides=overrides, progress=False)
    assert len(done) == 2 + 1 + 2                   # the translator once, the others per seed
    for folder in done:
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["finished"], folder
    assert json.loads((done[2] / "metrics.json").read_text())["recipe"] == "translator"
    assert (tmp_path / "descriptors" / "tiny_src_cyclegan.toml").is_file()
    assert [json.loads((d / "metrics.json").read_text())["seed"] for d in done[3:]] == [0, 1]
    # Again: everything is finished, nothing is trained twice.
    before = sorted(p for p in runs.rglob("last.pt"))
    again = sweep([plain, translate, cbst], seeds=2, runs_root=runs, overrides=overrides, progress=False)
    assert again == done and sorted(p for p in runs.rglob("last.pt")) == before
