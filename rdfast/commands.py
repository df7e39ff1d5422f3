"""What the CLI commands do, callable from Python too."""

from __future__ import annotations

from pathlib import Path

from rdfast import manifests, store
from rdfast.config import Experiment, PruneSettings, TrainSettings, prune_settings, train_settings
from rdfast.data import DATASETS, parse_spec
from rdfast.engine import Engine
from rdfast.errors import BadInput
from rdfast.settings import parse_flags


def with_image_size(dataset: str, image_size: int | None) -> str:
    """`--image-size N` as the dataset option size=N, for the datasets that take one."""
    if image_size is None:
        return dataset
    name, _ = parse_spec(dataset)
    if "size" not in DATASETS[name].options:
        raise BadInput(f"--image-size applies to image folders; {name} has a fixed size")
    if image_size < 1:
        raise BadInput(f"--image-size must be >= 1, got {image_size}")
    return f"{dataset}{',' if ':' in dataset else ':'}size={image_size}"


def build_experiment(*, image_size: int | None = None, **flags) -> Experiment:
    """The `rdfast run` flags (text as typed, or values) as an Experiment: every field of
    Experiment, TrainSettings and PruneSettings by name, presets where a flag is left out."""
    exp_kw = parse_flags(Experiment, flags)
    train_kw = parse_flags(TrainSettings, flags)
    prune_kw = parse_flags(PruneSettings, flags)
    unknown = set(flags) - set(exp_kw) - set(train_kw) - set(prune_kw)
    if unknown:
        raise TypeError(f"not a setting of rdfast run: {', '.join(sorted(unknown))}")
    dataset = with_image_size(exp_kw.pop("dataset", Experiment.dataset), image_size)
    name, _ = parse_spec(dataset)
    model = exp_kw.get("model", Experiment.model)
    return Experiment(
        dataset=dataset,
        train=train_settings(name, model, **train_kw),
        prune=prune_settings(name, model, **prune_kw),
        **exp_kw,
    )


def run_command(*, progress, echo=print, **flags) -> int:
    """Validate, run every (seed, strategy), print the summary; return the exit code."""
    engine = Engine(build_experiment(**flags), progress=progress)
    engine.prepare()  # raises BadInput before anything is written
    outcomes = engine.execute()
    return print_run_summary(engine.out, outcomes, echo)


def print_run_summary(out: Path, outcomes, echo) -> int:
    """The accuracy and alpha tables of this command's runs, what failed or was left to
    another process, and the exit code: 1 when a run failed."""
    # Runs left to another process may have been finished by it in the meantime; checked
    # before the records are read, so a run counted finished has all its steps in them.
    busy = [o for o in outcomes if o.status == "busy" and not manifests.finished(out, o.run_id)]
    records = store.load_records(out, prefer_consolidated=True)  # just consolidated
    ids = {o.run_id for o in outcomes}
    mine = records[records["run_id"].isin(ids)] if not records.empty else records
    if busy and not mine.empty:
        echo(
            f"\nnote: {len(busy)} run(s) still being written by another process; "
            "the tables hold only the steps recorded so far (the last process to finish "
            "prints them whole, as does `rdfast analyze` later)"
        )
    if not mine.empty:
        from rdfast import analysis, tables

        try:
            a = analysis.analyze(mine)
            alpha_tab, acc_tab = tables.paper_tables(a)
            echo("\nmean test accuracy (over seeds) by strategy and pruning ratio t:")
            echo(acc_tab.to_string())
            echo(f"\n{tables.legend(a)}:")
            echo(alpha_tab.to_string())
            _echo_extras(a, echo)
        except BadInput as e:  # the records are written; only the summary cannot be made
            echo(f"\nno summary tables: {e}")
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed + busy:
        echo(f"{o.status}: seed {o.seed} {o.strategy} ({o.run_id}): {o.error}")
    complete = len(outcomes) - len(failed) - len(busy)
    note = f"; {len(busy)} still being written by another process" if busy else ""
    echo(f"\nrecords: {out / 'records.parquet'}  ({complete}/{len(outcomes)} runs complete{note})")
    # Runs another process is writing are its work, not a failure of this command.
    return 1 if failed else 0


def _echo_extras(a, echo, *, md: bool = False, top_classes: int = 0) -> None:
    """After the alpha and accuracy tables: the strategies against the baseline (if any) and
    the `top_classes` classes of each group that pay most, as plain text or Markdown."""
    from rdfast import tables

    def section(title, table):
        echo(f"\n{title}" + ("\n" if md else ":"))
        echo(tables.markdown(table) if md else table.to_string())

    if a.paired is not None:
        alpha_diff, acc_diff = tables.paired_tables(a)
        section(tables.paired_legend(a), alpha_diff)
        section(f"accuracy minus {a.baseline}", acc_diff)
    paying = tables.paying_classes(a, top_classes)
    if not paying.empty:
        section(tables.paying_legend(a, top_classes), paying)


def _analysis(runs_dir, by, ci, ci_method, vs="auto"):
    from rdfast import analysis

    return analysis.analyze(analysis.load(runs_dir), by=by, ci=ci, ci_method=ci_method, vs=vs)


def analyze_command(
    *, runs_dir, by, ci, ci_method, fmt, out, top_classes=3, vs="auto", echo=print, err=print
) -> int:
    """Print E[alpha_t] and mean accuracy as group x t tables; write the stats tables."""
    import json

    from rdfast import analysis, outdir, tables

    if out is not None and Path(out).resolve() != Path(runs_dir).resolve():
        outdir.check(out, "analyze")
    a = _analysis(runs_dir, by, ci, ci_method, vs)
    if out is not None and Path(out).resolve() != Path(runs_dir).resolve():
        Path(out).mkdir(parents=True, exist_ok=True)
        outdir.mark(out, "analyze")
    written = analysis.write_tables(a, out or runs_dir)
    alpha_tab, acc_tab = tables.paper_tables(a)
    if fmt == "csv":
        echo(a.groups.to_csv(index=False), nl=False)
    elif fmt == "json":
        echo(
            json.dumps(
                {
                    "groups": json.loads(a.groups.to_json(orient="records")),
                    "paying_classes": json.loads(
                        tables.paying_classes(a, top_classes)
                        .reset_index()
                        .to_json(orient="records")
                    ),
                    "paired": None
                    if a.paired is None
                    else json.loads(a.paired.to_json(orient="records")),
                    "notes": a.notes,
                },
                indent=2,
            )
        )
    elif fmt == "markdown":
        echo(f"{tables.legend(a)}\n")
        echo(tables.markdown(alpha_tab))
        echo("\nmean accuracy\n")
        echo(tables.markdown(acc_tab))
        _echo_extras(a, echo, md=True, top_classes=top_classes)
    else:
        echo(tables.legend(a))
        echo(alpha_tab.to_string())
        echo("\nmean accuracy")
        echo(acc_tab.to_string())
        _echo_extras(a, echo, top_classes=top_classes)
    for note in a.notes:
        err(f"note: {note}")
    err(f"stats tables: {', '.join(str(p) for p in written)}")
    return 0


def report_command(
    *, runs_dir, out, by, ci, ci_method, run_id, scatter_ts, top_classes=3, vs="auto", echo=print
) -> int:
    from rdfast import outdir
    from rdfast.report import build_report

    outdir.check(out, "report", records=runs_dir)  # before the analysis: nothing to undo
    a = _analysis(runs_dir, by, ci, ci_method, vs)
    path = build_report(
        a, runs_dir, out, run_id=run_id, scatter_ts=scatter_ts, top_classes=top_classes
    )
    echo(f"report: {path / 'index.html'} and {path / 'report.md'}")
    return 0


def status_command(*, runs_dir, echo=print) -> int:
    """Print every run's status; exit code 1 when any failed."""
    if not Path(runs_dir).is_dir():
        raise BadInput(f"{runs_dir} is not a directory")
    table = manifests.status_table(runs_dir)
    if table.empty:
        raise BadInput(f"no runs under {runs_dir} (start some with `rdfast run --out {runs_dir}`)")
    echo(table.to_string(index=False))
    counts = table["status"].value_counts()
    echo("\n" + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 1 if "failed" in counts else 0
