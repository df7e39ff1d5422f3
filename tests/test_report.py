"""`rdfast analyze` and `rdfast report` on a small real run."""

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from rdfast import stats
from rdfast.cli.main import cli
from rdfast.runs import store
from tests.conftest import run_args


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = run_args(out, seeds="0-2", ratios="2,8,32", epochs="4")
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "E[alpha_t] over seeds" in res.output  # run ends with the alpha table
    return out


def test_analyze_real_run(digits_runs, tmp_path):
    res = CliRunner().invoke(cli, ["analyze", str(digits_runs), "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "t=2" in lines[1] and "t=32" in lines[1]
    assert lines[2].startswith("mp ") and lines[4].startswith("up taylor")
    runs = pd.read_parquet(tmp_path / "alpha_runs.parquet")
    groups = pd.read_csv(tmp_path / "alpha_groups.csv")
    assert {
        "dataset",
        "model",
        "width",
        "seed",
        "strategy",
        "saliency",
        "t",
        "accuracy",
        "alpha",
        "alpha_se",
        "n_classes_used",
    } <= set(runs.columns)
    assert {
        "n",
        "mean_alpha",
        "ci_low",
        "ci_high",
        "p_value",
        "mark",
        "mean_accuracy",
        "acc_ci_low",
        "acc_ci_high",
        "pooled_alpha",
    } <= set(groups.columns)
    assert len(runs) == 4 * 3 * 4  # strategies x seeds x (dense + 3 ratios)
    assert (groups["n"] == 3).all()
    # alpha of every (run, t) recomputed independently from the raw records with numpy.
    rec = store.load_records(digits_runs)
    rec = rec[rec["support"] > 0]
    rec["Bn"] = (rec["recall"] - rec["accuracy"]) / rec["accuracy"]
    base = rec[rec["step"] == 0].set_index(["run_id", "class"])["Bn"]
    for (rid, t), sub in rec.groupby(["run_id", "t_target"]):
        x = base.loc[rid].reindex(sub["class"]).to_numpy()
        y = sub["Bn"].to_numpy()
        expect = np.linalg.lstsq(x[:, None], y, rcond=None)[0][0]
        got = runs.loc[(runs["run_id"] == rid) & (runs["t"] == t), "alpha"].item()
        assert got == pytest.approx(expect, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("fmt", ["markdown", "csv", "json"])
def test_analyze_formats(digits_runs, tmp_path, fmt):
    res = CliRunner().invoke(
        cli, ["analyze", str(digits_runs), "--format", fmt, "-o", str(tmp_path)]
    )
    assert res.exit_code == 0
    if fmt == "json":
        out = json.loads(res.stdout)
        assert len(out["groups"]) == 4 * 4
        assert len(out["paying_classes"]) == 4 * 3
        assert len(out["paired"]) == 3 * 4  # gp, up, rp against mp at four t
        assert {r["t"] for r in out["paying_classes"]} == {"32"}
    elif fmt == "csv":
        assert res.stdout.splitlines()[0].startswith("strategy,saliency,dataset")
    else:
        assert "| group | t=2 | t=8 | t=32 |" in res.stdout
        assert "classes of each group that lose the most recall" in res.stdout
    written = {p.name for p in tmp_path.iterdir()}
    assert {"class_groups.parquet", "class_groups.csv"} <= written
    cg = pd.read_parquet(tmp_path / "class_groups.parquet")
    assert len(cg) == 4 * 4 * 10  # groups x t x classes


def test_analyze_classes_option(digits_runs, tmp_path):
    res = CliRunner().invoke(
        cli, ["analyze", str(digits_runs), "--classes", "0", "-o", str(tmp_path)]
    )
    assert res.exit_code == 0 and "lose the most recall" not in res.stdout
    res = CliRunner().invoke(
        cli, ["analyze", str(digits_runs), "--classes", "1", "-o", str(tmp_path)]
    )
    section = res.stdout.split("lose the most recall")[1].split("\n\n")[0]
    assert sum(line.startswith(("mp ", "gp ", "up ", "rp ")) for line in section.splitlines()) == 4
    res = CliRunner().invoke(cli, ["analyze", str(digits_runs), "--classes", "-1"])
    assert res.exit_code == 2


def test_analyze_vs_option(digits_runs, tmp_path):
    res = CliRunner().invoke(cli, ["analyze", str(digits_runs), "--vs", "rp", "-o", str(tmp_path)])
    assert res.exit_code == 0 and "E[alpha_t(s) - alpha_t(rp)]" in res.stdout
    assert set(pd.read_parquet(tmp_path / "alpha_paired.parquet")["strategy"]) == {"mp", "gp", "up"}
    res = CliRunner().invoke(cli, ["analyze", str(digits_runs), "--vs", "none"])
    assert res.exit_code == 0 and "alpha_t(s) - alpha_t" not in res.stdout
    one_line_exit_2(["analyze", str(digits_runs), "--vs", "xp"], "--vs xp: no xp runs")


def test_report_files_and_figures(digits_runs, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["report", str(digits_runs), "-o", str(out)])
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    # One dataset, width and model: no split boxplots.
    assert pngs == [
        "against_t.png",
        "alpha_by_strategy.png",
        "class_change.png",
        "flips.png",
        "recall_heatmap.png",
        "scatter.png",
        "vs_mp.png",
    ]
    for p in out.glob("*.png"):
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and "<table" in html
    assert_self_contained(html)
    md = (out / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in md
    # gp, up and rp against mp, seed by seed, at every t.
    section = md.split("## Strategies against mp, seed by seed")[1].split("##")[0]
    # alpha, accuracy and Psi: three tables of gp, up and rp.
    assert sum(line.startswith(("| gp", "| up", "| rp")) for line in section.splitlines()) == 9
    section = md.split("## E[Psi_t]: disparity")[1].split("##")[0]
    assert sum(line.startswith(("| mp", "| gp", "| up", "| rp")) for line in
               section.splitlines()) == 4  # fmt: skip
    # The most-flipped examples: a row per (strategy, class) with flips, each index a test
    # example of that class.
    from rdfast.data import load_dataset

    labels = load_dataset("digits").y_test.numpy()
    section = md.split("## Most-flipped test examples")[1].split("##")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| mp")]
    assert 1 <= len(rows) <= 10
    for row in rows:
        c, examples = int(row[2]), row[3].rstrip(" |").split(", ")
        assert all(labels[int(e.split(" ")[0])] == c for e in examples)
    # Three classes per strategy by default, each at the largest t (32).
    section = md.split("## Which classes pay")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "| 32 |" in line]
    assert len(rows) == 4 * 3
    assert "Settings of the runs" in md and "| run_id |" in md


def test_report_split_by_width(tmp_path):
    extra = tmp_path / "runs"
    for width in ("0.5", "1"):
        args = run_args(
            extra,
            seeds="0,1",
            ratios="2,8",
            epochs="2",
            extra=["--strategy", "mp", "--width", width],
        )
        assert CliRunner().invoke(cli, args).exit_code == 0
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["report", str(extra), "-o", str(out), "--scatter-t", "8",
                                   "--across", "width=1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (out / "alpha_by_width.png").exists()
    # The widths compared as such: a section of their own, the narrower model's row.
    page = (out / "report.md").read_text()
    section = page.split("## Across width, against width 1")[1].split("\n## ")[0]
    assert "mp digits mlp width 0.5 |" in section and "width 1 |" not in section


def test_single_seed_shows_n1(tmp_path):
    res = CliRunner().invoke(
        cli, run_args(tmp_path, ratios="2", epochs="2", extra=["--strategy", "mp"])
    )
    assert res.exit_code == 0
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path)])
    assert "(n=1)" in res.stdout


def one_line_exit_2(args, message):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr


def test_analyze_edge_cases(digits_runs, tmp_path):
    one_line_exit_2(["analyze", str(tmp_path)], "no records under")
    one_line_exit_2(["analyze", str(tmp_path / "nope")], "is not a directory")
    one_line_exit_2(["analyze", str(digits_runs), "--by", "colour"], "cannot group by colour")
    one_line_exit_2(
        ["report", str(digits_runs), "-o", str(tmp_path / "r"), "--run", "xyz"],
        "--run xyz is not among",
    )
    one_line_exit_2(
        ["report", str(digits_runs), "-o", str(tmp_path / "r"), "--scatter-t", "5"],
        "--scatter-t [5.0] not among",
    )
    assert not (tmp_path / "r").exists()
    # Records written by another version of the format.
    old = tmp_path / "old"
    for f in digits_runs.glob("runs/*/step-*.parquet"):
        df = pd.read_parquet(f)
        df["records_version"] = 0
        (old / f.parent.relative_to(digits_runs)).mkdir(parents=True, exist_ok=True)
        df.to_parquet(old / f.relative_to(digits_runs))
    one_line_exit_2(["analyze", str(old)], "records of version [0]")


def test_consolidated_file_used_only_when_current(digits_runs):
    a = store.load_records(digits_runs, prefer_consolidated=True)
    b = store.load_records(digits_runs)
    pd.testing.assert_frame_equal(a, b)
    assert stats.analyze(a).groups.shape[0] == 16


def snapshot(folder):
    """Every file under `folder` with its bytes: what a refused command must leave as it was."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_report_and_analyze_never_write_into_foreign_folders(digits_runs, tmp_path):
    runner = CliRunner()
    records = snapshot(digits_runs)
    mydocs = tmp_path / "mydocs"
    mydocs.mkdir()
    (mydocs / "thesis.tex").write_text("\\documentclass{article}")
    afile = tmp_path / "somefile"
    afile.write_text("keep me")
    cases = [
        (["report", str(digits_runs), "-o", str(digits_runs)], "records"),
        (["report", str(digits_runs), "-o", str(digits_runs.parent)], "records"),
        (["report", str(digits_runs), "-o", str(mydocs)], "not written by rdfast"),
        (["report", str(digits_runs), "-o", str(afile)], "is a file"),
        (["analyze", str(digits_runs), "-o", str(mydocs)], "not written by rdfast"),
        (["analyze", str(digits_runs), "-o", str(afile)], "is a file"),
    ]
    for args, message in cases:
        res = runner.invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert snapshot(digits_runs) == records
    assert snapshot(mydocs) == {"thesis.tex": b"\\documentclass{article}"}
    assert afile.read_text() == "keep me" and not list(tmp_path.glob(".somefile*"))

    # Its own folders it may replace (report) or add to (analyze); not each other's.
    rep, tab = tmp_path / "rep", tmp_path / "tab"
    for _ in range(2):
        assert runner.invoke(cli, ["report", str(digits_runs), "-o", str(rep)]).exit_code == 0
        assert runner.invoke(cli, ["analyze", str(digits_runs), "-o", str(tab)]).exit_code == 0
    assert (rep / "index.html").exists() and (tab / "alpha_groups.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    res = runner.invoke(cli, ["report", str(digits_runs), "-o", str(tab)])
    assert res.exit_code == 2 and "an rdfast analyze folder" in res.stderr
    assert snapshot(digits_runs) == records


def test_report_opens_with_the_answer(digits_runs, tmp_path):
    """The summary first: at the largest t the strategies with the least and most E[Psi_t]
    (found here from the groups table), the classes that pay under each (the class table),
    and the marks that survive the multiplicity control (counted here from the tables)."""
    from rdfast import stats

    res = CliRunner().invoke(cli, ["report", str(digits_runs), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.index("## Summary") < md.index("## E[alpha_t]")
    a = stats.analyze(stats.load(digits_runs))
    last = a.groups[a.groups["t"] == a.groups["t"].max()]
    least, most = (
        last.loc[last["mean_disparity"].idxmin()],
        last.loc[last["mean_disparity"].idxmax()],
    )
    cg = a.class_groups[
        (a.class_groups["t"] == least["t"]) & (a.class_groups["strategy"] == least["strategy"])
    ]
    worst = cg.sort_values("mean_recall_change").iloc[0]
    summary = md.split("## Summary")[1].split("##")[0]
    assert f"least {least['strategy']}" in summary and f"most {most['strategy']}" in summary
    assert f"E[Psi] {least['mean_disparity']:.3f}" in summary
    assert f"{worst['class_name']} ({worst['mean_recall_change']:+.3f})" in summary
    g = a.groups[(a.groups["t"] > 1) & (a.groups["mark"] != "")]
    marked = int(g["mark"].isin(["<", ">"]).sum())
    assert f"Marked at 99 % (Holm-adjusted): {marked} of {len(g)} E[alpha_t] cells" in summary


def assert_self_contained(html: str) -> None:
    """No reference outside the page: every src/href is a data URI or an anchor, no linked
    stylesheet or script; every embedded figure decodes as a PNG image."""
    import base64
    import io
    import re

    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert "<link" not in html and "<script" not in html and "url(" not in html
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(pngs) == len(re.findall(r"""src\s*=\s*["']data:""", html))
    for data in pngs:
        raw = base64.b64decode(data, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(io.BytesIO(raw), format="png")
        assert img.ndim == 3 and min(img.shape[:2]) > 50


def test_report_shows_the_forgotten_test_images(tmp_path, shared_data):
    """An image dataset: the most-flipped test images as pictures, one grid per strategy,
    embedded in the page; the indices table stays (folded). Without the dataset's files the
    report says so and lists the indices."""
    runs = tmp_path / "runs"
    args = ["run", "--dataset", "mnist:train=500,test=300", "--data-root", str(shared_data),
            "--seeds", "0,1", "--strategy", "mp,rp", "--ratios", "4,64", "--epochs", "2",
            "--finetune-epochs", "1", "--out", str(runs), "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["report", str(runs), "-o", str(out), "--data-root",
                                   str(shared_data)])  # fmt: skip
    assert res.exit_code == 0, res.output
    grids = sorted(p.name for p in out.glob("flipped_*.png"))
    assert grids == ["flipped_1.png", "flipped_2.png"]
    html = (out / "index.html").read_text()
    assert_self_contained(html)
    forgets = html.split("<h2>What pruning forgets</h2>")[1].split("<section")[0]
    assert forgets.count("data:image/png;base64,") == 2
    assert "<summary>Most-flipped test examples</summary>" in html  # the indices, folded
    md = (out / "report.md").read_text()
    assert "](flipped_1.png)" in md and "## Most-flipped test examples" in md

    bare = tmp_path / "bare"
    res = CliRunner().invoke(cli, ["report", str(runs), "-o", str(bare), "--data-root",
                                   str(tmp_path / "nowhere")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert not list(bare.glob("flipped_*.png"))
    md = (bare / "report.md").read_text()
    assert "most-flipped images not drawn" in md and "## Most-flipped test examples" in md


def test_alpha_figure_when_every_model_is_below_its_floor(tmp_path):
    """Models at or below their accuracy floor have no alpha to draw: the figure says so
    instead of failing (three classes, accuracy 0.5 against a floor of 2 x chance = 0.67)."""
    from rdfast.report.page import alpha_boxplot

    runs = pd.DataFrame({"run_id": ["a", "b"], "t": [4.0, 4.0], "strategy": ["mp", "rp"],
                         "alpha": [1.3, 0.4], "accuracy": [0.5, 0.4], "n_classes_used": [3, 3],
                         "dense_accuracy": [0.6, 0.6]})  # fmt: skip
    alpha_boxplot(runs, tmp_path / "alpha.png", floor=2.0)
    img = mpimg.imread(tmp_path / "alpha.png")
    assert img.ndim == 3 and img.shape[1] > 200


def test_alpha_figure_keeps_score_forms_and_mitigations_apart(tmp_path, monkeypatch):
    """gp in two score forms, and mp under two retrainings: a box each, named as the tables
    name the groups, never pooled under the strategy alone."""
    from rdfast.report import page

    saved = {}
    monkeypatch.setattr(page, "_save", lambda fig, path, dpi: saved.setdefault("fig", fig))
    kinds = [("gp", "taylor", "plain"), ("gp", "taylor-max", "plain"), ("mp", "none", "plain"),
             ("mp", "none", "kd")]  # fmt: skip
    rows = [(s, f, m, 1.0 + 0.1 * i + 0.01 * seed) for i, (s, f, m) in enumerate(kinds)
            for seed in range(5)]  # fmt: skip
    runs = pd.DataFrame(rows, columns=["strategy", "saliency", "mitigation", "alpha"])
    runs = runs.assign(t=4.0, accuracy=0.9, run_id=[str(i) for i in range(len(runs))])
    page.alpha_boxplot(runs, tmp_path / "a.png", by=("strategy", "saliency", "mitigation"))
    ax = saved["fig"].axes[0]
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names[:4] == ["mp kd", "mp plain", "gp taylor plain", "gp taylor-max plain"]
    # One set of points a variant, each holding its own five models.
    means = sorted(round(float(c.get_offsets()[:, 1].mean()), 3) for c in ax.collections)
    assert means == [1.02, 1.12, 1.22, 1.32]


def test_group_legend_moves_out_of_the_panels_when_its_labels_are_long():
    import matplotlib.pyplot as plt

    from rdfast.report.page import _group_legend

    def legend_of(labels):
        fig, axes = plt.subplots(1, 2)
        for i, label in enumerate(labels):
            axes[0].plot([1, 2], [i, i], label=label)
        _group_legend(axes)
        where = ("panel" if axes[0].get_legend() else "figure" if fig.legends
                 else "beside" if axes[-1].get_legend() else None)  # fmt: skip
        plt.close(fig)
        return where

    assert legend_of(["mp plain", "up kd"]) == "panel"
    long = "up taylor cifar10:train=10000 resnet20 width 0.5 ceag ceag_tolerance=0.01"
    assert legend_of([long, long + " "]) == "figure"
    assert legend_of([f"group {i}" for i in range(12)]) == "beside"
