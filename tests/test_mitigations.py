"""Retraining mitigations: the losses against numpy/scipy references and hand-computed cases,
the multiplier update, the validation split, and runs that record, resume and pair."""

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy import special, stats

import rdfast.training as training_mod
from rdfast import mitigations
from rdfast.cli.main import cli
from rdfast.runs import store
from rdfast.runs.engine import Engine
from rdfast.stats import analyze, load
from tests.test_engine import VOLATILE, Interrupt, experiment

RECORD = ["step", "class", "support", "correct", "recall", "accuracy", "loss", "remaining"]


def test_distillation_loss_matches_scipy():
    rng = np.random.default_rng(0)
    z, zt = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5)) * 3
    y = rng.integers(0, 5, size=7)
    w, t = 0.7, 3.0
    ce = -special.log_softmax(z, axis=1)[np.arange(7), y].mean()
    # scipy.stats.entropy(p, q) = KL(p || q), per row.
    kl = stats.entropy(special.softmax(zt / t, axis=1), special.softmax(z / t, axis=1), axis=1)
    expected = (1 - w) * ce + w * t * t * kl.mean()
    got = mitigations.distillation_loss(torch.tensor(z), torch.tensor(zt), torch.tensor(y), w, t)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # Weight 0 is cross-entropy alone; a student equal to its teacher adds nothing.
    zz, yy = torch.tensor(z), torch.tensor(y)
    ce0 = torch.nn.functional.cross_entropy(zz, yy)
    assert float(mitigations.distillation_loss(zz, zz.clone(), yy, 0.0, t)) == float(ce0)
    same = mitigations.distillation_loss(zz, zz.clone(), yy, 1.0, t)
    assert float(same) == pytest.approx(0.0, abs=1e-12)


def test_surrogate_loss_hand_computed():
    # Two classes of three; per-example losses from logits chosen so they are simple.
    probs = [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]
    logits = torch.log(torch.tensor(probs, dtype=torch.float64))
    y = torch.tensor([0, 1, 1])
    ce = np.array([-np.log(0.5), -np.log(0.25), -np.log(0.5)])
    per_class = {0: ce[0], 1: (ce[1] + ce[2]) / 2}  # class 2 absent from the batch
    lam = torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64)
    expected = (ce.mean() + 2.0 * per_class[1]) / (1 + 7.0)
    got = mitigations.surrogate_loss(logits.double(), y, lam)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # No multipliers: the plain mean cross-entropy.
    zero = mitigations.surrogate_loss(logits.double(), y, torch.zeros(3, dtype=torch.float64))
    assert float(zero) == pytest.approx(ce.mean(), rel=1e-12)


def test_excess_drop_and_multiplier_update_hand_computed():
    """psi_c = (R_1^c - R_t^c) - (A_1 - A_t); lambda <- max(0, lambda + lr (psi - eps))."""
    # 6 validation examples, classes 0,0,1,1,2,2; the "model" predicts 0,1,1,1,0,0.
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    x = torch.nn.functional.one_hot(pred, 3).double()  # logits whose argmax is `pred`
    model = torch.nn.Identity()
    recall, acc = mitigations.class_recall(model, model, x, y, 3)
    np.testing.assert_array_equal(recall.numpy(), [0.5, 1.0, 0.0])
    assert acc == pytest.approx(0.5)
    dense = (torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64), 5 / 6)
    psi = mitigations.excess_drop(recall, acc, *dense)
    # drops 0.5, 0.0, 0.5 against the model's 1/3
    np.testing.assert_allclose(psi.numpy(), [0.5 - 1 / 3, -1 / 3, 0.5 - 1 / 3])
    lam = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)
    c = mitigations.Constrained(model, model, (x, y), dense, lam.clone(), eps=0.05, lr=2.0, every=2)
    c.after_step()
    assert torch.equal(c.multipliers, lam)  # not yet: every 2 steps
    c.after_step()
    expected = np.maximum(0, lam.numpy() + 2.0 * (psi.numpy() - 0.05))
    np.testing.assert_allclose(c.multipliers.numpy(), expected)
    assert c.multipliers[1] == 0  # projected onto lambda >= 0


def _indexed_data(n_per_class=(30, 12, 50)):
    """A dataset whose one feature is the training example's index (mean 0, std 1: the
    prepared input is the index itself)."""
    from rdfast.data import TensorData

    y = torch.cat([torch.full((k,), c) for c, k in enumerate(n_per_class)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    x = torch.arange(len(y), dtype=torch.float32)[:, None]
    one = torch.ones(1, 1)
    names = [str(c) for c in range(len(n_per_class))]
    return TensorData("indexed", x, y, x[:5], y[:5], names, 0 * one, one)


def _ce_rows(z, y):
    """Per-example cross-entropy, by scipy."""
    return -special.log_softmax(z, axis=1)[np.arange(len(y)), y]


def test_ceag_objective_and_dual_step_hand_computed():
    """Balancing Act's CEAG on a small case, against deques and numpy: the buffer keeps each
    class's last `memory` predictions, only classes with a full buffer ascend (before the
    primal loss is formed), and the loss sums the Lagrangian over the batch's classes."""
    from collections import deque

    dense_loss, dense_acc = np.array([0.2, 0.5, 0.9]), np.array([1.0, 0.8, 0.6])
    dense = (torch.tensor(dense_loss), torch.tensor(dense_acc), 0.5, 0.8)
    lam0 = np.array([0.0, 0.3, 0.2])
    tol, lr, memory = 0.05, 0.1, 2
    obj = mitigations.AccuracyGap(dense, torch.tensor(lam0), tol, lr, memory)
    rng = np.random.default_rng(1)
    buffers = [deque(maxlen=memory) for _ in range(3)]
    lam = lam0.copy()
    # Batch 1: class 0 twice (full), class 1 once (not full), class 2 three times (last two
    # kept). Batch 2: class 1 absent from the loss and its buffer still not full.
    for y in ([0, 0, 1, 2, 2, 2], [0, 2, 2]):
        y = np.array(y)
        z = rng.normal(size=(len(y), 3)) * 2
        hit = z.argmax(axis=1) == y
        for c, h in zip(y, hit):
            buffers[c].append(float(h))
        full = [len(b) == memory for b in buffers]
        acc = np.array([np.mean(b) if f else 0.0 for b, f in zip(buffers, full)])
        mean = acc[full].mean()
        for c in range(3):
            if full[c]:
                defect = (dense_acc[c] - acc[c]) - (0.8 - mean) - tol
                lam[c] = max(0.0, lam[c] + lr * defect)
        ce = _ce_rows(z, y)
        expected = ce.mean()
        for c in set(y.tolist()):
            expected += lam[c] * ((ce[y == c].mean() - dense_loss[c]) - (ce.mean() - 0.5))
        got = obj.loss(torch.tensor(z), None, torch.tensor(y))
        np.testing.assert_allclose(obj.multipliers.numpy(), lam, rtol=0, atol=1e-12)
        np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    assert lam[1] == lam0[1] and lam[0] != lam0[0] and lam[2] != lam0[2]


def test_ceag_dense_baseline_matches_sklearn():
    """The dense model's per-class training loss and accuracy, against sklearn's recall and
    scipy's log-softmax."""
    from sklearn.metrics import accuracy_score, recall_score

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    loss, acc, loss_mean, acc_mean = mitigations.class_loss_accuracy(
        model, model, x, y, 3, prepare=lambda b: b * 1.0, batch_size=16
    )
    z = model(x).detach().numpy()
    ce, pred = _ce_rows(z, y.numpy()), z.argmax(axis=1)
    np.testing.assert_allclose(acc.numpy(), recall_score(y, pred, average=None), atol=1e-12)
    assert acc_mean == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    np.testing.assert_allclose(loss.numpy(), [ce[y.numpy() == c].mean() for c in range(3)])
    assert loss_mean == pytest.approx(ce.mean())


def test_validation_split_is_stratified_disjoint_and_seeded():
    data = _indexed_data()
    rest, (xv, yv) = mitigations.validation_split(data, 0.2, seed=3)
    kept, held = rest.x_train[:, 0].long(), xv[:, 0].long()
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(len(data.y_train)))
    # Each example keeps its label on both sides.
    assert torch.equal(rest.y_train, data.y_train[kept]) and torch.equal(yv, data.y_train[held])
    # Stratified: 20 % of each class, to within one example.
    counts = np.bincount(data.y_train.numpy())
    np.testing.assert_allclose(np.bincount(yv.numpy()), 0.2 * counts, atol=1)
    # Seeded: the same seed the same split, another seed another.
    assert torch.equal(mitigations.validation_split(data, 0.2, seed=3)[1][0], xv)
    assert not torch.equal(mitigations.validation_split(data, 0.2, seed=4)[1][0], xv)


def test_split_too_small_is_bad_input():
    from rdfast.errors import BadInput

    data = _indexed_data((3, 3, 3))
    with pytest.raises(BadInput, match="at least one example of each"):
        mitigations.check_split(data, 0.1)
    mitigations.check_split(data, 0.34)  # 4 of 9 held out, 5 kept: possible


def records(out):
    return store.load_records(out).sort_values(["run_id", "step", "class"]).reset_index(drop=True)


@pytest.mark.parametrize("retrain", ["finetune", "rewind"])
def test_kd_at_weight_zero_records_what_plain_retraining_does(tmp_path, retrain):
    """The distillation path (teacher built, its forward run every batch) changes nothing
    but the objective: at weight 0 the records equal plain retraining's bit for bit, under a
    run id of their own that names the mitigation."""
    both = dict(strategies=("mp", "up"), retrain=retrain)
    Engine(experiment(tmp_path, **both), progress=False).execute()
    Engine(experiment(tmp_path, **both, mitigation="kd", kd_weight=0.0), progress=False).execute()
    rec = records(tmp_path)
    plain, kd = rec[rec["mitigation"] == "plain"], rec[rec["mitigation"] == "kd"]
    assert plain["run_id"].nunique() == kd["run_id"].nunique() == 2
    assert set(plain["run_id"]).isdisjoint(kd["run_id"])
    for strategy in ("mp", "up"):
        a = plain[plain["strategy"] == strategy][RECORD].reset_index(drop=True)
        b = kd[kd["strategy"] == strategy][RECORD].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    run = kd["run_id"].iloc[0]
    settings = store.read_json(tmp_path / "runs" / run / "manifest.json")["settings"]
    assert settings["mitigation"] == "kd" and settings["kd_weight"] == 0.0
    assert settings["kd_temperature"] == 4.0 and "constraint_eps" not in settings


def test_kd_and_constrained_change_retraining(tmp_path, monkeypatch):
    """kd at its default weight moves the numbers; constrained retrains on the training set
    without its validation split and keeps non-negative multipliers in each step's state."""
    sizes = []
    real_train = training_mod.train

    def spy(model, data, settings, **kw):
        sizes.append((kw["seed_parts"][-1], int(data.y_train.shape[0]), kw.get("objective")))
        return real_train(model, data, settings, **kw)

    monkeypatch.setattr(training_mod, "train", spy)
    for m in ("plain", "kd", "constrained", "ceag"):
        Engine(experiment(tmp_path, strategies=("mp",), mitigation=m, multiplier_lr=20.0,
                          dual_lr=1.0, ceag_tolerance=0.0), progress=False).execute()  # fmt: skip
    rec = records(tmp_path)
    acc = rec[rec["step"] == 3].groupby("mitigation")["loss"].first()
    assert acc["kd"] != acc["plain"] and acc["constrained"] != acc["plain"]
    assert acc["ceag"] != acc["plain"]
    finetunes = [(n, type(o).__name__) for part, n, o in sizes if part == "finetune"]
    assert finetunes == [(400, "NoneType")] * 3 + [(400, "Distillation")] * 3 \
        + [(360, "Constrained")] * 3 + [(400, "AccuracyGap")] * 3  # fmt: skip
    # constrained: 10 % of the 400 training examples held out; ceag trains on all of them.
    for m in ("constrained", "ceag"):
        run = rec.loc[rec["mitigation"] == m, "run_id"].iloc[0]
        lam = store.load_torch(tmp_path / "runs" / run / "step-3.pt")["multipliers"]
        assert lam.shape == (5,) and bool((lam >= 0).all()) and bool((lam > 0).any()), m
    kd_run = rec.loc[rec["mitigation"] == "kd", "run_id"].iloc[0]
    assert "multipliers" not in store.load_torch(tmp_path / "runs" / kd_run / "step-3.pt")


@pytest.mark.parametrize(
    "retrain, mitigation",
    [("finetune", "constrained"), ("rewind", "constrained"), ("finetune", "ceag")],
)
def test_interrupted_constrained_run_resumes_to_identical_table(
    tmp_path, monkeypatch, retrain, mitigation
):
    """The multipliers are part of a step's state: a run killed after its first step resumes
    to the uninterrupted numbers, fine-tuned or rewound."""
    exp = dict(strategies=("mp",), mitigation=mitigation, multiplier_lr=20.0, dual_lr=1.0,
               ceag_tolerance=0.0, retrain=retrain)  # fmt: skip
    Engine(experiment(tmp_path / "a", **exp), progress=False).execute()
    real_evaluate = training_mod.evaluate
    count = {"n": 0}

    def dying(*args, **kw):
        count["n"] += 1
        if count["n"] == 3:  # dense, step 1, then step 2 dies
            raise Interrupt
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(training_mod, "evaluate", dying)
    with pytest.raises(Interrupt):
        Engine(experiment(tmp_path / "b", **exp), progress=False).execute()
    assert set(store.load_records(tmp_path / "b")["step"]) == {0, 1}
    monkeypatch.setattr(training_mod, "evaluate", real_evaluate)
    Engine(experiment(tmp_path / "b", **exp), progress=False).execute()
    a = records(tmp_path / "a").drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(records(tmp_path / "b").drop(columns=VOLATILE), a)


def test_analyze_pairs_each_mitigation_with_plain_on_the_same_dense_models(tmp_path):
    for m in ("plain", "kd"):
        Engine(experiment(tmp_path, strategies=("mp", "up"), seeds=(0, 1, 2), mitigation=m),
               progress=False).execute()  # fmt: skip
    a = analyze(load(tmp_path), ci=0.9)
    assert a.baseline == "plain" and a.paired_by == "mitigation" and "mitigation" in a.by
    # Independently: alpha per run from the records, kd minus plain by (strategy, seed, t).
    runs = a.runs.pivot_table(index=["strategy", "seed", "t"], columns="mitigation",
                              values="alpha")  # fmt: skip
    diff = (runs["kd"] - runs["plain"]).groupby(level=["strategy", "t"])
    p = a.paired.set_index(["strategy", "t"])
    assert set(p["mitigation"]) == {"kd"} and (p["n"] == 3).all()
    for (strategy, t), d in diff:
        assert p.loc[(strategy, t), "mean_diff"] == pytest.approx(d.mean(), rel=1e-12)
        if t > 1:
            res = stats.ttest_1samp(d.to_numpy(), 0.0)
            assert p.loc[(strategy, t), "p_value"] == pytest.approx(res.pvalue, rel=1e-9)
    # Strategy comparison still possible on the same records, within each mitigation.
    b = analyze(load(tmp_path), vs="mp")
    assert set(b.paired["strategy"]) == {"up"} and set(b.paired["mitigation"]) == {"plain", "kd"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mitigation", "kd", "--kd-weight", "1.5"], "--kd-weight must lie in [0, 1]"),
        (["--mitigation", "kd", "--kd-temperature", "0"], "--kd-temperature must be > 0"),
        (["--mitigation", "constrained", "--val-fraction", "0.9"], "--val-fraction must lie"),
        (["--mitigation", "constrained", "--multiplier-lr", "-1"], "--multiplier-lr must be"),
        (["--mitigation", "distil"], "'distil' is not one of"),
        (["--mitigation", "ceag", "--dual-lr", "0"], "--dual-lr must be > 0"),
        (["--mitigation", "ceag", "--ceag-tolerance", "1"], "--ceag-tolerance must lie"),
        (["--mitigation", "ceag", "--ceag-memory", "0"], "--ceag-memory must be >= 1"),
        (["--dataset", "synthetic:n_train=20,classes=5", "--mitigation", "constrained",
          "--val-fraction", "0.1"], "at least one example of each"),
    ],
)  # fmt: skip
def test_bad_mitigation_settings_are_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", "--no-progress", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_cli_analyze_and_report_compare_mitigations_with_plain(tmp_path):
    for m in ("plain", "kd"):
        Engine(experiment(tmp_path, strategies=("mp",), seeds=(0, 1), mitigation=m),
               progress=False).execute()  # fmt: skip
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "E[alpha_t(s) - alpha_t(plain)]" in res.stdout and "Psi minus plain" in res.stdout
    # The paired rows are the kd groups (plain is the baseline).
    rows = res.stdout.split("accuracy minus plain:")[1].splitlines()[2:3]
    assert rows and rows[0].startswith("mp ") and " kd " in rows[0]
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["report", str(tmp_path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    assert "## Mitigations against plain, seed by seed" in md and (out / "vs_plain.png").exists()
