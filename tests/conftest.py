"""Shared fixtures: tiny on-disk domains in the normal descriptor format, and recipe helpers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"

# Three classes whose colours differ between the two tiny domains (a class-dependent shift).
TINY_COLORS = {"src": [(200, 60, 60), (60, 200, 60), (60, 60, 200)],
               "tgt": [(170, 90, 80), (90, 170, 70), (80, 80, 160)]}


def write_tiny_domain(root: Path, name: str, palette, n_train: int = 12, n_val: int = 4,
                      size=(32, 48), seed: int = 0) -> Path:
    """Blocky 3-class scenes: labels of 8x8 blocks, image = class colour + noise. Returns the descriptor."""
    rng = np.random.default_rng(seed)
    data_dir = root / name
    for split, n in (("train", n_train), ("val", n_val)):
        (data_dir / split / "images").mkdir(parents=True, exist_ok=True)
        (data_dir / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            blocks = rng.integers(0, 3, size=(size[0] // 8, size[1] // 8))
            label = blocks.repeat(8, 0).repeat(8, 1).astype(np.uint8)
            image = np.asarray(palette, dtype=np.float32)[label] + rng.normal(0, 12, size=(*size, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(data_dir / split / "images" / f"{i:03d}.png")
            Image.fromarray(label).save(data_dir / split / "labels" / f"{i:03d}.png")
    descriptor = root / f"{name}.toml"
    descriptor.write_text(f'''name = "{name}"
root = "{data_dir}"

[classes]
names = ["red", "green", "blue"]
colors = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]

[label]
encoding = "index"
unknown = "error"

[splits.train]
images = "train/images"
image_suffix = ".png"
labels = "train/labels"
label_suffix = ".png"

[splits.val]
images = "val/images"
image_suffix = ".png"
labels = "val/labels"
label_suffix = ".png"
''')
    return descriptor


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests' networks are tiny: a second intra-op thread only adds contention on 2 shared cores.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unlabelled_target(tiny_domains, tmp_path) -> Path:
    """A copy of the tiny target whose *train* label files are deleted (val labels kept for
    evaluation): adaptation and pseudo-labelling must run without ever reading them."""
    import shutil

    original = tiny_domains["target"].parent / "tiny_tgt"
    root = tmp_path / "tgt_copy"
    shutil.copytree(original, root)
    shutil.rmtree(root / "train" / "labels")
    descriptor = tmp_path / "tiny_tgt.toml"
    descriptor.write_text(tiny_domains["target"].read_text().replace(str(original), str(root)))
    return descriptor


@pytest.fixture(scope="session")
def tiny_domains(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_domains")
    return {"source": write_tiny_domain(root, "tiny_src", TINY_COLORS["src"], seed=1),
            "target": write_tiny_domain(root, "tiny_tgt", TINY_COLORS["tgt"], seed=2)}


def tiny_recipe_text(domains: dict[str, Path], components: str = "[components.source_ce]\n", iters: int = 6,
                     extra: str = "", stage: str = "") -> str:
    """A recipe that trains the smallest model for a few steps on the tiny domains.

    ``extra``: lines ``key = value`` for [train], replacing the defaults below; ``stage``: the
    recipe's stage (default train); ``components`` may also hold the stage's table.
    """
    train = {"log_every": "2", "eval_every": "3", "checkpoint_every": "3"}
    for line in extra.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            train[key.strip()] = value.strip()
    train_lines = "\n".join(f"{k} = {v}" for k, v in train.items())
    stage_line = f'stage = "{stage}"\n' if stage else ""
    return f'''name = "tiny"
{stage_line}[data]
source = "{domains['source']}"
target = "{domains['target']}"
batch_size = 2
num_workers = 0
[model]
name = "deeplab_small"
options = {{ width = 8, aspp_channels = 16 }}
[optim]
name = "adam"
lr = 1e-3
weight_decay = 0.0
[schedule]
iters = {iters}
[train]
{train_lines}
{components}'''


@pytest.fixture
def write_recipe(tmp_path, tiny_domains):
    def _write(components: str = "[components.source_ce]\n", iters: int = 6, extra: str = "", name="tiny.toml",
               stage: str = ""):
        path = tmp_path / name
        path.write_text(tiny_recipe_text(tiny_domains, components, iters, extra, stage))
        return path
    return _write


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_domains, tmp_path_factory) -> Path:
    """last.pt of a 2-iteration run of the tiny recipe (deeplab_small, 3 classes)."""
    from da_seg.runs import train
    from da_seg.stages import load

    tmp = tmp_path_factory.mktemp("tiny_run")
    recipe = tmp / "tiny.toml"
    recipe.write_text(tiny_recipe_text(tiny_domains, iters=2, extra="eval_every = 2\ncheckpoint_every = 2"))
    train(load(recipe), tmp / "runs", device="cpu", progress=False)
    (last,) = (tmp / "runs").rglob("last.pt")
    return last
