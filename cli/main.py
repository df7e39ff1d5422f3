"""`rdfast` commands. Thin: parsing and printing only; the work lives in `rdfast.*`."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import click

import rdfast
from rdfast.config import DEFAULT_FLOOR, Experiment, PruneJob, PruneSettings, TrainSettings
from rdfast.errors import BadInput, DamagedFile
from rdfast.settings import click_options, parse_floats


class OneLineErrors(click.Group):
    """Usage errors as one line on stderr with exit code 2, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("rdfast: aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"rdfast: error: {e.format_message()}", err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        except BadInput as e:
            click.echo(f"rdfast: error: {e}", err=True)
            sys.exit(2)
        except DamagedFile as e:
            click.echo(
                f"rdfast: error: {e}; rerun `rdfast run` with the same settings to recompute it",
                err=True,
            )
            sys.exit(2)
        except OSError as e:  # a folder that cannot be written, a full disk: writes are atomic
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"rdfast: error: {e.strerror or e}{where}", err=True)
            # A full disk is the machine's state, not the command's input: exit 1.
            sys.exit(1 if e.errno == errno.ENOSPC else 2)
        sys.exit(rv or 0)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"rdfast: warning: {message}", err=True)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(rdfast.__version__, prog_name="rdfast")
def cli():
    """rdfast: measure how pruning distorts per-class recall.

    Train a model, prune it globally with magnitude (mp), gradient (gp), undecayed (up) and
    random (rp) scores to a series of ratios, retrain, and record per-class recall at each
    step. Start with `rdfast run` (digits, mlp, all strategies, five seeds).
    """
    import warnings

    warnings.showwarning = _one_line_warning


@cli.command()
@click_options(Experiment, TrainSettings, PruneSettings)
@click.option("--image-size", type=int, help="Resize image-folder datasets to N x N (as size=N).")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bars [on when stderr is a terminal]."
)
def run(**kw):
    """Train, prune with each strategy to each ratio, retrain, record per-class recall.

    Every strategy prunes the same trained dense model of each seed (cached under OUT/dense).
    Rerunning the same command resumes: finished steps are skipped. Several processes may
    share one OUT (a grid split by seed or strategy, or one command started N times): each
    run is written by one of them. Records: OUT/records.parquet, one row per (run, t, class).
    """
    from rdfast.cli.output import print_run
    from rdfast.commands import run_experiment

    return print_run(run_experiment(**kw), click.echo)


@cli.command()
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    help="Folder of downloaded datasets [$RDFAST_DATA or ~/.cache/rdfast/data].",
)
def datasets(data_root):
    """List the datasets, their options and whether their files are present."""
    from rdfast.data import COMMON_OPTIONS, DATASETS, DEFAULT_DATA_ROOT

    root = data_root or DEFAULT_DATA_ROOT
    click.echo(f"data root: {root}")
    for entry in DATASETS.values():
        if entry.positional:
            state = f"reads {entry.name}:<{entry.positional}>"
        elif not entry.files:
            state = "built in"
        else:
            state = "present" if entry.present(root) else "missing (download when online)"
        click.echo(f"  {entry.name:<14} {state:<32} {entry.description}")
        for k, o in {**entry.options, **COMMON_OPTIONS}.items():
            click.echo(f"      {f'{k}={o.default}':<18} {o.help}")


def parse_by(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


analysis_options = [
    click.option(
        "--by",
        default="strategy,saliency,dataset,model,width",
        show_default=True,
        help="Record columns that define a group; seeds are its replicates. A setting of "
        "the runs' manifests splits groups too (e.g. ceag_tolerance, finetune_epochs).",
    ),
    click.option(
        "--spec",
        default=None,
        help="Only the runs of this grid spec (a file or a shipped spec's name), where "
        "several specs share RUNS_DIR (their common runs are trained once).",
    ),
    click.option(
        "--ci",
        default=0.99,
        show_default=True,
        type=float,
        help="Confidence level of the intervals.",
    ),
    click.option(
        "--ci-method",
        default="t",
        show_default=True,
        type=click.Choice(["t", "bootstrap"]),
        help="Student-t interval, or scipy.stats.bootstrap (percentile). The bootstrap "
        "undercovers with few seeds (89 % for a 99 % interval at 5): its marks are shown only "
        "from 20 seeds.",
    ),
    click.option(
        "--classes",
        "top_classes",
        default=3,
        show_default=True,
        type=click.IntRange(min=0),
        help="Show the N classes of each group that lose the most recall (0: none).",
    ),
    click.option(
        "--vs",
        default="auto",
        show_default=True,
        help="Compare every strategy with this one, or every mitigation with plain "
        "retraining (plain), seed by seed on the same dense model (auto: plain when runs "
        "used several mitigations, else mp when present; none: no comparison).",
    ),
    click.option(
        "--across",
        default=None,
        metavar="COLUMN=VALUE",
        help="Also compare every group with the group of this value of one --by column and "
        "the same other settings, e.g. dataset=mnist (claim 4: harder datasets) or width=1 "
        "(claim 5: smaller models), or a retraining setting --by names (finetune_epochs=3): "
        "differences of the means over seeds, unpaired (such groups need not share dense "
        "models), Welch's interval and t-test, marks as --adjust says.",
    ),
    click.option(
        "--floor",
        default=DEFAULT_FLOOR,
        show_default=True,
        type=float,
        help="Show E[alpha_t] and its mark only where the mean accuracy is above FLOOR x "
        "chance (1 / classes; at most halfway from chance to 1) and above halfway from chance "
        "to the dense model's accuracy (a collapsed model): alpha divides by the accuracy "
        "(0: everywhere).",
    ),
    click.option(
        "--adjust",
        default="holm",
        show_default=True,
        type=click.Choice(["holm", "bh", "none"]),
        help="Multiplicity control of the marks: the marks of one table column are one family "
        "(every group x t cell with an interval), and a cell keeps its < or > only where its "
        "p-value adjusted over the family is below 1 - CI as well: holm bounds the chance of "
        "any false mark, bh (Benjamini-Hochberg) the expected share of false marks; none: "
        "each interval alone. Raw and adjusted p-values are both written.",
    ),
    click.option(
        "--cost",
        is_flag=True,
        help="Also the median wall seconds of a pruning step per group and t (prune, retrain, "
        "evaluate): what each strategy or mitigation costs. Machine time, different on every "
        "run, so left out of the tables unless asked for.",
    ),
]


def with_analysis_options(fn):
    for opt in reversed(analysis_options):
        fn = opt(fn)
    return fn


def analysis_args(by, spec, ci, ci_method, top_classes, vs, across, floor, adjust, cost) -> dict:
    """The options `with_analysis_options` adds, as the keywords the commands take."""
    return {
        "by": parse_by(by),
        "spec": spec,
        "ci": ci,
        "ci_method": ci_method,
        "top_classes": top_classes,
        "vs": None if vs == "none" else vs,
        "across": across,
        "floor": floor,
        "adjust": adjust,
        "cost": cost,
    }


@cli.command()
@click.argument("runs_dir", type=click.Path(path_type=Path))
@with_analysis_options
@click.option(
    "--format",
    "fmt",
    default="table",
    show_default=True,
    type=click.Choice(["table", "markdown", "csv", "json"]),
    help="Output format.",
)
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), help="Folder for the stats tables [RUNS_DIR]."
)
def analyze(runs_dir, fmt, out, **analysis):
    """E[alpha_t] with its CI mark (< > ?) and mean accuracy, per group and t.

    alpha_t(m) is the least-squares slope through the origin of the normalized recall
    balance after pruning (Bn_t) on that of the dense model (Bn_1) over the classes of model m;
    above 1 the gap between classes widens (intensification); cells whose accuracy is near
    chance (--floor) show no alpha. Then the disparity E[Psi_t], the spread over classes of
    the excess recall drops (R_1 - R_t) - (A_1 - A_t), bounded in [0, 2]; every strategy
    against mp (--vs), or every mitigation against plain retraining, seed by seed on the same
    dense model; with --across, every group against the group of another dataset (or width)
    with the same other settings; the classes that lose the most recall at the largest t;
    prediction flips and PIE shares. Writes alpha_runs, alpha_groups, class_groups,
    alpha_paired, alpha_across and the flip tables (Parquet and CSV) next to the records or
    to -o.
    """
    from rdfast.cli.output import print_analysis
    from rdfast.commands import analyze_runs

    args = analysis_args(**analysis)
    a, written = analyze_runs(runs_dir=runs_dir, out=out, **args)
    return print_analysis(
        a, written, fmt, args["top_classes"], click.echo, lambda m: click.echo(m, err=True)
    )


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--classes",
    "top_classes",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Show the N classes of each group that lose the most recall (0: none).",
)
@click.option(
    "--format",
    "fmt",
    default="markdown",
    show_default=True,
    type=click.Choice(["table", "markdown"]),
    help="Output format.",
)
def tables(folder, top_classes, fmt):
    """Print the tables of `rdfast analyze` again from FOLDER's compact tables alone.

    FOLDER holds what analyze wrote (alpha_groups.csv, class_groups.csv, alpha_paired.csv,
    pie_groups.csv and analysis.json, its settings): a study's tables kept without its
    records, as under studies/ in rdfast's repository, print as analyze printed them.
    """
    from rdfast.cli.output import print_analysis
    from rdfast.stats import read_tables

    a = read_tables(folder)
    return print_analysis(a, [], fmt, top_classes, click.echo, lambda m: click.echo(m, err=True))


@cli.command()
@click.argument("runs_dir", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--spec",
    help="Only the runs of this grid spec (a file or a shipped spec's name), where several "
    "specs share RUNS_DIR.",
)
def export(runs_dir, dest, spec):
    """Copy the complete runs' records, without models, into DEST, adding them to its runs.

    DEST gets records.parquet, confusion.parquet and each run's manifest (every setting): a
    study's results in about 3 KB a run, to keep in a repository or send, that `analyze`,
    `report` and pandas read like the runs folder (prediction flips need the models'
    predictions and are left out). Exporting again into DEST adds the runs finished since,
    or those of another machine or seed range: a run both hold must have the same records.
    """
    from rdfast.commands import export_runs

    done = export_runs(runs_dir=runs_dir, dest=dest, spec=spec)
    click.echo(
        f"{dest}: {len(done.added)} run(s) added, {done.already} already there, {done.total} in all"
    )
    if done.incomplete:
        click.echo(
            f"note: {len(done.incomplete)} run(s) not complete, left out: "
            f"{', '.join(done.incomplete[:5])}{' ...' if len(done.incomplete) > 5 else ''}",
            err=True,
        )


@cli.command()
@click.argument("runs_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder of the report (index.html, report.md, PNG figures).",
)
@with_analysis_options
@click.option("--run", "run_id", help="Run shown in the per-class recall heatmap [first mp run].")
@click.option(
    "--scatter-t", default="", help="t values of the scatter plots [smallest, middle, largest]."
)
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the datasets' files are, for the pictures of the most-flipped test images "
    "[$RDFAST_DATA, else ~/.cache/rdfast/data]; without them the report lists their indices.",
)
def report(runs_dir, out, run_id, scatter_t, data_root, **analysis):
    """Tables and figures of the recall-distortion study: index.html and report.md.

    The page opens with a summary (which strategy distorts least, which classes pay, what
    survives the multiplicity control), then the figures and, for image datasets, the
    test images pruning forgets; the long tables come last, folded.
    """
    from rdfast.commands import make_report

    path = make_report(
        runs_dir=runs_dir,
        out=out,
        **analysis_args(**analysis),
        run_id=run_id,
        scatter_ts=list(parse_floats(scatter_t, "--scatter-t")) or None,
        data_root=data_root,
    )
    click.echo(f"report: {path / 'index.html'} and {path / 'report.md'}")


@cli.command()
@click_options(PruneJob)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bars [on when stderr is a terminal]."
)
def prune(**kw):
    """Prune a trained model you bring, globally, to each ratio; measure who pays.

    With --model and --dataset: the checkpoint is loaded into the model (every name and shape
    checked), pruned once per ratio with each strategy (gp/up score with the gradient over
    --grad-batches calibration batches of the train split), optionally fine-tuned, and its
    per-class recall on the test split recorded as `rdfast run` records it (t = 1 is the
    given model), so `rdfast analyze OUT` and `rdfast report OUT` work unchanged. --save
    writes each pruned model under OUT/pruned/.

    Without --dataset: streamed magnitude pruning of a safetensors checkpoint (file or
    sharded folder), shard by shard through memory maps, never held whole; every ratio from
    the same two reads, one pruned checkpoint per ratio in OUT/t<t>/ and OUT/prune.json.

    \b
    rdfast prune --model lenet5 --checkpoint model.pt --dataset mnist --strategy mp,up
    rdfast prune --checkpoint llm/ --ratios 2,4,8 --include '*proj.weight' --out llm-pruned
    """
    from rdfast.cli.output import print_run, print_stream
    from rdfast.commands import prune_checkpoint

    result = prune_checkpoint(**kw)
    if isinstance(result, dict):
        return print_stream(result, click.echo)
    return print_run(result, click.echo)


class DefaultsToRun(click.Group):
    """`rdfast grid SPEC ...` is `rdfast grid run SPEC ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=DefaultsToRun)
def grid():
    """A whole study from a TOML spec, on this machine or a Ray cluster.

    \b
    rdfast grid paper-cpu --out study --executor local --workers 2
    rdfast grid study.toml --out study --executor ray --address auto
    rdfast grid status study.toml --out study

    SPEC is a file or a shipped spec's name (paper-cpu, paper-gpu). Every key of the spec is
    a `rdfast run` setting (a list is an axis; [[grid]] tables add sub-grids; [resources]
    gives each task's num_cpus and num_gpus); see `rdfast grid run --help`.
    """


@grid.command("run")
@click.argument("spec")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default="runs",
    show_default=True,
    help="Experiment folder, in the layout `rdfast run` writes; only this "
    "command's process writes it.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="A process pool on this machine, or Ray tasks.",
)
@click.option(
    "--workers",
    type=int,
    help="local: processes [CPUs / the spec's num_cpus]; "
    "ray without --address: CPUs of the Ray instance started here [all].",
)
@click.option(
    "--address",
    help="ray: auto (the cluster `ray start` made here), HOST:PORT of "
    "its head, or ray://HOST:PORT (Ray Client) [a new local instance].",
)
@click.option(
    "--retries",
    type=int,
    default=3,
    show_default=True,
    help="Times a task whose worker died is started again.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the jobs and their training epochs; run nothing, write nothing.",
)
@click.option(
    "--skip-exported",
    type=click.Path(path_type=Path),
    help="Leave out the runs this export (`rdfast export`) holds: a study continued on "
    "another machine, its finished part kept as an export; export OUT into it after.",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar [on when stderr is a terminal]."
)
def grid_run(spec, out, executor, workers, address, retries, dry_run, skip_exported, progress):
    """Make every run of SPEC that OUT does not hold complete.

    The spec expands into dense models (each trained once, shared by every run it is the
    dense model of) and pruning runs (one per point of a sub-grid, seed and strategy, with
    the run id `rdfast run` would give it). Completed runs in OUT are skipped, so a rerun
    after a stop finishes the grid; a failed run is recorded with its reason and the others
    go on. Workers need no shared filesystem: results come back to this process, which writes
    OUT. Then `rdfast analyze OUT` and `rdfast report OUT -o DIR`.
    """
    from rdfast.cli.output import print_grid, print_plan
    from rdfast.grid.driver import grid_plan, run_grid

    if dry_run:
        return print_plan(grid_plan(spec, out), click.echo)
    result = run_grid(spec, out, executor=executor, workers=workers, address=address,
                      retries=retries, progress=progress, skip_exported=skip_exported)  # fmt: skip
    return print_grid(result, click.echo, spec=spec)


@grid.command("status")
@click.argument("spec")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default="runs",
    show_default=True,
    help="The grid's experiment folder.",
)
@click.option(
    "--all", "show_all", is_flag=True, help="List every run, not only those not complete."
)
def grid_status(spec, out, show_all):
    """How far the grid of SPEC is in OUT: complete, failed (why), in flight, part-way, to do.

    Exit code 1 when a run failed.
    """
    from rdfast.cli.output import print_grid_status
    from rdfast.grid.driver import grid_status

    return print_grid_status(grid_status(spec, out), click.echo, show_all)


@cli.command()
@click.argument("runs_dir", type=click.Path(path_type=Path), default="runs")
def status(runs_dir):
    """Each run's state: complete, running or stopped part-way, or failed (with the reason).

    Steps count the pruning ratios recorded so far. Exit code 1 when a run failed.
    """
    from rdfast.cli.output import print_status
    from rdfast.commands import run_status

    return print_status(run_status(runs_dir), click.echo)


def main():
    cli()


if __name__ == "__main__":
    main()
