"""The class-max saliency forms (taylor-max, sum-max): per-class gradients against autograd on
each class's examples alone, the scores against numpy, the selection against a stable sort,
and runs that record them."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from rdfast.cli.main import cli
from rdfast.data import load_dataset
from rdfast.pruning.calibration import calibration_batches
from rdfast.pruning.strategies import (
    class_gradients,
    class_max_scores,
    data_gradients,
    select_masks,
)
from rdfast.runs import store
from rdfast.runs.engine import Engine
from tests.test_engine import experiment

DATA = "synthetic:n_train=120,n_test=40,classes=4,dim=6"


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def layers_of(model):
    return {"0": model[0].weight, "2": model[2].weight}


# Both ways of measuring the classes: every class from one forward pass a batch (the default
# budget holds them), and one class at a time (a budget of 0 bytes).
MEMORY = [pytest.param(None, id="at-once"), pytest.param(0, id="one-class-at-a-time")]


def budget(memory):
    return {} if memory is None else {"memory": memory}


@pytest.mark.parametrize("memory", MEMORY)
def test_class_gradients_equal_autograd_on_each_class_alone(memory):
    """No batch norm here, so a class's gradient is that of the mean loss over its own
    calibration examples, computed in one autograd call on them alone; and the classes'
    gradients weighted by their counts give the mean gradient of the batches."""
    data = load_dataset(DATA, None)
    model = small_model()
    layers = layers_of(model)
    draw = dict(batches=3, batch_size=32, seed_parts=(7, "grad"))
    got = dict(class_gradients(model, layers, data, **draw, **budget(memory)))
    batches = list(calibration_batches(data, 3, 32, (7, "grad")))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert sorted(got) == sorted(torch.unique(y).tolist())
    for c, grads in got.items():
        loss = F.cross_entropy(model(x[y == c]), y[y == c])
        ref = torch.autograd.grad(loss, list(layers.values()))
        for (name, g), r in zip(grads.items(), ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=f"class {c}, {name}")
    mean = data_gradients(model, layers, data, **draw)
    for name in layers:
        # Three full batches of 32: the mean gradient is the mean over their 96 examples.
        weighted = sum(got[c][name] * int((y == c).sum()) for c in got) / len(y)
        torch.testing.assert_close(weighted, mean[name], rtol=1e-5, atol=1e-6)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def test_class_gradients_with_batch_norm_equal_whole_batch_backward_per_class():
    """With batch norm a class's examples are normalized with the whole batch, so the
    reference runs each batch whole and back-propagates the class's summed losses, batch by
    batch; both ways of measuring give these numbers bit for bit, and leave the model's
    running statistics as they were."""
    data = load_dataset(DATA, None)
    draw = dict(batches=3, batch_size=32, seed_parts=(7, "grad"))
    batches = list(calibration_batches(data, 3, 32, (7, "grad")))
    y_all = torch.cat([b[1] for b in batches])
    got = {}
    for memory in (None, 0):
        model = bn_model()
        stats = model[1].running_mean.clone()
        got[memory] = dict(class_gradients(model, {"0": model[0].weight, "3": model[3].weight},
                                           data, **draw, **budget(memory)))  # fmt: skip
        assert torch.equal(model[1].running_mean, stats)
    model = bn_model()
    params = [model[0].weight, model[3].weight]
    model.train()
    for c in sorted(got[None]):
        n_c = int((y_all == c).sum())
        ref = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            if (y == c).any():
                loss = F.cross_entropy(model(x), y, reduction="none")[y == c].sum() / n_c
                for r, g in zip(ref, torch.autograd.grad(loss, params)):
                    r += g
        for name, r in zip(("0", "3"), ref):
            torch.testing.assert_close(got[None][c][name], r, rtol=1e-5, atol=1e-7)
            assert torch.equal(got[None][c][name], got[0][c][name]), (c, name)


@pytest.mark.parametrize("strategy, form", [("gp", "taylor"), ("up", "taylor"), ("up", "sum")])
def test_class_max_scores_match_numpy(strategy, form):
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(5, 3)), rng.normal(size=(4,))]
    per_class = [[rng.normal(size=a.shape) for a in w] for _ in range(3)]
    eps = 0.3
    got = class_max_scores([torch.tensor(a, dtype=torch.float32) for a in w],
                           [[torch.tensor(g, dtype=torch.float32) for g in gs] for gs in per_class],
                           strategy, form, eps)  # fmt: skip
    for k, a in enumerate(w):
        if form == "taylor" and strategy == "gp":
            each = [np.abs(a * gs[k]) for gs in per_class]
        elif form == "taylor":
            each = [np.abs(-a * gs[k] + eps * a * a) for gs in per_class]
        else:
            each = [np.abs(gs[k]) + eps * np.abs(a) for gs in per_class]
        np.testing.assert_allclose(got[k].numpy(), np.max(each, axis=0), rtol=1e-6)


def test_class_max_selection_equals_a_stable_sort_of_the_scores():
    rng = np.random.default_rng(1)
    shapes = {"a": (30, 20), "b": (700,)}
    layers = {k: nn.Parameter(torch.tensor(rng.normal(size=s), dtype=torch.float32))
              for k, s in shapes.items()}  # fmt: skip
    per_class = [{k: torch.tensor(rng.normal(size=s), dtype=torch.float32)
                  for k, s in shapes.items()} for _ in range(4)]  # fmt: skip
    masks = select_masks(layers, None, 4.0, "gp", class_grads=iter(per_class),
                         form="taylor-max")  # fmt: skip
    scores = np.concatenate([
        np.max([np.abs(layers[k].detach().numpy() * g[k].numpy()) for g in per_class], axis=0)
        .reshape(-1) for k in shapes
    ])  # fmt: skip
    total = scores.size
    keep = round(total / 4)
    removed = np.argsort(scores, kind="stable")[: total - keep]
    expected = np.ones(total, dtype=bool)
    expected[removed] = False
    got = np.concatenate([masks[k].numpy().reshape(-1) for k in shapes])
    np.testing.assert_array_equal(got, expected)


def test_runs_record_the_class_max_form_and_change_the_masks(tmp_path):
    for form in ("taylor", "taylor-max"):
        Engine(experiment(tmp_path, strategies=("mp", "gp"), saliency=form),
               progress=False).execute()  # fmt: skip
    rec = store.load_records(tmp_path)
    assert set(rec["saliency"]) == {"none", "taylor", "taylor-max"}
    # mp ignores the form: one mp run serves both commands.
    assert rec["run_id"].nunique() == 3
    last = rec[rec["step"] == rec["step"].max()].groupby("saliency")["loss"].first()
    assert last["taylor"] != last["taylor-max"]


@pytest.mark.parametrize(
    "choice, message",
    [
        (["--strategy", "gp", "--saliency", "taylor-max"], "rdfast prune takes taylor or sum"),
        (["--strategy", "cs"], "rdfast prune takes mp, gp, up"),
    ],
)
def test_prune_refuses_the_class_aware_scores(tmp_path, choice, message):
    """Class-max forms and class-share are computed by rdfast run alone: prune says so in
    one line, exit 2, and writes nothing."""
    args = ["prune", "--checkpoint", str(tmp_path / "m.pt"), "--dataset", "digits",
            "--model", "mlp", *choice, "--out", str(tmp_path / "o")]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "o").exists()
