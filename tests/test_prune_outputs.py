"""`rdfast prune` as users of other libraries meet it: pruned folders that load where the
input loaded (transformers, torchvision), 16-bit checkpoints selected exactly, reruns that
resume and never overwrite another input's output, the input normalization as a setting,
and the project's top-level folders out of other packages' names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.test_prune import bits, file_order, invoke, read_pruned, stable_keep, write_checkpoint

# --------------------------------------------------------------------------- names


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """`python -c code` in the repository root, as someone working in a clone runs it."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env})  # fmt: skip


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    res = _python(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=1, num_attention_heads=2, vocab_size=32))\n"
        "import kernels; print(kernels.__file__)"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert not res.stdout.strip().startswith(str(ROOT / "kernels")), res.stdout


def test_top_level_names_go_to_their_owners(tmp_path):
    """From the root, `import kernels` / `import cli` give another distribution's package
    when one is installed, and nothing (ModuleNotFoundError) when none is."""
    for name in ("kernels", "cli"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'someone else: {name}'\n")
    code = "import kernels, cli; print(kernels.OWNER); print(cli.OWNER)"
    res = _python(code, PYTHONPATH=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:2] == ["someone else: kernels", "someone else: cli"]
    res = _python("import cli")
    assert res.returncode == 1 and "ModuleNotFoundError: No module named 'cli'" in res.stderr
    res = _python("import rdfast.kernels, rdfast.cli.main; print(rdfast.kernels.prune_lowest)")
    assert res.returncode == 0 and "function prune_lowest" in res.stdout, res.stderr[-2000:]


# --------------------------------------------------------------------------- 16-bit keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_checkpoints_equal_a_stable_sort(tmp_path, dtype):
    """All-bf16 and all-fp16 checkpoints take the one-pass 16-bit selection: the kept
    weights equal a stable sort of the concatenated magnitudes, ties (integer values) in
    checkpoint order; -0.0 and inf are weights like the others; pruned weights are +-0."""
    gen = torch.Generator().manual_seed(3)
    t = {
        "a.weight": torch.randint(-9, 10, (1500, 1000), generator=gen).to(dtype),
        "b.weight": (torch.randn(37, 29, generator=gen) * 3).to(dtype),
        "c.weight": torch.randint(-3, 4, (11, 13), generator=gen).to(dtype),
        "c.bias": torch.randn(13, generator=gen).to(dtype),
    }
    t["b.weight"][0, :3] = torch.tensor([-0.0, float("inf"), -float("inf")])
    write_checkpoint(tmp_path / "ckpt", t, [["a.weight"], ["b.weight", "c.weight", "c.bias"]])
    out = tmp_path / "out"
    res = invoke("--checkpoint", tmp_path / "ckpt", "--ratios", "2,3,7.5", "--out", out,
                 "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    names = [n for n in file_order(tmp_path / "ckpt") if n != "c.bias"]
    scores = [t[n].float().abs().numpy() for n in names]
    total = sum(s.size for s in scores)
    summary = json.loads((out / "prune.json").read_text())
    for ratio, entry in zip((2, 3, 7.5), summary["ratios"]):
        got = read_pruned(out / f"t{ratio:g}")
        keep = stable_keep(scores, total - round(total / ratio))
        for n, k in zip(names, keep):
            np.testing.assert_array_equal(bits(got[n]), bits(t[n] * torch.from_numpy(k)))
        assert torch.equal(got["c.bias"], t["c.bias"])
        kept_scores = np.concatenate([s[k] for s, k in zip(scores, keep)])
        assert entry["threshold"] == float(kept_scores.min())  # the smallest kept |w|
        assert entry["remaining"] == round(total / ratio)


# --------------------------------------------------------------------------- outputs load


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LlamaForCausalLM in bf16 as transformers saves it: shards, index, config,
    generation config, and a tokenizer file and model card beside them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=300, dtype="bfloat16")  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(folder, max_shard_size="60KB")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a tiny model\n")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def test_pruned_transformers_checkpoint_loads_with_from_pretrained(llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    res = invoke("--checkpoint", llama, "--ratios", "2,4", "--include", "*proj.weight",
                 "--out", out, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    given = {}
    for f in sorted(llama.glob("*.safetensors")):
        given.update(load_file(str(f)))
    names = [n for n in file_order(llama) if n.endswith("proj.weight")]
    scores = [given[n].float().abs().numpy() for n in names]
    total = sum(s.size for s in scores)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    for ratio in (2, 4):
        folder = out / f"t{ratio}"
        for f in llama.iterdir():  # every file of the input, the non-weight ones unchanged
            assert (folder / f.name).is_file(), f.name
            if f.suffix != ".safetensors":
                assert (folder / f.name).read_bytes() == f.read_bytes(), f.name
        record = json.loads((folder / "prune.json").read_text())
        assert record["t"] == ratio and record["tensors"] == names
        pruned = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        keep = dict(zip(names, stable_keep(scores, total - round(total / ratio))))
        expected = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
        with torch.no_grad():
            for n, p in expected.named_parameters():
                if n in keep:
                    p.mul_(torch.from_numpy(keep[n]).to(p.dtype))
        got = dict(pruned.named_parameters())
        for n, p in expected.named_parameters():
            np.testing.assert_array_equal(bits(got[n].detach()), bits(p.detach()), err_msg=n)
        with torch.no_grad():
            assert torch.equal(pruned(ids).logits, expected(ids).logits)


def test_saved_torch_state_dict_loads_into_the_torchvision_model(tmp_path):
    """--model torchvision:NAME --save: the pruned model is a state dict under the input's
    name that the torchvision model loads, its weights those of the saved masks."""
    import torchvision

    from rdfast.pruning.given_model import load_masks
    from tests.official_formats import write_cifar10

    write_cifar10(tmp_path / "data")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    out = tmp_path / "out"
    res = invoke("--model", "torchvision:resnet18", "--checkpoint", tmp_path / "resnet18.pt",
                 "--dataset", "cifar10", "--data-root", tmp_path / "data", "--ratios", "4",
                 "--save", "--out", out, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    (folder,) = out.glob("pruned/*/t4")
    state = torch.load(folder / "resnet18.pt", weights_only=True)
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(state)  # strict: every name and shape
    masks = load_masks(folder)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(total / 4)
    given = model.state_dict()
    for name, m in masks.items():
        torch.testing.assert_close(state[f"{name}.weight"], given[f"{name}.weight"] * m,
                                   rtol=0, atol=0)  # fmt: skip


# --------------------------------------------------------------------------- reruns


@pytest.fixture
def small(tmp_path):
    gen = torch.Generator().manual_seed(0)
    t = {f"l{i}.weight": torch.randn(60, 50, generator=gen) for i in range(4)}
    write_checkpoint(tmp_path / "ckpt", t, [["l0.weight", "l1.weight"], ["l2.weight", "l3.weight"]])
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "toy"}\n')
    return tmp_path / "ckpt", t


def _state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_rerun_skips_what_is_complete_and_adds_new_ratios(small, tmp_path):
    ckpt, _ = small
    out = tmp_path / "out"
    assert invoke("--checkpoint", ckpt, "--ratios", "2,4", "--out", out).exit_code == 0
    before = _state(out / "t2")
    res = invoke("--checkpoint", ckpt, "--ratios", "2,4,8", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "prune.json").read_text())
    assert summary["already"] == [2.0, 4.0] and summary["pruned"] == [8.0]
    assert _state(out / "t2") == before  # not written again
    assert [r["t"] for r in summary["ratios"]] == [2.0, 4.0, 8.0]
    assert "already complete" in res.output


def test_rerun_repairs_a_damaged_folder(small, tmp_path):
    ckpt, _ = small
    out = tmp_path / "out"
    assert invoke("--checkpoint", ckpt, "--ratios", "2,4", "--out", out).exit_code == 0
    good = (out / "t4" / "model-00002-of-00002.safetensors").read_bytes()
    damaged = bytearray(good)
    damaged[-5] ^= 0xFF
    (out / "t4" / "model-00002-of-00002.safetensors").write_bytes(bytes(damaged))
    res = invoke("--checkpoint", ckpt, "--ratios", "2,4", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "t4/model-00002-of-00002.safetensors differs from its checksum" in res.output
    assert (out / "t4" / "model-00002-of-00002.safetensors").read_bytes() == good
    assert json.loads((out / "prune.json").read_text())["pruned"] == [4.0]


@pytest.mark.parametrize("change", ["another checkpoint", "other tensors"])
def test_rerun_with_another_input_is_refused_untouched(small, tmp_path, change):
    ckpt, t = small
    out = tmp_path / "out"
    assert invoke("--checkpoint", ckpt, "--ratios", "2", "--out", out).exit_code == 0
    before = _state(out)
    args = []
    if change == "another checkpoint":
        other = dict(t, **{"l0.weight": t["l0.weight"] * 2})
        write_checkpoint(tmp_path / "other", other, [list(other)])
        ckpt = tmp_path / "other"
    else:
        args = ["--exclude", "l0"]
    res = invoke("--checkpoint", ckpt, *args, "--ratios", "2,4", "--out", out)
    assert res.exit_code == 2 and f"holds t2 pruned from {change}" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert _state(out) == before


def test_shards_without_an_index_get_one(small, tmp_path):
    ckpt, t = small
    (ckpt / "model.safetensors.index.json").unlink()
    out = tmp_path / "out"
    res = invoke("--checkpoint", ckpt, "--ratios", "2", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    index = json.loads((out / "t2" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "l0.weight": "model-00001-of-00002.safetensors",
        "l1.weight": "model-00001-of-00002.safetensors",
        "l2.weight": "model-00002-of-00002.safetensors",
        "l3.weight": "model-00002-of-00002.safetensors",
    }
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in t.values())
    record = json.loads((out / "t2" / "prune.json").read_text())
    assert record["index"].startswith("written")
    assert (out / "t2" / "config.json").read_text() == '{"model_type": "toy"}\n'


@pytest.mark.parametrize("ratios", ["1.0000001", "2,1.00001"])
def test_a_ratio_that_prunes_nothing_is_one_line(small, tmp_path, ratios):
    res = invoke("--checkpoint", small[0], "--ratios", ratios, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "prunes no weight" in res.output or "strictly increasing" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- normalization


@pytest.fixture(scope="module")
def cifar_given(tmp_path_factory):
    """A small conv net and official-format CIFAR-10 files, the model's weights saved."""
    from rdfast.models import build_model
    from tests.official_formats import write_cifar10

    root = tmp_path_factory.mktemp("norm")
    write_cifar10(root / "data", per_batch=20, n_test=60)
    torch.manual_seed(0)
    model = build_model("lenet5", (3, 32, 32), 10, 1.0)
    torch.save(model.state_dict(), root / "lenet5.pt")
    return root, model


def _given_correct(out) -> pd.Series:
    rec = pd.read_parquet(out / "records.parquet")
    return rec[rec.step == 0].set_index("class")["correct"].sort_index()


@pytest.mark.parametrize(
    "spec, mean, std",
    [
        ("none", (0, 0, 0), (1, 1, 1)),
        ("0.5,0.4,0.3/0.2,0.25,0.3", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
    ],
)
def test_normalize_is_what_the_model_sees(cifar_given, tmp_path, spec, mean, std):
    """The given model's per-class correct counts equal those of an evaluation written here
    with the stated constants on the [0, 1] pixel scale; the manifest names them."""
    from tests.official_formats import read_cifar10_test

    root, model = cifar_given
    out = tmp_path / "out"
    res = invoke("--model", "lenet5", "--checkpoint", root / "lenet5.pt", "--dataset", "cifar10",
                 "--data-root", root / "data", "--ratios", "2", "--normalize", spec,
                 "--out", out, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    x, y = read_cifar10_test(root / "data")
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model.eval()((torch.from_numpy(x).float() / 255 - m) / s).argmax(1).numpy()
    expected = pd.Series(np.bincount(y[pred == y], minlength=10), index=range(10))
    assert _given_correct(out).tolist() == expected.tolist()
    (manifest,) = [json.loads(p.read_text()) for p in out.glob("runs/*/manifest.json")]
    assert manifest["normalization"]["normalize"] == spec
    assert manifest["normalization"]["mean"] == pytest.approx(list(mean))
    assert manifest["normalization"]["std"] == pytest.approx(list(std))
    assert manifest["settings"]["normalize"] == spec


def test_near_chance_warns_in_one_line(cifar_given, tmp_path):
    root, _ = cifar_given
    res = invoke("--model", "lenet5", "--checkpoint", root / "lenet5.pt", "--dataset", "cifar10",
                 "--data-root", root / "data", "--ratios", "2", "--out", tmp_path / "out",
                 "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "twice chance" in lines[0] and "--normalize dataset" in lines[0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0.5,0.5/0.2,0.2", "2 mean and 2 std values for 3 input channels"),
        ("0.5/0", "stds > 0"),
        ("mean", "give dataset, none, model or MEAN/STD"),
        ("model", "needs a timm: model"),
    ],
)
def test_bad_normalize_is_one_line(cifar_given, tmp_path, spec, message):
    root, _ = cifar_given
    res = invoke(
        "--model",
        "lenet5",
        "--checkpoint",
        root / "lenet5.pt",
        "--dataset",
        "cifar10",
        "--data-root",
        root / "data",
        "--normalize",
        spec,
        "--out",
        tmp_path / "out",
    )
    assert res.exit_code == 2 and message in res.output, res.output
    # (the other line: these small files are not the published CIFAR-10, which rdfast says)
    assert [line for line in res.output.splitlines() if "CIFAR-10 files" not in line] == [
        f"rdfast: error: {res.output.split('rdfast: error: ')[1].strip()}"
    ]
    assert not (tmp_path / "out").exists()


def test_truncated_saved_model_is_noticed_and_saved_again(tmp_path):
    """--save: a pruned model a full disk or a user truncated is named by `rdfast status`
    and written again by a rerun; a stale temporary file of the output is removed."""
    from click.testing import CliRunner

    from rdfast.cli.main import cli
    from rdfast.models import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save(build_model("mlp", (64,), 10, 0.5).state_dict(), ckpt)
    out = tmp_path / "out"
    args = ["--model", "mlp", "--width", "0.5", "--checkpoint", ckpt, "--dataset", "digits",
            "--ratios", "2,4", "--save", "--out", out, "--no-progress"]  # fmt: skip
    assert invoke(*args).exit_code == 0
    (saved,) = out.glob("pruned/*/t4")
    good = (saved / "mlp.pt").read_bytes()
    (saved / "mlp.pt").write_bytes(good[: len(good) // 2])
    status = CliRunner().invoke(cli, ["status", str(out)])
    assert status.exit_code == 1 and "damaged" in status.output, status.output
    assert "t4/mlp.pt differs from its checksum" in status.output
    stale = saved.parent.parent.parent / "runs" / saved.parent.name / ".step-2.npy.ab12.tmp"
    stale.write_bytes(b"half")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "t4/mlp.pt differs from its checksum: pruning it again" in res.output
    assert (saved / "mlp.pt").read_bytes() == good and not stale.exists()
    assert CliRunner().invoke(cli, ["status", str(out)]).exit_code == 0


def test_stale_temporary_files_of_a_streamed_prune_are_removed(small, tmp_path):
    out = tmp_path / "out"
    assert invoke("--checkpoint", small[0], "--ratios", "2", "--out", out).exit_code == 0
    (out / ".prune.json.k3j4.tmp").write_text("{")
    assert invoke("--checkpoint", small[0], "--ratios", "2", "--out", out).exit_code == 0
    assert not list(out.rglob("*.tmp"))


def test_normalize_model_takes_a_timm_models_pretrained_mean_and_std(cifar_given, tmp_path):
    timm = pytest.importorskip("timm")
    from tests.official_formats import read_cifar10_test

    root, _ = cifar_given
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "out"
    res = invoke("--model", "timm:test_resnet", "--checkpoint", tmp_path / "m.pt",
                 "--dataset", "cifar10", "--data-root", root / "data", "--ratios", "2",
                 "--normalize", "model", "--out", out, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    (manifest,) = [json.loads(p.read_text()) for p in out.glob("runs/*/manifest.json")]
    cfg = model.pretrained_cfg
    assert manifest["normalization"]["mean"] == pytest.approx(list(cfg["mean"]))
    assert manifest["normalization"]["std"] == pytest.approx(list(cfg["std"]))
    x, y = read_cifar10_test(root / "data")
    m, s = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        pred = model.eval()((torch.from_numpy(x).float() / 255 - m) / s).argmax(1).numpy()
    expected = np.bincount(y[pred == y], minlength=10)
    assert _given_correct(out).tolist() == expected.tolist()
