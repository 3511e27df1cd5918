"""Domains whose files a program of da_seg made: check them against that program's version.

A descriptor names its maker with ``generator = "<name>"``; before training, every domain of a
run with a generator is checked, so results made on stale files are never compared with new ones.
"""
from __future__ import annotations

from typing import Callable

from da_seg.data.domains import Domain, DomainError
from da_seg.data.synthetic import check_synthetic

GENERATORS: dict[str, Callable[..., object]] = {
    "synthetic": check_synthetic,   # `da-seg synth`: the stamp's generator version
}


def check_generated(domain: Domain) -> None:
    if not domain.generator:
        return
    if domain.generator not in GENERATORS:
        raise DomainError(f"{domain.descriptor}: generator = {domain.generator!r}; valid: {', '.join(GENERATORS)}")
    GENERATORS[domain.generator](domain.root)
