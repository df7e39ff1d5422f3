"""The records, statistics and report of the README's default run (`rdfast run`: digits, five
seeds, four strategies, six ratios), bit for bit as they were recorded when this test was
written (tests/data/records/): a refactor of the engine, the settings or the CLI must not move
a single number or run id.

Threads are pinned to 1 (the thread count is part of a CPU model's key and of its numbers).
The last bits of CPU arithmetic also differ between processors (an AMD EPYC and an AVX-512
Intel Xeon train dense models whose losses differ in the 8th digit, enough to flip a few of
GP's masks), so one set is stored per kind of machine, each recorded by the same code: the
records must equal one set exactly, and the statistics and report that set's. On a new kind
of CPU, record its set from a commit whose records are known to be right (the run ids and
dense ids must match the stored ones) with `python -m tests.test_records_unchanged NAME`.
If a change is meant to move the numbers (a new protocol), regenerate every set and say why
in the commit. The report is compared where its set holds one (`expected_report.md`): a
change of the report's text or tables can be recorded only on the kind of machine a set is
from, so the sets of other machines drop their report until they are recorded again; their
records and statistics are still compared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from rdfast import stats
from rdfast.cli.main import cli

DATA = Path(__file__).parent / "data" / "records"
IDENTITY = ["run_id", "dense_id", "strategy", "saliency", "step", "t_target", "class"]
IDENTITY += ["support", "remaining", "total"]
RECORD_COLUMNS = ["run_id", "dense_id", "strategy", "saliency", "step", "t_target", "class"]
RECORD_COLUMNS += ["support", "correct", "remaining", "total", "accuracy", "loss"]
GROUP_COLUMNS = ["strategy", "saliency", "t", "n", "mean_alpha", "ci_low", "ci_high", "mark"]
GROUP_COLUMNS += ["mean_accuracy"]


def report_md(out: Path, folder: Path) -> str:
    """The grid's report.md, its records path written as RUNS (it is a temporary folder)."""
    res = CliRunner().invoke(cli, ["report", str(out), "-o", str(folder)])
    assert res.exit_code == 0, res.output
    return (folder / "report.md").read_text().replace(str(out), "RUNS")


def grid(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(cli, ["run", "--no-progress", "--out", str(out)])
        assert res.exit_code == 0, res.output
    finally:
        torch.set_num_threads(threads)
    records = pd.read_parquet(out / "records.parquet")[RECORD_COLUMNS]
    records = records.sort_values(["run_id", "step", "class"]).reset_index(drop=True)
    # The stored marks are each interval's alone (--adjust none); the default marks, which
    # also need a multiplicity-adjusted p-value, can only be fewer (checked below).
    groups = stats.analyze(stats.load(out), adjust="none").groups[GROUP_COLUMNS]
    return records, groups.reset_index(drop=True)


def exactly_equal(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    except AssertionError:
        return False
    return True


def stored_sets() -> dict[str, Path]:
    return {p.name: p for p in sorted(DATA.iterdir()) if (p / "expected_records.csv").exists()}


@pytest.mark.slow
def test_records_and_statistics_are_unchanged(tmp_path):
    records, groups = grid(tmp_path)
    sets = stored_sets()
    assert sets, DATA
    expected = {name: pd.read_csv(p / "expected_records.csv") for name, p in sets.items()}
    for exp in expected.values():
        # What no processor changes: the runs, their keys, the classes and weight counts.
        pd.testing.assert_frame_equal(records[IDENTITY], exp[IDENTITY], check_exact=True)
    same = [name for name, exp in expected.items() if exactly_equal(records, exp)]
    if not same:
        deviation = {
            name: float((records["loss"] - exp["loss"]).abs().max())
            for name, exp in expected.items()
        }
        pytest.fail(
            f"the records equal none of the stored sets ({', '.join(sets)}; largest loss "
            f"differences {deviation}): a change moved the numbers, or this is a new kind of "
            "CPU (see the module docstring)"
        )
    folder = sets[same[0]]
    expected_groups = pd.read_csv(folder / "expected_groups.csv")
    expected_groups["mark"] = expected_groups["mark"].fillna("").astype(object)
    groups = groups.assign(mark=groups["mark"].astype(object))
    pd.testing.assert_frame_equal(groups, expected_groups, check_exact=True, check_dtype=False)
    adjusted = stats.analyze(stats.load(tmp_path)).groups
    demoted = adjusted["mark"] != groups["mark"]
    assert (adjusted.loc[demoted, "mark"] == "?").all()
    assert (groups.loc[demoted, "mark"].isin(["<", ">"])).all()
    report = folder / "expected_report.md"
    if report.exists():
        assert report_md(tmp_path, tmp_path / "report") == report.read_text()


if __name__ == "__main__":
    import platform
    import tempfile

    name = sys.argv[1]
    folder = DATA / name
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        records, groups = grid(Path(tmp))
        (folder / "expected_report.md").write_text(report_md(Path(tmp), Path(tmp) / "report"))
    records.to_csv(folder / "expected_records.csv", index=False)
    groups.to_csv(folder / "expected_groups.csv", index=False)
    (folder / "machine.txt").write_text(
        f"cpu: {platform.processor() or platform.machine()}, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}\ntorch: {torch.__version__}\n"
    )
    print(f"wrote {len(records)} records and {len(groups)} group rows to {folder}", file=sys.stderr)
