"""An install outside the checkout: a wheel built from the sources knows the shipped domains and
recipes, and trains, from a directory that has neither ``datasets/`` nor ``recipes/``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import da_seg
from conftest import tiny_recipe_text

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "da_seg", "datasets", "recipes")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """site-packages-like folder holding da_seg installed from a freshly built wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    # A copy, so the build leaves no build/ or egg-info in the checkout (and nothing else of it leaks in).
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # An absolute path: pip reads a bare "src" as a package name to look up.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, cwd=tmp, timeout=300)
    (wheel,) = (tmp / "dist").glob("da_seg-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   cwd=tmp, timeout=300)
    return tmp / "site"


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # Only the installed copy on the path: torch and the other dependencies come from this
    # interpreter's environment, da_seg from the wheel.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DA_SEG_")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # 30-40 s on 2 busy cores: a wheel build and five da_seg processes, one a 2-iteration run
def test_wheel_ships_domains_and_recipes_and_trains_elsewhere(installed_wheel, tiny_domains, tmp_path):
    started = time.perf_counter()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(installed_wheel, elsewhere, "-c", "import da_seg; print(da_seg.__file__, da_seg.__version__)")
    # The installed copy, with its version from the wheel's metadata (no setup.cfg beside it).
    assert where.stdout.split() == [str(installed_wheel / "da_seg" / "__init__.py"), da_seg.__version__], where.stderr

    listed = _run(installed_wheel, elsewhere, "-m", "da_seg", "list", "domains")
    assert listed.returncode == 0, listed.stderr
    rows = dict(line.split() for line in listed.stdout.splitlines())
    shipped = {tomllib.loads(p.read_text()).get("name", p.stem) for p in (ROOT / "datasets").glob("*.toml")}
    assert set(rows) == shipped
    assert all(Path(path).parent == installed_wheel / "da_seg" / "_resources" / "datasets" for path in rows.values())

    recipes = _run(installed_wheel, elsewhere, "-m", "da_seg", "list", "recipes")
    expected = {f"recipes/{p.relative_to(ROOT / 'recipes').as_posix()}" for p in (ROOT / "recipes").rglob("*.toml")}
    assert set(recipes.stdout.split()) == expected, recipes.stderr
    # What `list recipes` prints is accepted as it is, from here (a recipe that `extends` another too).
    some = ["recipes/synthetic/aerial/oracle.toml", "recipes/synthetic/streets/cbst.toml", "recipes/synthetic/streets/source_only.toml"]
    checked = _run(installed_wheel, elsewhere, "-m", "da_seg", "check", *some)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == 3, checked.stdout + checked.stderr

    recipe = elsewhere / "tiny.toml"
    recipe.write_text(tiny_recipe_text(tiny_domains, iters=2, extra="eval_every = 2\ncheckpoint_every = 2"))
    trained = _run(installed_wheel, elsewhere, "-m", "da_seg", "train", "tiny.toml", "--runs", "runs",
                   "--device", "cpu", "--no-progress")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    (metrics,) = (elsewhere / "runs").rglob("metrics.json")
    assert json.loads(metrics.read_text())["finished"] and (metrics.parent / "last.pt").is_file()
    print(f"installed-wheel checks took {time.perf_counter() - started:.1f} s (build excluded)")
