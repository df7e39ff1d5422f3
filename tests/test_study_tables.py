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
    for seeds in ((0, 1, 2),):
        Engine(experiment(tmp_path / "runs", strategies=("mp", "up", "rp"), seeds=seeds),
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


@pytest.mark.parametrize("study", sorted(p.parent.name for p in STUDIES.glob("*/analysis.json")))
def test_every_table_of_a_study_write_up_is_what_rdfast_tables_prints(study):
    folder = STUDIES / study
    res = CliRunner().invoke(cli, ["tables", str(folder)])
    assert res.exit_code == 0, res.output
    printed = set(table_blocks(res.stdout))
    shown = table_blocks((folder / "README.md").read_text())
    assert shown, f"studies/{study}/README.md shows no table"
    for block in shown:
        assert block in printed, f"studies/{study}/README.md table not printed:\n{block}"


def test_every_study_keeps_its_tables_and_settings():
    studies = [p for p in STUDIES.iterdir() if p.is_dir()]
    assert studies
    for folder in studies:
        for name in ("README.md", "analysis.json", "alpha_groups.csv", "class_groups.csv"):
            assert (folder / name).is_file(), f"studies/{folder.name} lacks {name}"
