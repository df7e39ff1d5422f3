"""`rdfast tables`: the compact tables `analyze` writes print again without the records, and
every table a study's write-up under studies/ shows is what `rdfast tables` prints there."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from rdfast.cli.main import cli
from rdfast.runs.engine import Engine
from tests.test_engine import experiment

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def table_blocks(text: str) -> list[str]:
    """The Markdown tables of a text: runs of consecutive lines that start with '|'."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def test_tables_print_what_analyze_printed(tmp_path):
    Engine(experiment(tmp_path / "runs", strategies=("mp", "up", "rp"), seeds=(0, 1, 2)),
           progress=False).execute()  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(cli, ["analyze", str(tmp_path / "runs"), "--format", "markdown",
                                "-o", str(tmp_path / "tables")])  # fmt: skip
    assert first.exit_code == 0, first.output
    # Only the CSV files and the settings travel (as a study's folder keeps them).
    for p in (tmp_path / "tables").glob("*.parquet"):
        p.unlink()
    again = runner.invoke(cli, ["tables", str(tmp_path / "tables")])
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout
    assert "| mp " in again.stdout and "E[Psi_t]" in again.stdout


def test_tables_refuse_a_folder_without_them(tmp_path):
    res = CliRunner().invoke(cli, ["tables", str(tmp_path)])
    assert res.exit_code == 2 and "holds no tables written by rdfast analyze" in res.output
    assert "Traceback" not in res.output


def study_folders() -> list[Path]:
    """The studies: folders of studies/ with a write-up (README.md)."""
    return sorted(p for p in STUDIES.iterdir() if (p / "README.md").is_file())


@pytest.mark.parametrize("study", [p.name for p in study_folders()])
def test_every_table_of_a_study_write_up_is_what_rdfast_tables_prints(study):
    """A study keeps analyze's tables in its folder, or in subfolders (one per comparison,
    e.g. against mp and against plain retraining); each table of its README is printed by
    `rdfast tables` from one of them."""
    folder = STUDIES / study
    printed = set()
    for tables in sorted(p.parent for p in folder.rglob("analysis.json")):
        res = CliRunner().invoke(cli, ["tables", str(tables)])
        assert res.exit_code == 0, res.output
        printed |= set(table_blocks(res.stdout))
    assert printed, f"studies/{study} keeps no tables written by rdfast analyze"
    shown = table_blocks((folder / "README.md").read_text())
    assert shown, f"studies/{study}/README.md shows no table"
    for block in shown:
        assert block in printed, f"studies/{study}/README.md table not printed:\n{block}"


def test_every_study_keeps_its_tables_and_settings():
    studies = study_folders()
    assert studies
    for folder in studies:
        kept = [p.parent for p in folder.rglob("analysis.json")]
        assert kept, f"studies/{folder.name} keeps no analysis.json"
        for tables in kept:
            for name in ("alpha_groups.csv", "class_groups.csv"):
                assert (tables / name).is_file(), f"{tables} lacks {name}"


def test_analyze_across_a_setting_from_the_command_line(tmp_path):
    Engine(experiment(tmp_path / "runs", strategies=("mp",), seeds=(0, 1)),
           progress=False).execute()  # fmt: skip
    runner = CliRunner()
    bad = runner.invoke(cli, ["analyze", str(tmp_path / "runs"), "--across", "width=2"])
    assert bad.exit_code == 2 and "no such width" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "runs" / "alpha_groups.csv").exists()  # nothing written
    # Every group is the reference's own: nothing to compare, and a note says so.
    res = runner.invoke(cli, ["analyze", str(tmp_path / "runs"), "--across", "width=0.25"])
    assert res.exit_code == 0, res.output
    assert "no comparison across width" in res.output


def kept_with_records() -> list[Path]:
    """Tables folders under studies/ that keep the records they came from (`records/`, an
    `rdfast export`)."""
    return sorted(p.parent.parent for p in STUDIES.rglob("records/records.parquet"))


@pytest.mark.parametrize("tables", [p.relative_to(STUDIES).as_posix() for p in kept_with_records()])
def test_kept_records_give_the_kept_tables(tables, tmp_path):
    """`rdfast analyze` of a study's kept records, with the settings its analysis.json and
    tables name, writes the tables kept beside them (flips and PIE aside: an export has no
    predictions)."""
    import json

    import pandas as pd

    folder = STUDIES / tables
    s = json.loads((folder / "analysis.json").read_text())
    args = ["analyze", str(folder / "records"), "-o", str(tmp_path / "again"), "--format", "csv",
            "--by", ",".join(s["by"]), "--ci", str(s["ci"]), "--ci-method", s["ci_method"],
            "--floor", str(s["floor"]), "--adjust", s["adjust"]]  # fmt: skip
    paired, across = folder / "alpha_paired.csv", folder / "alpha_across.csv"
    if paired.is_file():
        args += ["--vs", str(pd.read_csv(paired)["baseline"].iloc[0])]
    if across.is_file():
        a = pd.read_csv(across).iloc[0]
        args += ["--across", f"{a['across']}={a['reference']}"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    names = ["alpha_groups", "class_groups", "alpha_paired", "alpha_across"]
    compared = 0
    for name in names:
        kept, again = folder / f"{name}.csv", tmp_path / "again" / f"{name}.csv"
        assert kept.is_file() == again.is_file(), name
        if kept.is_file():
            pd.testing.assert_frame_equal(pd.read_csv(kept), pd.read_csv(again), rtol=1e-12)
            compared += 1
    assert compared >= 2
