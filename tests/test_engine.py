"""The engine: masks hold, the dense model is shared, runs resume to the identical table."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import recall_score

import rdfast.training as training_mod
from rdfast.config import Experiment, PruneSettings, train_settings
from rdfast.data import load_dataset
from rdfast.errors import RunFailed
from rdfast.models import build_model, prunable_layers
from rdfast.pruning.strategies import target_remaining
from rdfast.runs import store
from rdfast.runs.engine import Engine

VOLATILE = ["seconds"]  # wall-clock time: the one column that may differ between runs


def experiment(
    out,
    retrain="finetune",
    strategies=("mp", "gp", "up", "rp"),
    seeds=(0,),
    dataset="synthetic:n_train=400,n_test=200,classes=5,dim=8",
    **prune,
):
    return Experiment(
        dataset=dataset,
        model="mlp",
        width=0.25,
        seeds=seeds,
        strategies=strategies,
        train=train_settings("synthetic", epochs=3, batch_size=50),
        prune=PruneSettings(
            ratios=(2.0, 5.0, 20.0), retrain=retrain, finetune_epochs=2, grad_batches=2, **prune
        ),
        device="cpu",
        out=out,
    )


def table(out):
    return store.load_records(out).drop(columns=VOLATILE)


@pytest.mark.parametrize("retrain", ["finetune", "rewind"])
def test_pruned_weights_stay_zero_and_counts_exact(tmp_path, retrain):
    exp = experiment(tmp_path, retrain=retrain, strategies=("mp", "up"))
    eng = Engine(exp, progress=False)
    assert all(o.status == "complete" for o in eng.execute())
    for run_dir in (tmp_path / "runs").iterdir():
        state = store.load_torch(run_dir / "step-3.pt")
        model = build_model("mlp", (8,), 5, 0.25)
        model.load_state_dict(state["model"])
        layers = prunable_layers(model)
        total = sum(w.numel() for w in layers.values())
        kept = sum(int(m.sum()) for m in state["masks"].values())
        assert kept == target_remaining(total, 20.0)
        for name, w in layers.items():
            pruned = ~state["masks"][name]
            assert pruned.any()
            assert torch.all(w.detach()[pruned] == 0), name  # exactly zero after retraining
        # The records agree with the masks.
        rec = pd.read_parquet(run_dir / "step-3.parquet")
        assert (rec["remaining"] == kept).all() and (rec["total"] == total).all()
        assert rec["t_actual"].iloc[0] == pytest.approx(total / kept)


def test_records_recall_matches_sklearn_on_final_model(tmp_path):
    exp = experiment(tmp_path, strategies=("gp",))
    Engine(exp, progress=False).execute()
    run_dir = next((tmp_path / "runs").iterdir())
    model = build_model("mlp", (8,), 5, 0.25)
    model.load_state_dict(store.load_torch(run_dir / "step-3.pt")["model"])
    data = load_dataset(exp.dataset)
    with torch.no_grad():
        pred = model.eval()(data.prepare(data.x_test)).argmax(1).numpy()
    rec = pd.read_parquet(run_dir / "step-3.parquet")
    np.testing.assert_allclose(rec["recall"], recall_score(data.y_test.numpy(), pred, average=None))
    assert rec["accuracy"].iloc[0] == pytest.approx((pred == data.y_test.numpy()).mean())
    assert rec["support"].sum() == len(pred)


def test_dense_trained_once_for_four_strategies(tmp_path, monkeypatch):
    calls = []
    real_train = training_mod.train

    def spy(*args, **kw):
        calls.append(kw.get("seed_parts"))
        return real_train(*args, **kw)

    monkeypatch.setattr(training_mod, "train", spy)
    Engine(experiment(tmp_path), progress=False).execute()
    dense_calls = [c for c in calls if c[1] == "dense"]
    assert len(dense_calls) == 1
    assert len(calls) == 1 + 4 * 3  # one dense + one fine-tuning per (strategy, ratio)
    recs = store.load_records(tmp_path)
    dense_rows = recs[recs["step"] == 0]
    # Every strategy starts from the same dense evaluation.
    assert dense_rows.groupby("class")["recall"].nunique().eq(1).all()
    assert dense_rows["dense_id"].nunique() == 1
    # A second command with another strategy reuses the cached dense model.
    calls.clear()
    exp = experiment(tmp_path)
    exp.prune = PruneSettings(
        ratios=(2.0, 5.0, 20.0), finetune_epochs=2, grad_batches=2, saliency="sum"
    )
    exp.strategies = ("gp",)
    Engine(exp, progress=False).execute()
    assert [c for c in calls if c[1] == "dense"] == []


class Interrupt(BaseException):
    pass


def test_interrupted_run_resumes_to_identical_table(tmp_path, monkeypatch):
    Engine(experiment(tmp_path / "a"), progress=False).execute()
    reference = table(tmp_path / "a")

    real_evaluate = training_mod.evaluate
    count = {"n": 0}

    def dying(*args, **kw):
        count["n"] += 1
        if count["n"] == 6:  # in the middle of the second strategy
            raise Interrupt
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(training_mod, "evaluate", dying)
    with pytest.raises(Interrupt):
        Engine(experiment(tmp_path / "b"), progress=False).execute()
    partial = store.load_records(tmp_path / "b")
    assert (
        0
        < partial.drop_duplicates(["run_id", "step"]).shape[0]
        < reference.drop_duplicates(["run_id", "step"]).shape[0]
    )
    monkeypatch.setattr(training_mod, "evaluate", real_evaluate)
    Engine(experiment(tmp_path / "b"), progress=False).execute()
    pd.testing.assert_frame_equal(table(tmp_path / "b"), reference)
    consolidated = pd.read_parquet(tmp_path / "b" / "records.parquet").drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(consolidated, reference)


def test_completed_run_is_skipped(tmp_path, monkeypatch):
    Engine(experiment(tmp_path), progress=False).execute()
    monkeypatch.setattr(training_mod, "train", lambda *a, **k: pytest.fail("retrained"))
    outcomes = Engine(experiment(tmp_path), progress=False).execute()
    assert all(o.status == "complete" for o in outcomes)


def test_same_command_same_table(tmp_path):
    Engine(experiment(tmp_path / "a", seeds=(3,)), progress=False).execute()
    Engine(experiment(tmp_path / "b", seeds=(3,)), progress=False).execute()
    pd.testing.assert_frame_equal(table(tmp_path / "a"), table(tmp_path / "b"))


def test_failed_run_recorded_and_others_go_on(tmp_path, monkeypatch):
    real_train = training_mod.train

    def diverge_seed_1(model, data, settings, **kw):
        if kw["seed_parts"][0] == 1:
            raise RunFailed("training loss became nan in epoch 1")
        return real_train(model, data, settings, **kw)

    monkeypatch.setattr(training_mod, "train", diverge_seed_1)
    outcomes = Engine(
        experiment(tmp_path, seeds=(0, 1), strategies=("mp",)), progress=False
    ).execute()
    by_seed = {o.seed: o for o in outcomes}
    assert by_seed[0].status == "complete" and by_seed[1].status == "failed"
    manifest = store.read_json(tmp_path / "runs" / by_seed[1].run_id / "manifest.json")
    assert manifest["status"] == "failed" and "nan" in manifest["error"]
    done = store.read_json(tmp_path / "runs" / by_seed[0].run_id / "manifest.json")
    assert done["status"] == "complete" and done["settings"]["strategy"] == "mp"
    assert set(store.load_records(tmp_path)["seed"]) == {0}


def test_masked_kernels_through_the_interpreter(tmp_path):
    """The masked-linear kernel in the retraining loop: pruned weights stay exactly zero and
    the results agree with the plain torch path to rounding."""
    plain = experiment(tmp_path / "plain", strategies=("mp",))
    Engine(plain, progress=False).execute()
    kern = experiment(tmp_path / "kern", strategies=("mp",))
    kern.masked_kernels = True
    Engine(kern, progress=False).execute()
    run_dir = next((tmp_path / "kern" / "runs").iterdir())
    state = store.load_torch(run_dir / "step-3.pt")
    for name, mask in state["masks"].items():
        assert torch.all(state["model"][f"{name}.weight"][~mask] == 0)
    a, b = table(tmp_path / "plain"), table(tmp_path / "kern")
    assert (a["accuracy"] - b["accuracy"]).abs().max() <= 0.02


@pytest.mark.parametrize("retrain", ["finetune", "rewind"])
def test_interrupted_dense_training_resumes_bit_for_bit(tmp_path, monkeypatch, retrain):
    ref = Engine(experiment(tmp_path / "a", strategies=("mp",), retrain=retrain), progress=False)
    ref.execute()
    real_train = training_mod.train
    resumed_at = []

    def dying(*args, **kw):
        if kw["seed_parts"][1] == "dense" and kw.get("resume") is None:
            user = kw["on_epoch_end"]

            def stop_after_two(epoch, opt):
                user(epoch, opt)
                if epoch == 2:
                    raise Interrupt

            kw["on_epoch_end"] = stop_after_two
        if kw.get("resume"):
            resumed_at.append(kw["resume"]["epoch"])
        return real_train(*args, **kw)

    monkeypatch.setattr(training_mod, "train", dying)
    eng = Engine(experiment(tmp_path / "b", strategies=("mp",), retrain=retrain), progress=False)
    eng.save_every = 0  # save after every epoch
    with pytest.raises(Interrupt):
        eng.execute()
    assert list((tmp_path / "b" / "dense").glob("*/partial.pt"))
    eng = Engine(experiment(tmp_path / "b", strategies=("mp",), retrain=retrain), progress=False)
    eng.save_every = 0
    eng.execute()
    assert resumed_at == [2]
    assert not list((tmp_path / "b" / "dense").glob("*/partial.pt"))
    a = store.load_torch(next((tmp_path / "a" / "dense").glob("*/checkpoint.pt")))
    b = store.load_torch(next((tmp_path / "b" / "dense").glob("*/checkpoint.pt")))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if retrain == "rewind":
        for k in a["rewind"]:
            assert torch.equal(a["rewind"][k], b["rewind"][k]), k
    pd.testing.assert_frame_equal(table(tmp_path / "a"), table(tmp_path / "b"))


def test_learning_rate_schedules():
    from rdfast.training import lr_at

    # Cosine: lr * (1 + cos(pi * e / E)) / 2 -> 0.1, 0.05, 0 over E = 4 at e = 0, 2, 4.
    assert lr_at(0, 0.1, 4, "cosine") == pytest.approx(0.1)
    assert lr_at(2, 0.1, 4, "cosine") == pytest.approx(0.05)
    assert lr_at(3, 0.1, 4, "cosine") == pytest.approx(0.1 * (1 - 0.5**0.5) / 2)
    # Step: x0.1 from 50 % of the epochs, x0.01 from 75 %.
    assert [lr_at(e, 1.0, 8, "step") for e in range(8)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    )


def test_rewind_retrains_from_the_rewind_epoch_to_the_end(tmp_path, monkeypatch):
    """OpenLTH's lottery loop: survivors rewound to epoch k train epochs k..E-1, the learning
    rate resuming at epoch k; the dense model trains all E epochs."""
    import rdfast.training as training

    seen = []
    original = training.lr_at

    def spy(epoch, lr, epochs, schedule):
        seen.append(epoch)
        return original(epoch, lr, epochs, schedule)

    monkeypatch.setattr(training, "lr_at", spy)
    exp = experiment(tmp_path, retrain="rewind", strategies=("mp",), rewind_epoch=1)
    Engine(exp, progress=False).execute()
    # Dense: epochs 0, 1, 2; then each of the three pruning steps: epochs 1, 2.
    assert seen == [0, 1, 2] + [1, 2] * 3


def test_layer_matched_random_keeps_magnitude_densities_per_layer(tmp_path):
    exp = experiment(tmp_path, strategies=("mp", "rp-layer"))
    Engine(exp, progress=False).execute()
    dense_dir = next((tmp_path / "dense").iterdir())
    dense = store.load_torch(dense_dir / "checkpoint.pt")["model"]
    names = ["fc1", "fc2", "fc3"]
    ws = [dense[f"{k}.weight"].numpy().reshape(-1) for k in names]
    flat = np.abs(np.concatenate(ws))
    total = flat.size
    for run_dir in (tmp_path / "runs").iterdir():
        rec = pd.read_parquet(run_dir / "step-3.parquet")
        if rec["strategy"].iloc[0] != "rp-layer":
            continue
        masks = store.load_torch(run_dir / "step-3.pt")["masks"]
        # numpy: global magnitude pruning of the dense weights to t = 20, counted per layer.
        keep = np.ones(total, dtype=bool)
        keep[np.argsort(flat, kind="stable")[: total - round(total / 20.0)]] = False
        bounds = np.cumsum([0] + [w.size for w in ws])
        expected = [int(keep[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
        assert [int(masks[k].sum()) for k in names] == expected
        # ... but not the magnitude mask itself: random within each layer.
        mp_keep = torch.from_numpy(keep[bounds[0] : bounds[1]].reshape(masks["fc1"].shape))
        assert not torch.equal(masks["fc1"], mp_keep)
