"""One declaration per setting: a dataclass field with its default, its help, how a flag's
text becomes its value, and what it contributes to a run's key.

    epochs: int = setting(None, "Dense training epochs", preset=True)

From the fields of `TrainSettings`, `PruneSettings` and `Experiment` are derived:
- the Click options of `rdfast run` (`click_options`): flag `--field-name`, type from the
  default (or `kind`), choices, the default shown, `[preset]` for preset fields;
- the parsing of their text (`parse`), and the Experiment built from the flags;
- the hashed key of a run (`run_key`): every PruneSettings field enters it, through its
  `key` function where the value matters only for some strategies or retraining modes
  (`None` elsewhere, so runs that cannot differ share their key), or `OMIT` where a setting
  added later is at the value that means "as before" (the runs recorded before it keep
  their ids);
- the manifest, which stores that key and the training settings.
Adding a setting is adding a field (see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rdfast.errors import BadInput


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    cli: bool = True,
    kind: type | None = None,
    choices: tuple | Callable[[], tuple] | None = None,
    parse: Callable[[str], Any] | None = None,
    shown: str | None = None,
    preset: bool = False,
    key: Callable[[Any, KeyContext], Any] | None = None,
    key_name: str | None = None,
):
    """A dataclass field with what the CLI and the keys need to know about it.

    `flag`: the option name (default `--field-name`); `cli=False`: not a flag. `kind`: the
    Click type where the default (None) does not say it. `parse`: text -> value (the option
    then takes text, shown as `shown`). `preset`: left out, it comes from the dataset's
    preset (the CLI default is then None). `key`: the value that enters a run's key (default:
    the value, lists for tuples); `key_name`: its name there.
    """
    meta = {
        "help": help,
        "flag": flag,
        "cli": cli,
        "kind": kind,
        "choices": choices,
        "parse": parse,
        "shown": shown,
        "preset": preset,
        "key": key,
        "key_name": key_name,
    }
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def setting_like(cls, name: str, default: Any = dataclasses.MISSING, help: str | None = None):
    """A field declared as `cls.name` is (help, flag, parsing), with its own default or help:
    one command's setting reused by another without writing it twice."""
    f = {g.name: g for g in dataclasses.fields(cls)}[name]
    meta = dict(f.metadata)
    if help is not None:
        meta["help"] = help
    if default is dataclasses.MISSING:
        default = default_of(f)
    else:
        meta["preset"] = False
        if meta["parse"] is not None:  # the default as it would be typed
            meta["shown"] = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return setting(default, **meta)


class _Omit:
    """The key function's answer for "this setting is not part of the run's key"."""

    def __repr__(self) -> str:
        return "OMIT"


OMIT = _Omit()


@dataclasses.dataclass(frozen=True)
class KeyContext:
    """What a key function may look at: the run's strategy and its settings."""

    strategy: str
    prune: Any
    train: Any

    @property
    def uses_gradient(self) -> bool:
        return self.strategy in ("gp", "up")

    @property
    def calibrates(self) -> bool:
        """Measures on calibration batches: the gradient of gp/up, the importance of cs."""
        return self.strategy in ("gp", "up", "cs")

    @property
    def finetunes(self) -> bool:
        return self.prune.retrain == "finetune"

    @property
    def rewinds(self) -> bool:
        return self.prune.retrain == "rewind"

    @property
    def mitigation(self) -> str:
        return self.prune.mitigation


def flags(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that are `rdfast run` flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def run_key(prune, train, strategy: str) -> dict:
    """Every PruneSettings field as it enters the key of a run of `strategy` (fields whose
    key function says OMIT left out)."""
    ctx = KeyContext(strategy, prune, train)
    out = {}
    for f in dataclasses.fields(prune):
        value = getattr(prune, f.name)
        key = f.metadata.get("key")
        value = key(value, ctx) if key else value
        if value is OMIT:
            continue
        out[f.metadata.get("key_name") or f.name] = (
            list(value) if isinstance(value, tuple) else value
        )
    return out


def parse_flags(cls, values: dict) -> dict:
    """The values of `cls`'s flags found in `values`; text goes through the field's parser
    (values already parsed, as Python callers may pass them, go as they are)."""
    out = {}
    for f in flags(cls):
        if f.name in values:
            v = values[f.name]
            parse = f.metadata.get("parse")
            out[f.name] = parse(v) if parse is not None and isinstance(v, str) else v
    return out


def click_options(*classes):
    """A decorator adding one Click option per flag field of `classes`."""
    import click

    def decorate(fn):
        for cls in reversed(classes):
            for f in reversed(flags(cls)):
                fn = _option(f, click)(fn)
        return fn

    return decorate


def _option(f: dataclasses.Field, click):
    m = f.metadata
    default = None if m["preset"] else default_of(f)
    help_text = m["help"] + (" [preset]" if m["preset"] else "")
    shown = default is not None and default is not False  # 0 is a default worth showing
    kw: dict[str, Any] = {"help": help_text, "show_default": shown}
    if isinstance(default, bool):
        return click.option(flag_name(f), f.name, is_flag=True, default=default, help=help_text)
    choices = m["choices"]() if callable(m["choices"]) else m["choices"]
    if choices is not None:
        kw["type"] = click.Choice(list(choices))
    elif m["parse"] is not None:
        kw["type"] = str
        default = m["shown"] if m["shown"] is not None else default
        kw["show_default"] = bool(default)
    elif m["kind"] is Path or isinstance(default, Path):
        kw["type"] = click.Path(path_type=Path)
    elif m["kind"] is not None:
        kw["type"] = m["kind"]
    elif default is not None:
        kw["type"] = type(default)
    return click.option(flag_name(f), f.name, default=default, **kw)


def default_of(f: dataclasses.Field):
    """A field's default value (a fresh one where it has a factory), or None."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# --------------------------------------------------------------------------- flag texts


# Every seed is a run (or a dense model) of its own: 10,000 is far past any study, and a
# range is checked against it by its bounds before a single seed is made.
MAX_SEEDS = 10_000


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0-4' -> (0..4); '0,2,5' -> (0, 2, 5); ranges and lists mix: '0-2,7'."""
    bounds: list[tuple[int, int]] = []
    try:
        for part in str(text).split(","):
            lo, dash, hi = part.strip().partition("-")
            a, b = (int(lo), int(hi)) if dash else (int(lo), int(lo))
            if b < a:
                raise ValueError
            bounds.append((a, b))
    except ValueError:
        raise BadInput(f"malformed --seeds {text!r}; use e.g. 0-4 or 0,2,5") from None
    if any(not (0 <= a and b < 2**31) for a, b in bounds):
        raise BadInput(f"--seeds must be distinct integers in 0..2^31-1, got {text!r}")
    if sum(b - a + 1 for a, b in bounds) > MAX_SEEDS:
        raise BadInput(f"--seeds {text!r} asks for more than {MAX_SEEDS:,} seeds")
    seeds = [s for a, b in bounds for s in range(a, b + 1)]
    if len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds must be distinct integers in 0..2^31-1, got {text!r}")
    return tuple(seeds)


def parse_floats(text: str, what: str = "--ratios") -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInput(f"malformed {what} {text!r}; use comma-separated numbers") from None


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())
