"""How the commands' results are printed: plain text or Markdown tables, notes on stderr."""

from __future__ import annotations

import json

from rdfast.report import tables
from rdfast.runs.store import records_path


def print_run(result, echo) -> int:
    """The accuracy and alpha tables of a run's own runs, what failed or was left to another
    process; the exit code: 1 when a run failed (runs another process writes are its work)."""
    busy, a = result.busy, result.analysis
    if busy and (a is not None or result.no_summary):
        echo(
            f"\nnote: {len(busy)} run(s) still being written by another process; "
            "the tables hold only the steps recorded so far (the last process to finish "
            "prints them whole, as does `rdfast analyze` later)"
        )
    if a is not None:
        alpha_tab, acc_tab = tables.paper_tables(a)
        echo("\nmean test accuracy (over seeds) by strategy and pruning ratio t:")
        echo(acc_tab.to_string())
        echo(f"\n{tables.legend(a)}:")
        echo(alpha_tab.to_string())
        print_floor(a, echo)
        print_extras(a, echo)
    elif result.no_summary:
        echo(f"\nno summary tables: {result.no_summary}")
    for o in result.failed + busy:
        echo(f"{o.status}: seed {o.seed} {o.strategy} ({o.run_id}): {o.error}")
    note = f"; {len(busy)} still being written by another process" if busy else ""
    echo(
        f"\nrecords: {records_path(result.out)}  "
        f"({result.complete}/{len(result.outcomes)} runs complete{note})"
    )
    return 1 if result.failed else 0


def print_extras(a, echo, *, md: bool = False, top_classes: int = 0) -> None:
    """After the alpha and accuracy tables: the disparity Psi, the strategies (or mitigations)
    against the baseline (if any) and the `top_classes` classes of each group that pay most,
    as plain text or Markdown."""

    def section(title, table):
        echo(f"\n{title}" + ("\n" if md else ":"))
        echo(tables.markdown(table) if md else table.to_string())

    if (a.groups["t"] > 1).any():
        section(tables.disparity_legend(a), tables.disparity_table(a))
    if tables.has_error_changes(a):
        for name in ("cev", "sde"):
            section(tables.error_change_legend(a, name), tables.interval_table(a, name))
    if a.paired is not None:
        alpha_diff, acc_diff, psi_diff = tables.paired_tables(a)
        section(tables.paired_legend(a), alpha_diff)
        section(f"accuracy minus {a.baseline}", acc_diff)
        section(f"Psi minus {a.baseline}", psi_diff)
    if a.across_setting is not None:
        alpha_diff, acc_diff, psi_diff = tables.across_tables(a)
        column, ref = a.across_setting
        section(tables.across_legend(a), alpha_diff)
        ref = tables.setting_text(column, ref)
        section(f"accuracy minus {ref}", acc_diff)
        section(f"Psi minus {ref}", psi_diff)
    if tables.has_cost(a):
        section(tables.COST_LEGEND, tables.cost_table(a))
    paying = tables.paying_classes(a, top_classes)
    if not paying.empty:
        section(tables.paying_legend(a, top_classes), paying)


def print_analysis(a, written, fmt: str, top_classes: int, echo, err) -> int:
    """E[alpha_t] and mean accuracy as group x t tables in `fmt`; notes and files on stderr."""
    alpha_tab, acc_tab = tables.paper_tables(a)
    if fmt == "csv":
        echo(a.groups.to_csv(index=False), nl=False)
    elif fmt == "json":
        paying = tables.paying_classes(a, top_classes).reset_index()
        echo(
            json.dumps(
                {
                    "groups": json.loads(a.groups.to_json(orient="records")),
                    "paying_classes": json.loads(paying.to_json(orient="records")),
                    "paired": None
                    if a.paired is None
                    else json.loads(a.paired.to_json(orient="records")),
                    "across": None
                    if a.across is None
                    else json.loads(a.across.to_json(orient="records")),
                    "flips": None
                    if a.flips is None or a.flips.empty
                    else json.loads(a.flips.groups.to_json(orient="records")),
                    "notes": a.notes,
                },
                indent=2,
            )
        )
    elif fmt == "markdown":
        echo(f"{tables.legend(a)}\n")
        echo(tables.markdown(alpha_tab))
        print_floor(a, echo)
        echo("\nmean accuracy\n")
        echo(tables.markdown(acc_tab))
        print_extras(a, echo, md=True, top_classes=top_classes)
    else:
        echo(tables.legend(a))
        echo(alpha_tab.to_string())
        print_floor(a, echo)
        echo("\nmean accuracy")
        echo(acc_tab.to_string())
        print_extras(a, echo, top_classes=top_classes)
    if fmt in ("table", "markdown"):
        print_flips(a, echo, md=fmt == "markdown")
    for note in a.notes + (a.flips.notes if a.flips is not None else []):
        err(f"note: {note}")
    if written:
        err(f"stats tables: {', '.join(str(p) for p in written)}")
    return 0


def print_floor(a, echo) -> None:
    """The legend of `--` cells, where the alpha table has any."""
    if a.groups["below_floor"].any():
        echo(tables.floor_legend(a))


def print_flips(a, echo, *, md: bool = False) -> None:
    """Per group and t: the mean share of test predictions that differ from the dense model's,
    and the share of test examples that are PIE (modal pruned != modal dense prediction)."""
    for text, table in tables.flips_tables(a).items():
        echo(f"\n{text}" + ("\n" if md else ":"))
        echo(tables.markdown(table) if md else table.to_string())


def print_status(table, echo) -> int:
    """Every run's status; exit code 1 when any failed."""
    echo(table.to_string(index=False))
    counts = table["status"].value_counts()
    echo("\n" + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 1 if "failed" in counts or "damaged" in counts else 0


def print_stream(summary: dict, echo) -> int:
    """What a streamed prune kept per ratio, and where the checkpoints are."""
    for folder, problem in summary.get("repaired", {}).items():
        echo(f"{folder}: {problem}; pruned again")
    echo(f"pruned {len(summary['tensors'])} tensors, {summary['total']:,} weights, "
         f"in {summary['seconds']:.1f} s")  # fmt: skip
    already = set(summary.get("already", ()))
    for r in summary["ratios"]:
        note = " (already complete)" if r["t"] in already else ""
        echo(f"  t={r['t']:g}: kept {r['remaining']:,} (threshold |w| = {r['threshold']:.4g}) -> "
             f"{r['path']}{note}")  # fmt: skip
    return 0


def print_grid(result, echo, spec=None) -> int:
    """What a grid command did; exit code 1 when a run failed. Where OUT holds other runs
    too (specs sharing a folder), the next command reads this spec's alone."""
    for run_id, label, reason in result.failed:
        echo(f"failed: {label} ({run_id}): {reason}")
    made = result.complete - result.already
    echo(
        f"\ngrid {result.name}: {result.complete}/{result.runs} runs complete ({made} made now, "
        f"{result.already} already there; {result.dense_trained} dense models trained), "
        f"{len(result.failed)} failed, {result.seconds:.1f} s on {result.executor}"
        + (f"; {result.exported} held by the export, left out" if result.exported else "")
    )
    if result.complete:
        runs = result.out / "runs"
        held = sum(1 for _ in runs.iterdir()) if runs.is_dir() else 0
        only = f" --spec {spec}" if spec is not None and held > result.runs else ""
        echo(f"records: {records_path(result.out)}; next: rdfast analyze {result.out}{only}")
    return 1 if result.failed else 0


def print_plan(plan: dict, echo) -> int:
    """The jobs of a grid, per sub-grid point family, and their training epochs."""
    echo(plan["table"].to_string(index=False))
    echo(
        f"\ngrid {plan['name']}: {plan['points']} points, {plan['dense']} dense models, "
        f"{plan['runs']} runs ({plan['complete']} complete in {plan['out']}), "
        f"{plan['epochs']:,} training epochs in all"
    )
    return 0


def print_grid_status(status: dict, echo, show_all: bool = False) -> int:
    """Counts per status, then the runs not complete (all with --all); exit 1 on failures."""
    table = status["table"]
    shown = table if show_all else table[table["status"] != "complete"]
    if not shown.empty:
        echo(shown.to_string(index=False))
    counts = table["status"].value_counts()
    driver = f"; driver: {status['driver']}" if status["driver"] else "; no driver running"
    echo(
        f"\ngrid {status['name']}: {len(table)} runs, "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + driver
    )
    return 1 if "failed" in counts or "damaged" in counts else 0
