"""Built-in class sets (names + display colours) that domain descriptors refer to by name.

A descriptor's ``[classes] preset = "cityscapes19"`` resolves through :data:`CLASS_PRESETS`;
the list index of a class is its train id.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassSet:
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise ValueError(f"{len(self.names)} class names but {len(self.colors)} colours")


# Colours are the cityscapesScripts `labels.py` colours of the 19 evaluated classes.
_CITYSCAPES19 = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)
_CITYSCAPES_COLOR = dict(_CITYSCAPES19)

# LoveDA's own palette (LoveDA repo / mmseg LoveDADataset), in mask order 1..7.
_LOVEDA7 = (
    ("background", (255, 255, 255)),
    ("building", (255, 0, 0)),
    ("road", (255, 255, 0)),
    ("water", (0, 0, 255)),
    ("barren", (159, 129, 183)),
    ("forest", (0, 255, 0)),
    ("agriculture", (255, 195, 128)),
)

# The ISPRS colour coding itself, so a rendered prediction looks like the benchmark's labels.
_ISPRS6 = (
    ("impervious surface", (255, 255, 255)),
    ("building", (0, 0, 255)),
    ("low vegetation", (0, 255, 255)),
    ("tree", (0, 255, 0)),
    ("car", (255, 255, 0)),
    ("clutter", (255, 0, 0)),
)

_SYNTH_STREETS8 = tuple(
    (name, _CITYSCAPES_COLOR[name])
    for name in ("road", "sidewalk", "building", "vegetation", "sky", "pole", "person", "car")
)


def _class_set(pairs: tuple[tuple[str, tuple[int, int, int]], ...]) -> ClassSet:
    return ClassSet(names=tuple(n for n, _ in pairs), colors=tuple(c for _, c in pairs))


CLASS_PRESETS: dict[str, ClassSet] = {
    "cityscapes19": _class_set(_CITYSCAPES19),
    "loveda7": _class_set(_LOVEDA7),
    "isprs6": _class_set(_ISPRS6),
    "synth_streets8": _class_set(_SYNTH_STREETS8),
}


def class_preset(name: str) -> ClassSet:
    """The built-in class set called ``name``; unknown names list the valid ones."""
    try:
        return CLASS_PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown class preset {name!r}; valid presets: {', '.join(sorted(CLASS_PRESETS))}"
        ) from None
