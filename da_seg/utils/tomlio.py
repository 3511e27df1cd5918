"""The one TOML writer: recipes, run records and domain descriptors all go through ``dumps_toml``.

``tomli_w`` is a real writer (multi-line strings, escapes, nested tables), so whatever it writes
``tomllib`` reads back as the same data (tested on every shipped recipe).
"""
from __future__ import annotations

from typing import Any

import tomli_w


def _plain(value: Any) -> Any:
    """Tuples -> lists, None dropped from tables (TOML has no null), recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dumps_toml(data: dict[str, Any]) -> str:
    """TOML text of nested dicts of str / int / float / bool / lists; keys whose value is None are omitted."""
    return tomli_w.dumps(_plain(data), multiline_strings=True)
