"""The run-comparison table: every metrics.json below some folders, grouped by
(source -> target, recipe, identity), mean ± sample std over seeds.

Only runs of one *identity* (the hash of everything the recipe trains, ``recipe_identity``) are
seeds of one row: runs of one recipe name with different settings (another ``--set``, an edited
file) are shown as separate rows, the name followed by ``[identity]``. A row of one seed shows
``37.3 (1 seed)``, never a made-up spread.

Reads only metrics.json (format in the trainer's docs): ``last`` and ``best`` hold
``{"iteration": int, "domains": {domain: {"miou": .., "iou": [..], "subsets": {..}}}}``;
a domain-generalization run also has ``domains["mean"]`` over its unseen domains, which
``val_domains`` lists: the table then shows each of them and their mean.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from da_seg.config import saved_identity

TABLE_FORMATS = ("table", "markdown", "csv")
DG_MEAN = "mean"


@dataclass(frozen=True)
class RunSummary:
    """One run as read from its metrics.json.

    last / best: {domain: entry}, entry = {"miou": float, "iou": [float | None], ...}
    (``best`` is the evaluation with the highest primary-domain mIoU).
    unseen: the evaluated domains of a run with several (domain generalization); else empty.
    """

    path: Path
    recipe: str
    source: str
    target: str
    seed: int | None
    finished: bool
    primary_domain: str
    class_names: tuple[str, ...]
    last_iteration: int | None
    best_iteration: int | None
    last: dict[str, dict] = field(default_factory=dict)
    best: dict[str, dict] = field(default_factory=dict)
    unseen: tuple[str, ...] = ()
    identity: str | None = None

    def miou(self, which: str, domain: str) -> float:
        """mIoU of ``domain`` in "last" or "best"; NaN when that domain was not evaluated."""
        return _miou(getattr(self, which).get(domain))

    def iou(self, domain: str) -> dict[str, float]:
        """Last per-class IoU of ``domain`` by class name (NaN for null or missing)."""
        entry = self.last.get(domain)
        values = entry.get("iou", []) if isinstance(entry, dict) else []
        return {name: _float(v) for name, v in zip(self.class_names, values)}


def _float(value) -> float:
    return math.nan if value is None else float(value)


def _miou(entry) -> float:
    """A domain entry is a dict with "miou"; the DG "mean" may also be a bare number."""
    if isinstance(entry, dict):
        return _float(entry.get("miou"))
    if isinstance(entry, (int, float)):
        return float(entry)
    return math.nan


def _read_run(path: Path) -> RunSummary | None:
    """Parses one metrics.json; None when it holds no scored evaluation yet."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in ("recipe", "source", "target"):
        if not isinstance(data.get(key), str):
            raise ValueError(f"{path}: key {key!r} must be a string, got {data.get(key)!r}")
    primary = data.get("primary_domain") or data["target"]
    evaluations = [e for e in data.get("evaluations") or [] if isinstance(e, dict)]
    # An unfinished run may have no "last"/"best" yet: derive them from its evaluations.
    last = data.get("last") or (evaluations[-1] if evaluations else None)
    best = data.get("best") or (max(evaluations, key=lambda e: _nan_low(
        _miou(e.get("domains", {}).get(primary)))) if evaluations else None)
    if last is None or not last.get("domains"):
        return None
    for name, entry in (("last", last), ("best", best)):
        if entry is not None and not isinstance(entry.get("domains"), dict):
            raise ValueError(f"{path}: {name!r} must have a 'domains' object, got {entry!r}")
    val_domains = data.get("val_domains") or []
    if not isinstance(val_domains, list) or not all(isinstance(d, str) for d in val_domains):
        raise ValueError(f"{path}: 'val_domains' must be a list of domain names, got {val_domains!r}")
    return RunSummary(
        path=path.parent, recipe=data["recipe"], source=data["source"], target=data["target"],
        seed=data.get("seed"), finished=bool(data.get("finished", False)), primary_domain=primary,
        class_names=tuple(data.get("class_names") or ()),
        last_iteration=last.get("iteration"), best_iteration=(best or {}).get("iteration"),
        last=dict(last["domains"]), best=dict((best or {}).get("domains", {})),
        unseen=tuple(val_domains) if len(val_domains) > 1 else (),
        identity=data.get("identity") or saved_identity(path.parent / "recipe.toml"))


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def collect_runs(paths: Iterable[Path | str], *, include_unfinished: bool = False) -> list[RunSummary]:
    """Every metrics.json at or below ``paths`` (files or folders), sorted by path.

    Runs not marked ``"finished": true`` are skipped unless ``include_unfinished``; runs with
    no evaluation yet, or whose evaluations score no domain (a ``da-seg translate`` run trains no
    segmenter), are always skipped.
    """
    files: set[Path] = set()
    for path in map(Path, paths):
        if path.is_file():
            files.add(path.resolve())
        elif path.is_dir():
            files.update(p.resolve() for p in path.rglob("metrics.json"))
        else:
            raise FileNotFoundError(f"no run folder or metrics.json at {path}")
    runs = []
    for file in sorted(files):
        run = _read_run(file)
        if run is not None and (run.finished or include_unfinished):
            runs.append(run)
    return runs


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""

    mean: float
    std: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stat":
        present = [v for v in values if not math.isnan(v)]
        mean = statistics.fmean(present) if present else math.nan
        std = statistics.stdev(present) if len(present) > 1 else math.nan
        return cls(mean, std, len(present))


@dataclass(frozen=True)
class ComparisonRow:
    """One (source -> target, recipe) group. ``domain`` is the domain the target columns score;
    ``unseen``: last mIoU of each unseen domain of domain-generalization runs, by name."""

    source: str
    target: str
    recipe: str
    domain: str
    seeds: int
    last: Stat
    best: Stat
    source_val: Stat
    dg_mean: Stat
    per_class: dict[str, float]
    unseen: dict[str, Stat] = field(default_factory=dict)

    @property
    def pair(self) -> str:
        return f"{self.source}->{self.target or 'unseen'}"


def summarize(runs: Sequence[RunSummary], *, domain: str | None = None) -> list[ComparisonRow]:
    """Groups runs by (source, target, recipe); sorted by pair, then last mIoU descending.

    domain: the domain scored in the last/best columns; default each run's primary domain.
    """
    groups: dict[tuple[str, str, str, str | None], list[RunSummary]] = {}
    for run in runs:
        groups.setdefault((run.source, run.target, run.recipe, run.identity), []).append(run)
    variants = {}
    for source, target, recipe, identity in groups:
        variants.setdefault((source, target, recipe), []).append(identity)
    rows = []
    for (source, target, name, identity), members in groups.items():
        # Variants of one recipe name are told apart by their identity (unknown: "?").
        recipe = name if len(variants[(source, target, name)]) == 1 else f"{name} [{identity or '?'}]"
        scored = domain or members[0].primary_domain
        names = list(dict.fromkeys(name for run in members for name in run.class_names))
        per_class = {name: Stat.of(run.iou(scored).get(name, math.nan) for run in members).mean
                     for name in names}
        rows.append(ComparisonRow(
            source=source, target=target, recipe=recipe, domain=scored, seeds=len(members),
            last=Stat.of(run.miou("last", scored) for run in members),
            best=Stat.of(run.miou("best", scored) for run in members),
            source_val=Stat.of(run.miou("last", source) for run in members),
            dg_mean=Stat.of(run.miou("last", DG_MEAN) for run in members),
            per_class=per_class,
            unseen={name: Stat.of(run.miou("last", name) for run in members)
                    for name in dict.fromkeys(d for run in members for d in run.unseen)}))
    rows.sort(key=lambda r: (r.source, r.target, -_nan_low(r.last.mean), r.recipe))
    return rows


def _stat_text(stat: Stat) -> str:
    if math.isnan(stat.mean):
        return "-"
    if stat.count == 1:
        return f"{stat.mean:.1f} (1 seed)"
    return f"{stat.mean:.1f} ± {stat.std:.1f}"


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def compare_table(runs: Sequence[RunSummary], *, per_class: bool = False, fmt: str = "table",
                  domain: str | None = None) -> str:
    """The comparison as text: an aligned plain table, GitHub markdown, or CSV.

    Columns: pair, recipe, seeds, last and best-on-val mIoU (mean ± std over seeds), the
    source-val mIoU and the DG mean over unseen domains when any run has them, the last mIoU
    of each unseen domain (domain-generalization runs), then the per-class last IoU (mean over
    seeds) if ``per_class``. CSV gives means and stds as separate numeric columns.
    """
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; valid: {list(TABLE_FORMATS)}")
    rows = summarize(runs, domain=domain)
    with_source = any(not math.isnan(r.source_val.mean) for r in rows)
    with_dg = any(not math.isnan(r.dg_mean.mean) for r in rows)
    class_names = list(dict.fromkeys(n for r in rows for n in r.per_class)) if per_class else []
    unseen = list(dict.fromkeys(d for r in rows for d in r.unseen))
    missing = Stat(math.nan, math.nan, 0)
    suffix = f" [{domain}]" if domain else ""

    if fmt == "csv":
        header = ["source", "target", "recipe", "domain", "seeds", "last_miou", "last_miou_std",
                  "best_miou", "best_miou_std"]
        header += ["source_miou", "source_miou_std"] * with_source + ["dg_mean", "dg_mean_std"] * with_dg
        header += [f"{prefix}{d}{suffix}" for d in unseen for prefix, suffix in (("miou_", ""), ("miou_", "_std"))]
        header += [f"iou_{name}" for name in class_names]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            stats = [r.last, r.best] + [r.source_val] * with_source + [r.dg_mean] * with_dg
            stats += [r.unseen.get(d, missing) for d in unseen]
            writer.writerow([r.source, r.target, r.recipe, r.domain, r.seeds]
                            + [_number(v) for s in stats for v in (s.mean, s.std)]
                            + [_number(r.per_class.get(n, math.nan)) for n in class_names])
        return buffer.getvalue()

    header = ["pair", "recipe", "seeds", f"last mIoU{suffix}", f"best mIoU{suffix}"]
    header += ["source mIoU"] * with_source + ["DG mean"] * with_dg + unseen + class_names
    cells = []
    for r in rows:
        stats = [r.last, r.best] + [r.source_val] * with_source + [r.dg_mean] * with_dg
        stats += [r.unseen.get(d, missing) for d in unseen]
        per_class_cells = [r.per_class.get(n, math.nan) for n in class_names]
        cells.append([r.pair, r.recipe, str(r.seeds)] + [_stat_text(s) for s in stats]
                     + ["-" if math.isnan(v) else f"{v:.1f}" for v in per_class_cells])
    left_aligned = 2  # pair and recipe are text; everything after is a number
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(":---" if i < left_aligned else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    widths = [max(len(line[i]) for line in [header] + cells) for i in range(len(header))]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < left_aligned else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in cells]
    return "\n".join(lines) + "\n"
