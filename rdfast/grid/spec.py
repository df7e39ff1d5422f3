"""A study as a TOML spec, expanded into its dense-model jobs and pruning-run jobs.

    name = "lenet-widths"
    imports = ["mylab.datasets"]     # modules every task imports first (own datasets, models)
    seeds = "0-9"                    # as --seeds; every other key is a `rdfast run` setting
    strategy = "mp,up"               # as --strategy (or a list of names)
    ratios = [2, 4, 8, 16]           # one run's ratios (a list of lists is an axis of them)
    retrain = ["finetune", "rewind"] # a list is an axis

    [resources]                      # what one task takes (Ray's num_cpus / num_gpus)
    num_cpus = 1

    [[grid]]                         # each [[grid]] a sub-grid: the keys above, then its own
    dataset = ["mnist", "fashion-mnist"]
    width = [0.25, 1]

    [[grid]]
    dataset = "mnist"
    model = "lenet5"

Keys are the settings' field names or their flag names (`finetune_epochs` or
`finetune-epochs`), declared once in `rdfast/config.py`, so a new setting of `rdfast run` is a
grid key too. Without `[[grid]]` tables the top level is the one grid. Every point of every
sub-grid is an Experiment; each (point, seed, strategy) is a run, named by the run id
`rdfast run` gives it, and runs that cannot differ (mp under two saliency forms) are one.
Identical dense models are one job. A CPU task trains with `resources.num_cpus` threads
(default 1) whatever executes it: the thread count is part of a CPU model's key, so a grid's
records do not depend on how many workers ran it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import itertools
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from rdfast.config import Experiment, PruneSettings, TrainSettings, check_strategies
from rdfast.errors import BadInput, DataMissing
from rdfast.runs import keys, store
from rdfast.settings import default_of, flag_name, flags

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SPEC_DIR = Path(__file__).parent.parent / "specs"  # the studies shipped with rdfast, by name
META_KEYS = ("name", "description", "imports", "resources", "grid")
RESOURCE_KEYS = {"num_cpus": 1.0, "num_gpus": 0.0}
NOT_IN_SPECS = ("out",)  # given on the command line


@dataclass(frozen=True)
class DenseJob:
    dense_id: str
    key: dict
    exp: Experiment  # resolved: one seed, explicit device and precision
    seed: int
    resources: dict
    threads: int


@dataclass(frozen=True)
class RunJob:
    run_id: str
    dense_id: str
    exp: Experiment  # resolved: one seed, one strategy
    seed: int
    strategy: str
    settings: dict  # the run's key settings, as its manifest records them
    data_name: str
    resources: dict
    threads: int
    where: str  # the sub-grid it came from, for messages

    @property
    def label(self) -> str:
        e = self.exp
        return f"{self.data_name} {e.model} w={e.width:g} seed {self.seed} {self.strategy}"


@dataclass
class Grid:
    name: str
    source: str  # the spec's path, or its shipped name
    text: str  # the spec as read
    imports: tuple[str, ...]
    dense: dict[str, DenseJob] = field(default_factory=dict)
    runs: dict[str, RunJob] = field(default_factory=dict)
    points: int = 0

    def runs_of(self, dense_id: str) -> list[RunJob]:
        return [r for r in self.runs.values() if r.dense_id == dense_id]


# --------------------------------------------------------------------------- reading


def find_spec(spec: str | Path) -> Path:
    """A spec file, or the name of one shipped with rdfast (`paper-cpu`, `paper-gpu`)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = SPEC_DIR / f"{spec}.toml"
    if not path.suffix and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.toml")))
    raise BadInput(f"no grid spec {spec}: not a file, nor one of the shipped specs ({names})")


def load(spec: str | Path) -> Grid:
    """Read, check and expand a spec; BadInput (one line, naming the key) on any mistake."""
    path = find_spec(spec)
    where = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}: not UTF-8 text (byte {e.start}); TOML specs are UTF-8") from None
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{where}: not valid TOML: {e}") from None
    return expand(doc, where, text=text, source=str(path))


def check_data(grid: Grid) -> None:
    """What only the data and the model can tell (`engine.check_with_data`, as `rdfast run`
    checks it), once per distinct (data, model, exclude, ratios, ...) of the grid's runs, before
    any task starts: a bad point is refused in one line naming it, nothing written. Data
    this machine lacks is left to the workers, which may hold it (and record the run failed
    if they do not)."""
    from rdfast.runs.engine import check_with_data

    seen = set()
    for run in grid.runs.values():
        e = run.exp
        p = e.prune
        signature = (e.dataset, str(e.data_root), e.model, e.width, e.normalize, p.exclude,
                     p.ratios, p.mitigation == "constrained" and p.val_fraction)  # fmt: skip
        if signature in seen:
            continue
        seen.add(signature)
        try:
            check_with_data(e)
        except DataMissing:
            continue
        except BadInput as err:
            raise BadInput(f"{run.where}: {err}") from None


def _setting_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every spelling of every `rdfast run` setting -> (its class, its field)."""
    out = {}
    for cls in (Experiment, TrainSettings, PruneSettings):
        for f in flags(cls):
            if f.name in NOT_IN_SPECS:
                continue
            flag = flag_name(f)[2:]
            for name in (f.name, flag, flag.replace("-", "_")):
                out[name] = (cls, f)
    return out


def _kind(f: dataclasses.Field) -> type:
    kind = f.metadata.get("kind")
    return kind if kind is not None else type(default_of(f))


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        kind, "a path"
    )


def _scalar(value, f: dataclasses.Field, what: str):
    """One value of a scalar setting, checked against its kind and choices."""
    kind = _kind(f)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, isinstance(value, str))
    if not ok:
        raise BadInput(f"{what} must be {_type_name(kind)}, got {value!r}")
    if kind is float:
        value = float(value)
        if math.isnan(value):
            raise BadInput(f"{what} must be a number, got nan")
    elif kind not in (bool, int, str):
        value = Path(value).expanduser()
    choices = f.metadata.get("choices")
    choices = choices() if callable(choices) else choices
    if choices is not None and value not in choices:
        raise BadInput(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _listed(value, f: dataclasses.Field, what: str):
    """One value of a list-valued setting (ratios, exclude, seeds, strategies): its text as
    on the command line, or a TOML list."""
    parse = f.metadata["parse"]
    if isinstance(value, str):
        return parse(value)
    if not isinstance(value, list) or any(isinstance(v, (list, dict)) for v in value):
        raise BadInput(f"{what} must be a string as on the command line or a list, got {value!r}")
    if f.name == "ratios":
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise BadInput(f"{what} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if f.name == "seeds":
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise BadInput(f"{what} must be a list of integers, got {value!r}")
        return parse(",".join(str(v) for v in value))  # the range and duplicate checks
    if any(not isinstance(v, str) for v in value):
        raise BadInput(f"{what} must be a list of names, got {value!r}")
    if f.name == "strategies":
        return check_strategies(value, repr(value))
    return tuple(value)


def _axis(value, f: dataclasses.Field, what: str) -> list:
    """The values a key takes: one for a plain value, several for an axis (a list; a list of
    lists for list-valued settings, whose plain value is a list already)."""
    listed = f.metadata.get("parse") is not None
    if listed:
        # seeds and strategies are the runs of every point: a list of them is one value
        many = (
            f.name in ("ratios", "exclude")
            and isinstance(value, list)
            and value
            and all(isinstance(v, list) for v in value)
        )
        if many:
            return [_listed(v, f, f"{what} [{i}]") for i, v in enumerate(value)]
        if isinstance(value, list) and not value and f.name in ("seeds", "strategies"):
            raise BadInput(f"{what} is an empty list: no runs")
        return [_listed(value, f, what)]
    if isinstance(value, list):
        if not value:
            raise BadInput(f"{what} is an empty axis: give at least one value")
        return [_scalar(v, f, f"{what} [{i}]") for i, v in enumerate(value)]
    return [_scalar(value, f, what)]


def _resources(table, where: str, base: dict) -> dict:
    if not isinstance(table, dict):
        raise BadInput(f"{where}: resources must be a table ([resources]), got {table!r}")
    out = dict(base)
    for k, v in table.items():
        if k not in RESOURCE_KEYS:
            raise BadInput(f"{where}: unknown key resources.{k}; use {', '.join(RESOURCE_KEYS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise BadInput(f"{where}: resources.{k} must be a number >= 0, got {v!r}")
        out[k] = float(v)
    if out["num_cpus"] <= 0 and out["num_gpus"] <= 0:
        raise BadInput(f"{where}: resources.num_cpus must be > 0 (or give num_gpus)")
    return out


def _settings(table: dict, where: str, known: dict, meta: tuple) -> dict:
    """The setting keys of one table -> {field name: [values]} (meta keys skipped)."""
    out = {}
    for key, value in table.items():
        if key in meta:
            continue
        if key not in known:
            if key in NOT_IN_SPECS:
                raise BadInput(f"{where}: key {key!r} is given on the command line (--{key})")
            close = difflib.get_close_matches(key, list(known) + list(META_KEYS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise BadInput(f"{where}: unknown key {key!r}{hint}")
        f = known[key][1]
        if f.name in out:
            raise BadInput(f"{where}: {f.name} is given twice (as {key!r} too)")
        out[f.name] = _axis(value, f, f"{where}: {key}")
    return out


def expand(doc: dict, where: str = "spec", *, text: str = "", source: str = "") -> Grid:
    """The Grid of a parsed spec: every sub-grid's points, their runs and dense models."""
    known = _setting_fields()
    name = doc.get("name", Path(source).stem if source else "grid")
    if not isinstance(name, str) or not name:
        raise BadInput(f"{where}: name must be a string, got {name!r}")
    imports = doc.get("imports", [])
    if not isinstance(imports, list) or any(not isinstance(m, str) for m in imports):
        raise BadInput(f"{where}: imports must be a list of module names, got {imports!r}")
    import_modules(imports, where)
    top = _settings(doc, where, known, META_KEYS)
    resources = _resources(doc.get("resources", {}), where, RESOURCE_KEYS)
    subgrids = doc.get("grid", [{}])
    if not isinstance(subgrids, list) or any(not isinstance(g, dict) for g in subgrids):
        raise BadInput(f"{where}: grid must be an array of tables ([[grid]])")
    if not subgrids:
        raise BadInput(f"{where}: grid is empty: give at least one [[grid]] table")
    grid = Grid(name, source or where, text, tuple(imports))
    for i, sub in enumerate(subgrids, 1):
        at = f"{where} [[grid]] {i}" if "grid" in doc else where
        own = _settings(sub, at, known, ("name", "resources"))
        res = _resources(sub.get("resources", {}), at, resources)
        merged = {**top, **own}
        names = list(merged)
        axes = [n for n in names if len(merged[n]) > 1]
        for values in itertools.product(*(merged[n] for n in names)):
            point = dict(zip(names, values))
            label = ", ".join(f"{n}={_shown(point[n])}" for n in axes)
            _add_point(grid, point, res, f"{at} ({label})" if label else at)
    return grid


def import_modules(modules, where: str = "spec") -> None:
    """The spec's `imports`: modules that register datasets, models or strategies."""
    importlib.invalidate_caches()
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # an ImportError, or the module's own failure
            raise BadInput(f"{where}: imports: cannot import {m}: {e}") from None


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def threads_of(resources: dict) -> int:
    """The torch threads of a CPU task: its CPUs (Ray would otherwise give it one)."""
    return max(1, int(resources["num_cpus"]))


def _experiment(point: dict, resources: dict, at: str) -> tuple[Experiment, str, str]:
    """(Experiment with device and precision resolved, canonical data name, device type)."""
    from rdfast.commands import build_experiment
    from rdfast.data import canonical_spec
    from rdfast.models import check_model_name

    try:
        exp = build_experiment(**point)
        exp.validate()
        data_name = canonical_spec(exp.dataset)
        check_model_name(exp.model, exp.width)
        gpus = resources["num_gpus"] > 0
        device = exp.device if exp.device != "auto" else ("cuda" if gpus else "cpu")
        if device == "cuda" and not gpus:
            raise BadInput("device cuda needs resources.num_gpus > 0")
        if exp.masked_kernels and device != "cuda":
            raise BadInput("masked_kernels needs a CUDA device (resources.num_gpus > 0)")
    except BadInput as e:
        raise BadInput(f"{at}: {e}") from None
    exp = keys.resolve_precision(replace(exp, device=device), device)
    return exp, data_name, device


def _add_point(grid: Grid, point: dict, resources: dict, at: str) -> None:
    exp, data_name, device = _experiment(point, resources, at)
    grid.points += 1
    threads = threads_of(resources)
    for seed in exp.seeds:
        one = replace(exp, seeds=(seed,))
        dense = keys.dense_key(one, seed, data_name, device, threads)
        dense_id = store.stable_hash(dense)
        if dense_id not in grid.dense:
            grid.dense[dense_id] = DenseJob(dense_id, dense, one, seed, resources, threads)
        for strategy in exp.strategies:
            settings = keys.run_settings(one, dense, strategy)
            run_id = keys.run_id(dense, settings)
            if run_id in grid.runs:  # a run that cannot differ from one already listed
                continue
            grid.runs[run_id] = RunJob(
                run_id, dense_id, replace(one, strategies=(strategy,)), seed, strategy,
                settings, data_name, resources, threads, at,
            )  # fmt: skip
