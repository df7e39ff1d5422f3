"""`rdfast prune`: a given model's checkpoint pruned and measured, and the streamed pruning of
safetensors checkpoints. References: numpy stable sorts of the concatenated scores (ties in
checkpoint order), sklearn's per-class recall of the pruned model's own predictions, the
safetensors library reading what rdfast writes."""

from __future__ import annotations

import errno
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from sklearn.metrics import recall_score

from rdfast.cli.main import cli
from rdfast.data import load_dataset
from rdfast.models import build_model, prunable_layers
from rdfast.pruning.given_model import load_masks, prune_module


def invoke(*args):
    return CliRunner().invoke(cli, ["prune", *map(str, args)], catch_exceptions=False)


def stable_keep(scores: list[np.ndarray], n_remove: int) -> list[np.ndarray]:
    """Masks removing the n lowest of the concatenated scores, ties in concatenation order."""
    flat = np.concatenate([s.reshape(-1) for s in scores])
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:n_remove]] = False
    out, at = [], 0
    for s in scores:
        out.append(keep[at : at + s.size].reshape(s.shape))
        at += s.size
    return out


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


# --------------------------------------------------------------------------- a given model


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """A LeNet-300-100 trained briefly on digits, saved as a torch state dict and as
    two-shard safetensors with an index, as Hugging Face writes them."""
    from rdfast import training
    from rdfast.config import train_settings

    root = tmp_path_factory.mktemp("given")
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes, 1.0)
    training.train(model, data, train_settings("digits", "mlp", epochs=4))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, root / "mlp.pt")
    sharded = root / "sharded"
    sharded.mkdir()
    names = list(state)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = {files[0]: names[:3], files[1]: names[3:]}
    for file, ns in parts.items():
        save_file({n: state[n] for n in ns}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {n: f for f, ns in parts.items() for n in ns}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {"root": root, "state": state, "data": data, "sharded": sharded}


def predictions(state, data) -> np.ndarray:
    model = build_model("mlp", data.input_shape, data.num_classes, 1.0)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(data.prepare(data.x_test)).argmax(1).numpy()


def test_prune_records_match_sklearn_and_numpy_masks(given, tmp_path):
    out = tmp_path / "out"
    res = invoke("--model", "mlp", "--checkpoint", given["root"] / "mlp.pt", "--dataset",
                 "digits", "--strategy", "mp,rp", "--ratios", "2,8", "--seeds", "0,1",
                 "--out", out, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    rec = pd.read_parquet(out / "records.parquet")
    assert set(rec["t_target"]) == {1.0, 2.0, 8.0}
    assert rec["run_id"].nunique() == 4 and rec["dense_id"].nunique() == 1
    data, state = given["data"], given["state"]
    y = data.y_test.numpy()
    names = [f"{k}.weight" for k in ("fc1", "fc2", "fc3")]
    total = sum(state[n].numel() for n in names)
    for t in (1.0, 2.0, 8.0):
        pruned = dict(state)
        if t > 1:
            keep = stable_keep([state[n].abs().numpy() for n in names], total - round(total / t))
            for n, k in zip(names, keep):
                pruned[n] = state[n] * torch.from_numpy(k)
        expected = recall_score(y, predictions(pruned, data), average=None, labels=range(10))
        for seed in (0, 1):
            got = rec[(rec.strategy == "mp") & (rec.seed == seed) & (rec.t_target == t)]
            np.testing.assert_allclose(got.sort_values("class")["recall"], expected, rtol=0)
            assert (got["remaining"] == round(total / t)).all()
    # The same columns as `rdfast run` records.
    from rdfast.runs.steps import step_records

    base = step_records({}, np.eye(2, dtype=np.int64), ["a", "b"]).columns
    assert set(base) <= set(rec.columns)
    runner = CliRunner()
    assert runner.invoke(cli, ["analyze", str(out)]).exit_code == 0
    assert runner.invoke(cli, ["report", str(out), "-o", str(tmp_path / "rep")]).exit_code == 0
    manifest = json.loads(next((out / "runs").glob("*/manifest.json")).read_text())
    import hashlib

    sha = hashlib.sha256((given["root"] / "mlp.pt").read_bytes()).hexdigest()
    assert manifest["checkpoint"]["sha256"] == sha


def test_saved_model_reloads_to_the_recorded_evaluation(given, tmp_path):
    out = tmp_path / "out"
    res = invoke("--model", "mlp", "--checkpoint", given["sharded"], "--dataset", "digits",
                 "--strategy", "up", "--ratios", "4", "--seeds", "3", "--grad-batches", "2",
                 "--finetune-epochs", "1", "--save", "--out", out, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    (folder,) = (out / "pruned").glob("*/t4")
    # Shaped like the input: the same shard files and index; the tensors keep their dtypes.
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*(p.name for p in given["sharded"].iterdir()), "masks.safetensors", "files.json"]
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    given_index = json.loads((given["sharded"] / "model.safetensors.index.json").read_text())
    assert index == given_index["weight_map"]
    state = {}
    for f in set(index.values()):
        state.update(load_file(str(folder / f)))
    masks = load_masks(folder)
    assert set(masks) == {"fc1", "fc2", "fc3"}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == round(total / 4)
    for k, m in masks.items():  # fine-tuning kept the pruned weights at zero
        assert not state[f"{k}.weight"][~m].any()
    rec = pd.read_parquet(out / "records.parquet")
    row = rec[rec.t_target == 4.0].sort_values("class")
    data = given["data"]
    pred = predictions(state, data)
    np.testing.assert_allclose(
        row["recall"], recall_score(data.y_test.numpy(), pred, average=None), rtol=0
    )
    # The saved checkpoint is itself a checkpoint rdfast prune takes (t = 1 is the saved model).
    again = tmp_path / "again"
    res = invoke("--model", "mlp", "--checkpoint", folder, "--dataset", "digits", "--ratios",
                 "2", "--out", again, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    first = pd.read_parquet(again / "records.parquet").query("t_target == 1").sort_values("class")
    np.testing.assert_array_equal(first["correct"], row["correct"])


def test_resume_recomputes_only_the_missing_step(given, tmp_path):
    out = tmp_path / "out"
    args = ("--model", "mlp", "--checkpoint", given["root"] / "mlp.pt", "--dataset", "digits",
            "--strategy", "gp", "--ratios", "2,4,8", "--grad-batches", "2",
            "--finetune-epochs", "1", "--out", out, "--no-progress")  # fmt: skip
    assert invoke(*args).exit_code == 0
    before = pd.read_parquet(out / "records.parquet")
    (run,) = (out / "runs").iterdir()
    (run / "step-3.parquet").unlink()  # killed while writing step 3
    mtime = (run / "step-2.parquet").stat().st_mtime_ns
    assert invoke(*args).exit_code == 0
    after = pd.read_parquet(out / "records.parquet")
    cols = [c for c in before.columns if c != "seconds"]
    pd.testing.assert_frame_equal(
        before[cols].sort_values(["t_target", "class"]).reset_index(drop=True),
        after[cols].sort_values(["t_target", "class"]).reset_index(drop=True),
    )
    assert (run / "step-2.parquet").stat().st_mtime_ns == mtime  # left as it was


class Unpicklable:
    pass


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("mismatch", "fc2.weight is (7, 300) in the checkpoint, (100, 300) in the model"),
        ("classes", "the classifier fc3.weight has 3 outputs, the dataset 10 classes"),
        ("extra", "the checkpoint's extra.weight (2,) is not in the model"),
        ("pickle", "refused by torch.load(weights_only=True)"),
        ("no-model", "--model is needed with --dataset"),
        ("not-safetensors", "not a safetensors file"),
    ],
)
def test_bad_checkpoints_one_line_exit_2_nothing_written(given, tmp_path, case, message):
    state = dict(given["state"])
    path = tmp_path / "ckpt.pt"
    if case == "mismatch":
        state["fc2.weight"] = torch.zeros(7, 300)
    elif case == "classes":
        state["fc3.weight"], state["fc3.bias"] = torch.zeros(3, 100), torch.zeros(3)
    elif case == "extra":
        state["extra.weight"] = torch.zeros(2)
    if case == "pickle":
        torch.save({"model": Unpicklable()}, path)
    elif case == "not-safetensors":
        path = tmp_path / "junk.safetensors"
        path.write_bytes(b"\xff" * 40)
    elif case != "missing":
        torch.save(state, path)
    out = tmp_path / "out"
    model = () if case == "no-model" else ("--model", "mlp")
    res = invoke(*model, "--checkpoint", path, "--dataset", "digits", "--out", out)
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()


@pytest.mark.parametrize("form", ["ddp-wrapped.pt", "one-file.safetensors"])
def test_other_checkpoint_forms_give_the_same_records(given, tmp_path, form):
    """A state dict saved from DistributedDataParallel inside {"state_dict": ...}, and one
    .safetensors file: the same given model, so the same t = 1 records as mlp.pt."""
    path = tmp_path / form
    if form.endswith(".pt"):
        torch.save({"state_dict": {f"module.{k}": v for k, v in given["state"].items()}}, path)
    else:
        save_file(given["state"], str(path))
    records = []
    for i, ckpt in enumerate((given["root"] / "mlp.pt", path)):
        res = invoke("--model", "mlp", "--checkpoint", ckpt, "--dataset", "digits", "--ratios",
                     "2", "--out", tmp_path / f"out{i}", "--no-progress")  # fmt: skip
        assert res.exit_code == 0, res.output
        rec = pd.read_parquet(tmp_path / f"out{i}" / "records.parquet")
        records.append(rec.sort_values(["t_target", "class"])[["correct", "loss"]].to_numpy())
    np.testing.assert_array_equal(records[0], records[1])


# --------------------------------------------------------------------------- the Python API


def test_prune_module_gp_masks_equal_numpy_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)
    )
    batches = [(torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))) for _ in range(3)]
    # The mean gradient, computed independently: each batch's gradient, summed in order,
    # divided by the count (the arithmetic of accumulating in .grad, so the scores' bits agree).
    params = [model[0].weight, model[2].weight]
    ref = [p.detach().clone() for p in params]
    per_batch = [
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
        for x, y in batches
    ]
    g = [sum(gs[1:], gs[0].clone()) / 3 for gs in zip(*per_batch)]
    scores = [(w * gi).abs().numpy() for w, gi in zip(ref, g)]  # taylor |w*g|
    total = sum(s.size for s in scores)
    masks = prune_module(model, [2, 4], "gp", batches=iter(batches), saliency="taylor")
    for t in (2, 4):
        keep = stable_keep(scores, total - round(total / t))
        for m, k in zip(masks[t].values(), keep):
            np.testing.assert_array_equal(m.numpy(), k)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was
    assert torch.equal(model[0].weight, ref[0])


def test_prune_module_mp_applies_and_rp_nests():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
    w = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    total = sum(x.numel() for x in w)
    rp = prune_module(model, [2, 4, 8], "rp", seed=5)
    for a, b in ((2, 4), (4, 8)):
        for k in rp[a]:
            assert not (rp[b][k] & ~rp[a][k]).any()  # kept at t=b implies kept at t=a
    masks = prune_module(model, [4], "mp", apply=True)[4.0]
    keep = stable_keep([x.abs().numpy() for x in w], total - round(total / 4))
    for m, k, x, layer in zip(masks.values(), keep, w, (model[0], model[2])):
        np.testing.assert_array_equal(m.numpy(), k)
        np.testing.assert_array_equal(layer.weight.detach().numpy(), (x * m).numpy())
    with pytest.raises(ValueError, match="one ratio"):
        prune_module(model, [2, 4], "mp", apply=True)
    assert list(prunable_layers(model)) == ["0", "2"]


# --------------------------------------------------------------------------- streamed


def write_checkpoint(folder, tensors: dict, shards: list[list[str]]):
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture
def checkpoint(tmp_path):
    """Three shards, odd sizes past one 2^20-element chunk, fp32/fp16/bf16, integer values
    (ties at every threshold), -0.0 and +inf, and tensors that are not pruned."""
    gen = torch.Generator().manual_seed(0)
    t = {
        "embed.weight": torch.randint(-20, 21, (1100, 1000), generator=gen).float(),
        "embed.norm": torch.randn(1000, generator=gen),
        "block.0.attn.q_proj.weight": torch.randn(70, 33, generator=gen).half(),
        "block.0.mlp.weight": torch.randint(-5, 6, (41, 17), generator=gen).bfloat16(),
        "block.0.step": torch.tensor([3], dtype=torch.int64),
        "head.weight": torch.randn(13, 7, 3, 3, generator=gen),
    }
    t["head.weight"][0, 0, 0, :2] = torch.tensor([-0.0, float("inf")])
    shards = [["embed.weight", "embed.norm"], ["block.0.attn.q_proj.weight", "block.0.step"],
              ["block.0.mlp.weight", "head.weight"]]  # fmt: skip
    write_checkpoint(tmp_path / "ckpt", t, shards)
    return tmp_path / "ckpt", t


def file_order(folder) -> list[str]:
    """Tensor names in the order of their bytes: shards in order, then data offsets (the
    safetensors library lays tensors out by alignment, not as given)."""
    names = []
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda n: header[n]["data_offsets"][0])
    return names


def read_pruned(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_streamed_prune_equals_a_stable_sort_of_the_concatenation(checkpoint, tmp_path):
    ckpt, t = checkpoint
    out = tmp_path / "out"
    res = invoke("--checkpoint", ckpt, "--ratios", "2,4,8", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "prune.json").read_text())
    names = [n for n in file_order(ckpt) if n not in ("embed.norm", "block.0.step")]
    assert summary["tensors"] == names  # checkpoint order; 1-D and integer tensors left alone
    scores = [t[n].float().abs().numpy() for n in names]
    total = sum(s.size for s in scores)
    previous = None
    for ratio in (2, 4, 8):
        got = read_pruned(out / f"t{ratio}")
        keep = stable_keep(scores, total - round(total / ratio))
        for n, k in zip(names, keep):
            np.testing.assert_array_equal(bits(got[n]), bits(t[n] * torch.from_numpy(k)))
        for n in ("embed.norm", "block.0.step"):
            assert torch.equal(got[n], t[n])
        kept = np.concatenate([k.ravel() for k in keep])
        assert kept.sum() == round(total / ratio)
        if previous is not None:
            assert not (kept & ~previous).any()  # nested
        previous = kept
        index = json.loads((out / f"t{ratio}" / "model.safetensors.index.json").read_text())
        assert index == json.loads((ckpt / "model.safetensors.index.json").read_text())
        for f in ckpt.glob("*.safetensors"):  # the same header: offsets, dtypes, metadata
            head = f.read_bytes()[: 8 + int.from_bytes(f.read_bytes()[:8], "little")]
            assert (out / f"t{ratio}" / f.name).read_bytes().startswith(head)


def test_streamed_prune_equals_in_memory_prune(checkpoint, tmp_path):
    ckpt, t = checkpoint
    from rdfast.kernels import prune_lowest_fused

    res = invoke("--checkpoint", ckpt, "--ratios", "3", "--include", "*.weight",
                 "--exclude", "embed", "--out", tmp_path / "out", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    names = [n for n in file_order(ckpt) if n.endswith(".weight") and n != "embed.weight"]
    assert len(names) == 3
    ws = [t[n] for n in names]
    total = sum(w.numel() for w in ws)
    ones = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    masks = prune_lowest_fused(ws, None, ones, total - round(total / 3), strategy="mp")
    got = read_pruned(tmp_path / "out" / "t3")
    for n, w, m in zip(names, ws, masks):
        np.testing.assert_array_equal(bits(got[n]), bits(w * m.to(w.dtype)))
    assert torch.equal(got["embed.weight"], t["embed.weight"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--include", "nothing.*"], "--include nothing.* matches no floating tensor"),
        (["--strategy", "gp"], "without --dataset a checkpoint is pruned by magnitude only"),
        (["--ratios", "1e9"], "leaves no weight"),
        (["--save"], "need --dataset"),
    ],
)
def test_streamed_bad_input(checkpoint, tmp_path, args, message):
    res = invoke("--checkpoint", checkpoint[0], *args, "--out", tmp_path / "out")
    assert res.exit_code == 2 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_streamed_disk_full_exit_1_no_partial_shard(checkpoint, tmp_path, monkeypatch):
    from rdfast.pruning import streaming

    calls = []
    real = streaming._write_shard

    def full_on_second_shard(shard, *a):
        calls.append(shard.path.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(shard.path))
        return real(shard, *a)

    monkeypatch.setattr(streaming, "_write_shard", full_on_second_shard)
    out = tmp_path / "out"
    res = invoke("--checkpoint", checkpoint[0], "--ratios", "2,4", "--out", out)
    assert res.exit_code == 1 and "No space left on device" in res.output, res.output
    assert not list(out.rglob("*.safetensors"))  # nothing partial left behind
    assert not (out / "prune.json").exists()


def test_pickle_and_unreadable_checkpoints(tmp_path):
    bad = tmp_path / "model.pt"
    with open(bad, "wb") as f:
        pickle.dump({"w": Unpicklable()}, f)
    res = invoke("--checkpoint", bad, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "streamed pruning reads safetensors" in res.output


def test_prune_in_place_zeroes_the_weights_prune_module_removes():
    import copy

    from rdfast.pruning.given_model import prune_in_place

    torch.manual_seed(2)
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(128, 5))
    a[0].to(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))) for _ in range(2)]
    kept = prune_in_place(a, 4, "up", batches=iter(batches), eps=0.01)
    masks = prune_module(b, [4], "up", batches=iter(batches), eps=0.01, apply=True)[4.0]
    assert kept == {k: int(m.sum()) for k, m in masks.items()}
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        np.testing.assert_array_equal(bits(x), bits(y))
    with pytest.raises(Exception, match="random scores"):
        prune_in_place(a, 2, "rp")


@pytest.mark.slow
@pytest.mark.skipif(
    not __import__("rdfast.kernels._backend", fromlist=["x"]).interpreting(),
    reason="emulates CUDA on the CPU: needs TRITON_INTERPRET=1",
)
def test_cuda_path_equals_cpu_path_for_a_given_lenet5(tmp_path, monkeypatch, shared_data):
    """What a CUDA `rdfast prune` runs -- LeNet-5 and its masks in channels_last, selection
    and confusion matrix through the Triton kernels (interpreted here) -- against the plain
    CPU path: records and saved masks equal bit for bit."""
    import rdfast.kernels.selection.triton_path as selection_mod
    from rdfast import training
    from rdfast.config import train_settings

    dataset = "mnist:train=300,test=200"
    data = load_dataset(dataset, shared_data)
    torch.manual_seed(0)
    model = build_model("lenet5", data.input_shape, data.num_classes, 1.0)
    training.train(model, data, train_settings("mnist", "lenet5", epochs=1, batch_size=50))
    torch.save(model.state_dict(), tmp_path / "lenet5.pt")
    args = ["--model", "lenet5", "--checkpoint", tmp_path / "lenet5.pt", "--dataset", dataset,
            "--data-root", shared_data, "--strategy", "mp,up", "--ratios", "2,4",
            "--grad-batches", "2", "--batch-size", "50", "--save", "--no-progress"]  # fmt: skip
    assert invoke(*args, "--out", tmp_path / "cpu").exit_code == 0
    calls = []
    original = selection_mod.triton_masks
    monkeypatch.setattr(
        selection_mod, "triton_masks", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    monkeypatch.setenv("RDFAST_CUDA_PATH", "1")
    res = invoke(*args, "--out", tmp_path / "cuda")
    assert res.exit_code == 0, res.output
    assert len(calls) >= 2 * 2, calls  # every (strategy, t) selected by the Triton kernel
    cols = ["run_id", "step", "class", "correct", "recall", "accuracy", "remaining"]
    a, b = (
        pd.read_parquet(tmp_path / o / "records.parquet")[cols].sort_values(cols[:3])
        for o in ("cpu", "cuda")
    )
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    folders = sorted(
        p.relative_to(tmp_path / "cpu") for p in (tmp_path / "cpu").glob("pruned/*/t*")
    )
    assert len(folders) == 4
    for f in folders:
        ma, mb = load_masks(tmp_path / "cpu" / f), load_masks(tmp_path / "cuda" / f)
        assert ma.keys() == mb.keys() and any(m.dim() == 4 for m in ma.values())
        for k in ma:
            assert torch.equal(ma[k], mb[k]), (f, k)


def _api_worker(rank, world):
    import torch.distributed as dist

    layers = _whole_model()
    mine = torch.nn.Sequential(*[layers[i] for i in _SPLIT[world][rank]])
    masks = prune_module(mine, [2, 8], "mp", group=dist.group.WORLD)
    kept = _in_place(mine, dist.group.WORLD)
    weights = [m.weight.detach().clone() for m in mine]
    return {"masks": masks, "kept": kept, "weights": weights}


# Layers of one model, in rank order; integer weights: ties at every threshold.
_SPLIT = {3: [[0], [1, 2], [3]]}


def _whole_model():
    gen = torch.Generator().manual_seed(3)
    layers = [torch.nn.Linear(a, b) for a, b in ((30, 40), (40, 20), (20, 20), (20, 6))]
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(torch.randint(-6, 7, m.weight.shape, generator=gen).float())
    return layers


def _in_place(model, group):
    from rdfast.pruning.given_model import prune_in_place

    return prune_in_place(model, 4, "mp", group=group)


@pytest.mark.parametrize("world", [3])  # 2 and 4 processes: tests/kernels/test_distributed.py
def test_api_across_processes_equals_one_process(tmp_path, world):
    """prune_module and prune_in_place with a gloo group, the model's layers split over the
    processes: the union of their results equals one process pruning the whole model (and a
    numpy stable sort over the layers in rank order), ties included."""
    from tests import gloo

    results = gloo.run(_api_worker, world, tmp_path)
    whole = torch.nn.Sequential(*_whole_model())
    scores = [m.weight.detach().abs().numpy() for m in whole]
    total = sum(s.size for s in scores)
    for t in (2.0, 8.0):
        union = np.concatenate([m.numpy().ravel() for r in results for m in r["masks"][t].values()])
        want = np.concatenate([k.ravel() for k in stable_keep(scores, total - round(total / t))])
        np.testing.assert_array_equal(union, want)
    single = torch.nn.Sequential(*_whole_model())
    _in_place(single, None)
    got = [w for r in results for w in r["weights"]]
    for w, m in zip(got, single):
        np.testing.assert_array_equal(bits(w), bits(m.weight.detach()))
    assert sum(sum(r["kept"].values()) for r in results) == round(total / 4)


def test_streamed_nan_is_named(tmp_path):
    t = {"a.weight": torch.randn(30, 20), "b.weight": torch.randn(10, 10).half()}
    t["b.weight"][3, 4] = float("nan")
    write_checkpoint(tmp_path / "ckpt", t, [["a.weight"], ["b.weight"]])
    res = invoke("--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "out")
    assert res.exit_code == 2 and "b.weight: scores contain NaN" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_prune_needs_a_checkpoint(tmp_path):
    res = invoke("--out", tmp_path / "out")
    assert res.exit_code == 2 and "--checkpoint is needed" in res.output


def test_save_disk_full_exit_1_no_partial_model(given, tmp_path, monkeypatch):
    import safetensors.torch

    calls = []
    real = safetensors.torch.save_file

    def full_on_second_shard(tensors, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", full_on_second_shard)
    out = tmp_path / "out"
    res = invoke("--model", "mlp", "--checkpoint", given["sharded"], "--dataset", "digits",
                 "--ratios", "2", "--save", "--out", out, "--no-progress")  # fmt: skip
    assert res.exit_code == 1 and "No space left on device" in res.output, res.output
    assert not list((out / "pruned").rglob("t2*"))  # neither t2 nor t2.partial
