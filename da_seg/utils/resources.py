"""The domain descriptors and recipes da_seg ships, found in a checkout or in an installed wheel.

In a checkout they are the top-level ``datasets/`` and ``recipes/`` folders, which the README and
users name by path (``recipes/synthetic/streets/source_only.toml``). A wheel has no such folders:
``setup.py`` copies both into the package as ``da_seg/_resources/{datasets,recipes}`` when it
builds one. The checkout wins when both exist (an editable install, or a checkout on PYTHONPATH
beside an installed wheel), so edits to the checkout's files are what runs.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

KINDS = ("datasets", "recipes")


def _checkout_root() -> Path | None:
    # The folder above the package, when it is a source tree of da_seg; in an installed wheel it
    # is site-packages, which may hold unrelated ``datasets`` or ``recipes`` packages.
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.cfg").is_file() and (root / "da_seg").is_dir() else None


def shipped_dir(kind: str) -> Path | None:
    """The shipped ``datasets`` or ``recipes`` folder: the checkout's, else the installed
    package's ``_resources/<kind>``; None when neither exists."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r}; valid: {', '.join(KINDS)}")
    root = _checkout_root()
    if root is not None and (root / kind).is_dir():
        return root / kind
    packaged = importlib.resources.files("da_seg") / "_resources" / kind
    # A filesystem install gives a Path; a zipped package (unsupported by torch anyway) would not.
    return packaged if isinstance(packaged, Path) and packaged.is_dir() else None


def shipped_recipes() -> dict[str, Path]:
    """``recipes/<relative path>`` -> file, for every shipped recipe, sorted by name."""
    root = shipped_dir("recipes")
    if root is None:
        return {}
    return {f"recipes/{p.relative_to(root).as_posix()}": p for p in sorted(root.rglob("*.toml"))}


def find_recipe(path: str | Path) -> Path:
    """``path`` itself when it exists; else, for a relative ``recipes/...`` path, the shipped
    recipe of that name (so what ``da-seg list recipes`` prints runs from any directory)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    shipped = shipped_recipes().get(path.as_posix())
    return shipped if shipped is not None else path
