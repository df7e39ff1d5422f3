"""What the CLI commands do, as functions that return data: the Experiment of a set of flags,
a run's result, an analysis, a report folder, the status table. Printing is the CLI's
(`rdfast/cli/output.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rdfast.config import (
    DEFAULT_FLOOR,
    Experiment,
    PruneJob,
    PruneSettings,
    TrainSettings,
    default_model,
    prune_settings,
    train_settings,
)
from rdfast.data import DATASETS, parse_spec
from rdfast.errors import BadInput
from rdfast.runs import manifests, store
from rdfast.runs.engine import Engine
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
    model = exp_kw.get("model") or default_model(name)
    exp_kw["model"] = model
    return Experiment(
        dataset=dataset,
        train=train_settings(name, model, exp_kw.get("preset") or "paper", **train_kw),
        prune=prune_settings(name, model, exp_kw.get("preset") or "paper", **prune_kw),
        **exp_kw,
    )


@dataclass
class RunResult:
    """What a `rdfast run` did: its runs, those left to another process or failed, and the
    analysis of its own runs (None, with the reason, when it cannot be made)."""

    out: Path
    outcomes: list
    busy: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    analysis: object | None = None
    no_summary: str | None = None

    @property
    def complete(self) -> int:
        return len(self.outcomes) - len(self.failed) - len(self.busy)


def run_experiment(*, progress=None, **flags) -> RunResult:
    """Validate (nothing is written before), run every (seed, strategy), analyze its runs."""
    engine = Engine(build_experiment(**flags), progress=progress)
    engine.prepare()  # raises BadInput before anything is written
    return summarize_runs(engine.out, engine.execute())


def summarize_runs(out: Path, outcomes) -> RunResult:
    """The RunResult of a command's runs: what failed or another process writes, and the
    analysis of its own runs' records."""
    from rdfast import stats

    # Runs left to another process may have been finished by it in the meantime; checked
    # before the records are read, so a run counted finished has all its steps in them.
    busy = [o for o in outcomes if o.status == "busy" and not manifests.finished(out, o.run_id)]
    result = RunResult(out, outcomes, busy, [o for o in outcomes if o.status == "failed"])
    records = store.load_records(out, prefer_consolidated=True)  # just consolidated
    ids = {o.run_id for o in outcomes}
    mine = records[records["run_id"].isin(ids)] if not records.empty else records
    if not mine.empty:
        try:
            result.analysis = stats.analyze(mine)
        except BadInput as e:  # the records are written; only the summary cannot be made
            result.no_summary = str(e)
    return result


def prune_job(**flags) -> PruneJob:
    """The `rdfast prune` flags (text as typed, or values) as a PruneJob."""
    kw = parse_flags(PruneJob, flags)
    unknown = set(flags) - set(kw)
    if unknown:
        raise TypeError(f"not a setting of rdfast prune: {', '.join(sorted(unknown))}")
    return PruneJob(**kw)


def prune_checkpoint(*, progress=None, **flags):
    """`rdfast prune`: with a dataset, the given model's runs (a RunResult); without one, the
    streamed magnitude pruning of a safetensors checkpoint (its summary, a dict)."""
    job = prune_job(**flags)
    if job.dataset is not None:
        from rdfast.runs.given_study import GivenModelStudy

        study = GivenModelStudy(job, progress=progress)
        study.prepare()  # raises BadInput before anything is written
        return summarize_runs(study.out, study.execute())
    from rdfast.pruning.streaming import stream_prune

    job.validate()
    if set(job.strategies) != {"mp"}:
        raise BadInput(
            "without --dataset a checkpoint is pruned by magnitude only (--strategy mp): "
            f"{', '.join(s for s in job.strategies if s != 'mp')} need(s) the model and data"
        )
    if job.model is not None or job.save or job.finetune_epochs:
        raise BadInput("--model, --save and --finetune-epochs need --dataset; without it the "
                       "pruned shards are always written")  # fmt: skip
    return stream_prune(job.checkpoint, job.ratios, job.out, include=job.include,
                        exclude=job.exclude, progress=progress)  # fmt: skip


def spec_runs(spec) -> set[str]:
    """The run ids of a grid spec (a file or a shipped spec's name)."""
    from rdfast.grid import spec as grid_spec

    return set(grid_spec.load(spec).runs)


def load_records(runs_dir, spec=None):
    """The records under runs_dir (`stats.load`); with `spec` (a grid spec's file or name),
    only its runs: specs that share an --out share the runs they have in common."""
    from rdfast import stats

    records = stats.load(runs_dir)
    if spec is None:
        return records
    ids = spec_runs(spec)
    kept = records[records["run_id"].isin(ids)]
    if kept.empty:
        raise BadInput(f"none of the {len(ids)} runs of the spec {spec} is under {runs_dir}")
    kept.attrs = records.attrs
    return kept


def _analysis(runs_dir, spec, *, by, top_classes, **options):
    """`stats.analyze` of the records under runs_dir (of `spec` alone, when given) with the
    flip rates of the same groups; the manifest settings --by names become columns once,
    for both."""
    from rdfast import stats
    from rdfast.stats import flips
    from rdfast.stats.records import with_setting_columns

    records = with_setting_columns(load_records(runs_dir, spec), by)
    a = stats.analyze(records, by=by, confusion=store.load_confusion(runs_dir), **options)
    kept = records[~records["run_id"].isin(a.untrained)]  # the runs the tables hold
    a.flips = flips.analyze_flips(runs_dir, kept, a.by, top=max(top_classes, 1))
    return a


def analyze_runs(
    *, runs_dir, by, ci, ci_method, out=None, top_classes=3, vs="auto", floor=DEFAULT_FLOOR,
    adjust="holm", spec=None, cost=False, across=None,
):  # fmt: skip
    """(Analysis, paths of the stats tables written next to the records or into `out`)."""
    from rdfast import outdir, stats

    other = out is not None and Path(out).resolve() != Path(runs_dir).resolve()
    if other:
        outdir.check(out, "analyze")
    a = _analysis(runs_dir, spec, by=by, ci=ci, ci_method=ci_method, vs=vs, floor=floor,
                  adjust=adjust, top_classes=top_classes, cost=cost, across=across)  # fmt: skip
    if other:
        Path(out).mkdir(parents=True, exist_ok=True)
        outdir.mark(out, "analyze")
    return a, stats.write_tables(a, out or runs_dir)


def make_report(
    *, runs_dir, out, by, ci, ci_method, run_id=None, scatter_ts=None, top_classes=3, vs="auto",
    floor=DEFAULT_FLOOR, adjust="holm", data_root=None, spec=None, cost=False, across=None,
) -> Path:  # fmt: skip
    """The report folder `out` (index.html, report.md, figures) of the records in runs_dir."""
    from rdfast import outdir
    from rdfast.report.page import build_report

    outdir.check(out, "report", records=runs_dir)  # before the analysis: nothing to undo
    a = _analysis(runs_dir, spec, by=by, ci=ci, ci_method=ci_method, vs=vs, floor=floor,
                  adjust=adjust, top_classes=top_classes, cost=cost, across=across)  # fmt: skip
    return build_report(a, runs_dir, out, run_id=run_id, scatter_ts=scatter_ts,
                        top_classes=top_classes, data_root=data_root)  # fmt: skip


def export_runs(*, runs_dir, dest, spec=None):
    """`runs.export.export` of the complete runs under runs_dir (of `spec` alone, when given)."""
    from rdfast.runs.export import export

    return export(runs_dir, dest, None if spec is None else spec_runs(spec))


def run_status(runs_dir):
    """One row per run under runs_dir (`manifests.status_table`), or BadInput."""
    if not Path(runs_dir).is_dir():
        raise BadInput(f"{runs_dir} is not a directory")
    table = manifests.status_table(runs_dir)
    if table.empty:
        raise BadInput(f"no runs under {runs_dir} (start some with `rdfast run --out {runs_dir}`)")
    return table
