"""The records, statistics and report of the README's default run (`rdfast run`: digits, five
seeds, four strategies, six ratios), bit for bit as they were recorded when this test was
written (tests/data/): a refactor of the engine, the settings or the CLI must not move a
single number or run id.

Threads are pinned to 1 (the thread count is part of a CPU model's key and of its numbers).
If a change is meant to move them (a new protocol), regenerate with
`python -m tests.test_records_unchanged` and say why in the commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from rdfast import analysis
from rdfast.cli.main import cli

DATA = Path(__file__).parent / "data"
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
    groups = analysis.analyze(analysis.load(out)).groups[GROUP_COLUMNS]
    return records, groups.reset_index(drop=True)


@pytest.mark.slow
def test_records_and_statistics_are_unchanged(tmp_path):
    records, groups = grid(tmp_path)
    pd.testing.assert_frame_equal(
        records, pd.read_csv(DATA / "expected_records.csv"), check_exact=True
    )
    expected = pd.read_csv(DATA / "expected_groups.csv")
    expected["mark"] = expected["mark"].fillna("").astype(object)
    groups = groups.assign(mark=groups["mark"].astype(object))
    pd.testing.assert_frame_equal(groups, expected, check_exact=True, check_dtype=False)
    assert report_md(tmp_path, tmp_path / "report") == (DATA / "expected_report.md").read_text()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        records, groups = grid(Path(tmp))
        (DATA / "expected_report.md").write_text(report_md(Path(tmp), Path(tmp) / "report"))
    DATA.mkdir(exist_ok=True)
    records.to_csv(DATA / "expected_records.csv", index=False)
    groups.to_csv(DATA / "expected_groups.csv", index=False)
    print(f"wrote {len(records)} records and {len(groups)} group rows", file=sys.stderr)
