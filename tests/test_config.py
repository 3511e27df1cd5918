import tomllib

import pytest

from da_seg.config import ConfigError, load_recipe, recipe_differences, recipe_from_dict, to_toml


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_extends_merges_and_set_overrides(tmp_path):
    write(tmp_path, "base.toml", '[data]\nsource = "a"\ntarget = "b"\n[optim]\nlr = 0.01\n[components.source_ce]\n')
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n[optim]\nname = "adamw"\n'
                                          '[components.target_ce]\nweight = 0.5\n')
    recipe = load_recipe(child, ["optim.lr=3e-4", "data.target=c", "augment.source.crop=[16, 24]"])
    assert recipe.name == "child"
    assert recipe.optim.name == "adamw" and recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.data.source == "a" and recipe.data.target == "c"
    assert recipe.augment.source.crop == (16, 24)
    assert list(recipe.components) == ["source_ce", "target_ce"]
    assert recipe.components["target_ce"] == {"weight": 0.5}
    assert recipe.pair == "a_to_c"


def test_component_set_to_false_is_removed(tmp_path):
    write(tmp_path, "base.toml", '[data]\nsource = "a"\n[components.source_ce]\n')
    child = write(tmp_path, "oracle.toml", 'extends = "base.toml"\n[components]\nsource_ce = false\n[components.target_ce]\n')
    assert list(load_recipe(child).components) == ["target_ce"]


def test_unknown_key_names_closest(tmp_path):
    path = write(tmp_path, "r.toml", '[data]\nsource = "a"\n[optim]\nlearning_rate = 0.1\nmomentun = 0.9\n')
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate'"):
        load_recipe(path)
    path = write(tmp_path, "r2.toml", '[data]\nsorce = "a"\n')
    with pytest.raises(ConfigError, match=r"'data.sorce'.*did you mean 'data.source'"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_recipe(write(tmp_path, "r3.toml", '[data]\nsource = "a"\n[trian]\nseed = 1\n'))


def test_wrong_types_and_shapes_fail(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr must be float"):
        recipe_from_dict({"data": {"source": "a"}, "optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="must have 2 entries"):
        recipe_from_dict({"data": {"source": "a", "source_size": [1, 2, 3]}})
    with pytest.raises(ConfigError, match="data.source is empty"):
        recipe_from_dict({})


def test_extends_chains_and_rejects_cycles_and_missing_bases(tmp_path):
    write(tmp_path, "a.toml", '[data]\nsource = "x"\nbatch_size = 3\n[optim]\nlr = 0.5\n[components.source_ce]\n')
    write(tmp_path, "b.toml", 'extends = "a.toml"\n[optim]\nlr = 0.25\n[components]\nsource_ce = false\n'
                              '[components.target_ce]\n')
    recipe = load_recipe(write(tmp_path, "c.toml", 'extends = "b.toml"\n[data]\nbatch_size = 4\n'))
    assert (recipe.name, recipe.data.source, recipe.data.batch_size, recipe.optim.lr) == ("c", "x", 4, 0.25)
    assert list(recipe.components) == ["target_ce"]
    write(tmp_path, "loop1.toml", 'extends = "loop2.toml"\n')
    write(tmp_path, "loop2.toml", 'extends = "loop1.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "loop1.toml")
    with pytest.raises(ConfigError, match="missing.toml, which does not exist"):
        load_recipe(write(tmp_path, "d.toml", 'extends = "missing.toml"\n'))


def test_resolved_recipe_round_trips_through_toml():
    recipe = recipe_from_dict({"name": "x", "data": {"source": "a", "val_domains": ["b", "c"], "source_size": [8, 16]},
                               "model": {"options": {"width": 8, "blocks": [1, 1, 2, 1]}},
                               "components": {"source_ce": {}, "target_ce": {"weight": 0.5}}})
    text = to_toml(recipe.to_dict())
    assert recipe_from_dict(tomllib.loads(text)) == recipe
    other = recipe_from_dict({**tomllib.loads(text), "optim": {"lr": 0.5}})
    assert recipe_differences(recipe.to_dict(), other.to_dict()) == ["optim.lr"]


def test_shipped_recipes_all_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").rglob("*.toml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)  # raises on any unknown key or wrong type
