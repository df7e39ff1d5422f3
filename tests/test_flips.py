"""Prediction flips and PIE: hand-computed cases, scipy's mode as the reference of the modal
prediction, and the predictions a run records counted against its confusion matrices."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from click.testing import CliRunner

from rdfast.cli.main import cli
from rdfast.runs import store
from rdfast.stats.flips import analyze_flips, flip_rates, modal
from tests.conftest import run_args


def test_modal_prediction_by_hand_and_against_scipy():
    p = np.array([[0, 1, 2], [0, 2, 2], [1, 1, 0]])
    assert modal(p, 3).tolist() == [0, 1, 2]
    assert modal(np.array([[0, 1], [1, 0]]), 2).tolist() == [0, 0]  # ties: the smallest class
    rng = np.random.default_rng(0)
    big = rng.integers(0, 7, size=(9, 1000))
    ref = scipy.stats.mode(big, axis=0, keepdims=False).mode  # ties to the smallest, too
    assert np.array_equal(modal(big, 7), ref)


def test_flip_rate_by_hand():
    rate, n, f = flip_rates(np.array([0, 1, 1, 2]), np.array([0, 2, 1, 0]),
                            np.array([0, 1, 1, 2]), 3)  # fmt: skip
    assert rate == 0.5 and n.tolist() == [1, 2, 1] and f.tolist() == [0, 1, 1]


# Three seeds of one group, 6 test examples of 3 classes, dense (step 0) and t = 2 (step 1).
LABELS = [0, 0, 1, 1, 2, 2]
RUNS = {
    "a": ([0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 2, 2]),
    "b": ([0, 0, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0]),
    "c": ([0, 0, 1, 1, 2, 1], [1, 1, 1, 0, 2, 0]),
}


def _hand_built(tmp_path):
    rows = []
    for seed, (run_id, (dense, pruned)) in enumerate(RUNS.items()):
        folder = store.run_dir(tmp_path, run_id)
        folder.mkdir(parents=True)
        np.save(store.labels_path(folder), np.array(LABELS, dtype=np.int16))
        for step, pred in ((0, dense), (1, pruned)):
            np.save(store.step_path(folder, step, "pred.npy"), np.array(pred, dtype=np.int16))
            rows += [{"run_id": run_id, "step": step, "t_target": [1.0, 2.0][step], "class": c,
                      "strategy": "mp", "seed": seed} for c in range(3)]  # fmt: skip
    return pd.DataFrame(rows)


def test_flip_rates_pie_set_and_most_flipped_by_hand(tmp_path):
    f = analyze_flips(tmp_path, _hand_built(tmp_path), by=("strategy",), top=2)
    at2 = f.runs[f.runs["step"] == 1].set_index("run_id")["flip_rate"]
    assert at2.to_dict() == {"a": 2 / 6, "b": 3 / 6, "c": 4 / 6}
    # Modal dense 0 0 1 1 2 2, modal pruned 0 1 1 0 2 0: examples 1, 3 and 5 are PIE.
    g = f.groups.set_index("t")
    assert g.loc[2.0, "pie"] == 3 and g.loc[2.0, "pie_share"] == 0.5
    assert g.loc[2.0, "mean_flip_rate"] == pytest.approx(0.5)
    assert g.loc[1.0, "pie"] == 0
    pc = f.pie_classes[f.pie_classes["t"] == 2.0].set_index("class")
    assert pc["pie"].tolist() == [1, 1, 1] and pc["pie_share"].tolist() == [0.5, 0.5, 0.5]
    fc = f.classes[(f.classes["run_id"] == "c") & (f.classes["step"] == 1)].set_index("class")
    assert fc["flipped"].tolist() == [2, 1, 1] and fc["n"].tolist() == [2, 2, 2]
    most = f.most_flipped.groupby("class")["example"].apply(list).to_dict()
    # class 0: example 1 flipped in all three runs, example 0 in one; class 1: 3 (a, b, c);
    # class 2: 5 (b and c), 4 never
    assert most == {0: [1, 0], 1: [3], 2: [5]}


def test_a_run_records_predictions_that_count_up_to_its_matrices(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, run_args(out, seeds="0", extra=["--strategy", "mp,up"]))
    assert res.exit_code == 0, res.output
    dense_preds = []
    for m in store.manifests(out):
        folder = m.parent
        y = np.load(store.labels_path(folder)).astype(np.int64)
        for step in range(3):
            pred = np.load(store.step_path(folder, step, "pred.npy")).astype(np.int64)
            cm = np.load(store.step_path(folder, step, "npy"))
            c = cm.shape[0]
            assert np.array_equal(np.bincount(y * c + pred, minlength=c * c).reshape(c, c), cm)
        dense_preds.append(np.load(store.step_path(folder, 0, "pred.npy")))
    assert np.array_equal(*dense_preds)  # mp and up prune the same dense model
    text = CliRunner().invoke(cli, ["analyze", str(out)]).output
    assert "flip rate: % of test predictions" in text and "PIE share" in text
    assert (out / "pie_groups.csv").exists()
    data = json.loads(CliRunner().invoke(cli, ["analyze", str(out), "--format", "json"]).stdout)
    assert {g["strategy"] for g in data["flips"]} == {"mp", "up"}
    assert all(0 <= g["pie_share"] <= 1 for g in data["flips"])


def test_a_damaged_prediction_file_sends_the_run_back_and_it_comes_out_the_same(tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, run_args(out)).exit_code == 0
    before = pd.read_parquet(out / "records.parquet").drop(columns="seconds")
    folder = store.manifests(out)[0].parent
    pred = store.step_path(folder, 1, "pred.npy")
    good = np.load(pred)
    np.save(pred, (good + 1) % 10)  # predictions that disagree with the matrix
    res = CliRunner().invoke(cli, run_args(out))
    assert res.exit_code == 0, res.output
    assert "disagrees with its confusion matrix" in res.output
    assert np.array_equal(np.load(pred), good)
    after = pd.read_parquet(out / "records.parquet").drop(columns="seconds")
    pd.testing.assert_frame_equal(before, after, check_exact=True)
