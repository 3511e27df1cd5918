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


# Each bad value fails when the recipe loads, naming the file and the key, not after training started
# (a negative poly_power used to divide by zero at the last iteration; eval_every = 0 at the first).
BAD_VALUES = [
    ("schedule.iters=0", "expected a positive number of iterations"),
    ("schedule.iters=-5", "expected a positive number of iterations"),
    ("train.log_every=0", "expected a positive number of iterations"),
    ("train.eval_every=0", "expected a positive number of iterations"),
    ("train.checkpoint_every=-1", "expected a positive number of iterations"),
    ("schedule.poly_power=-0.9", "expected a power (0 keeps the LR constant) >= 0"),
    ("schedule.poly_power=nan", ">= 0"),
    ("schedule.poly_iters=-1", "expected 0 or more iterations"),
    ("schedule.warmup_iters=-10", "expected 0 or more iterations"),
    ("schedule.warmup_ratio=0.0", "in (0, 1]"),
    ("schedule.warmup_ratio=1.5", "in (0, 1]"),
    ("data.source_size=[0, 64]", "expected [height, width] with both in 1..16384 pixels"),
    ("data.target_size=[64, -1]", "expected [height, width]"),
    ("data.val_size=[32, 0]", "expected [height, width]"),
    ("data.batch_size=0", "expected 1 to 1024 images"),
    ("data.batch_size=-2", "expected 1 to 1024 images"),
    ("data.batch_size=2000000", "expected 1 to 1024 images"),
    ("data.num_workers=-1", "expected 0 or more loader workers"),
    ('data.sampler="rare"', "valid: 'random', 'rare_class'"),
    ("data.rare_class_temperature=0.0", "expected a temperature > 0"),
    ('optim.name="sgdm"', "valid: 'sgd', 'adamw', 'adam'"),
    ("optim.lr=-1e-3", "expected a learning rate >= 0"),
    ("optim.weight_decay=-1e-4", "expected a weight decay >= 0"),
    ("optim.grad_clip=-1.0", "expected a gradient norm"),
    ("optim.head_lr_mult=-10.0", "expected an LR multiplier >= 0"),
    ("optim.momentum=1.0", "expected a momentum in [0, 1)"),
    ("optim.momentum=-0.1", "expected a momentum in [0, 1)"),
    ("optim.betas=[0.9, 1.0]", "both in [0, 1)"),
    ('train.amp="yes"', "valid: 'auto', 'bf16', 'fp16', 'off'"),
    ("train.seed=-1", "expected a seed"),
    ("eval.batch_size=0", "expected 1 to 1024 images"),
    ("eval.input_size=[0, 512]", "expected [height, width]"),
    ("eval.input_size=[512, 100000]", "expected [height, width] with both in 1..16384"),
    ("eval.adabn_batches=0", "expected a positive number of batches"),
    ("eval.max_panels=-1", "expected 0 or more panels"),
    ("eval.alignment_images=-4", "expected 0 or more images"),
    ("augment.source.color_p=1.5", "expected a probability in [0, 1]"),
    ("augment.target.blur_p=-0.1", "expected a probability in [0, 1]"),
    ("augment.source.grayscale_p=2", "expected a probability in [0, 1]"),
    ("augment.source.brightness=-0.4", "expected a jitter strength >= 0"),
    ("augment.target.contrast=-0.1", "expected a jitter strength >= 0"),
    ("augment.source.saturation=-1", "expected a jitter strength >= 0"),
    ("augment.source.hue=0.7", "expected a hue jitter strength in [0, 0.5]"),
    ("augment.source.scale=[0.0, 2.0]", "with 0 < min <= max"),
    ("augment.target.scale=[1.5, 0.5]", "with 0 < min <= max"),
    ("augment.source.crop=[0, 16]", "expected [height, width]"),
    ("augment.target.blur_sigma=[-1.0, 1.0]", "with 0 < min <= max"),
]


@pytest.mark.parametrize("override, expected", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_fail_when_the_recipe_loads_naming_file_and_key(tmp_path, override, expected):
    path = write(tmp_path, "r.toml", '[data]\nsource = "a"\n[components.source_ce]\n')
    overrides = [override] + (["eval.adabn=true"] if "adabn_batches" in override else [])
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as err:
        load_recipe(path, overrides)
    message = str(err.value)
    assert message.startswith(f"{path}: {key} = "), message
    assert expected in message
    assert "\n" not in message


def test_edge_values_that_recipes_use_still_load(tmp_path):
    path = write(tmp_path, "r.toml", '[data]\nsource = "a"\n[components.source_ce]\n')
    # AdaptSegNet decays over 250k iterations and stops at 150k; a translator trains no segmenter
    # (lr 0); a self-training round keeps its LR constant (power 0); adabn_batches only counts with adabn.
    recipe = load_recipe(path, ["schedule.iters=150000", "schedule.poly_iters=250000", "optim.lr=0.0",
                                "schedule.poly_power=0.0", "schedule.warmup_ratio=1.0", "data.num_workers=0",
                                "optim.momentum=0.0", "eval.adabn_batches=0", "eval.alignment_images=0",
                                "augment.source.scale=[1.0, 1.0]", "augment.source.hue=0.5",
                                "augment.source.color_p=1.0", "data.batch_size=1024"])
    assert recipe.schedule.poly_iters == 250000 and recipe.data.batch_size == 1024
