"""The CUDA code path, end to end, on the CPU.

`RDFAST_CUDA_PATH=1` makes the engine do what it does on a GPU -- conv nets and their masks
in channels_last, `auto` resolving to the Triton kernels for selection and the confusion
matrix (here through Triton's interpreter) -- while the arithmetic of training stays the
CPU's. Masks and confusion matrices must then equal a plain CPU run's bit for bit (fp32): a
kernel that pairs a score with another weight's mask bit, or counts a prediction in the wrong
cell, shows up here.

LeNet-5 trains to the same bits in either layout, so it is compared with the plain CPU run.
ResNet-20's batch norm and 3x3 convolutions do not (channels_last changes the CPU's
summation order), so its reference is the same layout with the torch kernels
(`RDFAST_KERNELS=torch`): only the kernels differ between the two runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import rdfast.kernels.confusion as confusion_mod
import rdfast.kernels.selection.triton_path as selection_mod
from rdfast.config import Experiment, PruneSettings, train_settings
from rdfast.kernels import confusion_matrix
from rdfast.kernels._backend import interpreting
from rdfast.models import build_model, prunable_layers
from rdfast.pruning.strategies import prune_to
from rdfast.runs import store
from rdfast.runs.engine import Engine
from tests.official_formats import write_cifar10

pytestmark = pytest.mark.slow
on_cpu_through_the_interpreter = pytest.mark.skipif(
    not interpreting(), reason="emulates CUDA on the CPU: needs TRITON_INTERPRET=1"
)


def experiment(out, dataset, model, data_root):
    return Experiment(
        dataset=dataset,
        model=model,
        # Not 0.25: oneDNN's AVX2 1x1-convolution backward (torch 2.14, AMD EPYC without
        # AVX-512) never returns for ResNet-20 at widths up to 0.3 in channels_last.
        width=0.5 if model == "resnet20" else 1.0,
        seeds=(0,),
        strategies=("mp", "up", "rp"),
        train=train_settings(dataset.split(":")[0], epochs=1, batch_size=50),
        prune=PruneSettings(ratios=(2.0, 4.0), finetune_epochs=1, grad_batches=2),
        device="cpu",
        data_root=data_root,
        out=out,
    )


def run(tmp_path, name, dataset, model, data_root):
    eng = Engine(experiment(tmp_path / name, dataset, model, data_root), progress=False)
    outcomes = eng.execute()
    assert [o.status for o in outcomes] == ["complete"] * 3
    return eng


def saved(out):
    """Per run: the masks of its last step, and the confusion matrix of every step."""
    result = {}
    for run_dir in sorted((out / "runs").iterdir()):
        state = store.load_torch(run_dir / "step-2.pt")
        cms = [np.load(run_dir / f"step-{i}.npy") for i in range(3)]
        result[run_dir.name] = (state["masks"], cms)
    return result


@pytest.fixture
def cifar10(tmp_path, monkeypatch):
    monkeypatch.setenv("RDFAST_OFFLINE", "1")
    return write_cifar10(tmp_path / "data", per_batch=60, n_test=200)


@on_cpu_through_the_interpreter
@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_cuda_path_equals_cpu_path(tmp_path, monkeypatch, shared_data, cifar10, model):
    if model == "lenet5":
        dataset, root = "mnist:train=300,test=200", shared_data
    else:
        dataset, root = "cifar10", tmp_path / "data"
    with monkeypatch.context() as m:
        if model == "resnet20":
            m.setenv("RDFAST_CUDA_PATH", "1")
            m.setenv("RDFAST_KERNELS", "torch")
        reference = run(tmp_path, "cpu", dataset, model, root)
    assert reference.ctx.channels_last == (model == "resnet20")

    calls = {"selection": 0, "confusion": 0}
    for mod, fn, key in (
        (selection_mod, "triton_masks", "selection"),
        (confusion_mod, "_confusion_kernel", "confusion"),
    ):
        original = getattr(mod, fn)

        class Counting:
            def __init__(self, f, k):
                self.f, self.k = f, k

            def __call__(self, *a, **kw):
                calls[self.k] += 1
                return self.f(*a, **kw)

            def __getitem__(self, grid):
                calls[self.k] += 1
                return self.f[grid]

        monkeypatch.setattr(mod, fn, Counting(original, key))
    monkeypatch.setenv("RDFAST_CUDA_PATH", "1")
    cuda = run(tmp_path, "cuda-path", dataset, model, root)
    assert cuda.ctx.channels_last
    assert calls["selection"] >= 3 * 2 and calls["confusion"] > 0, calls

    a, b = saved(tmp_path / "cpu"), saved(tmp_path / "cuda-path")
    assert a.keys() == b.keys()
    conv_masks = 0
    for run_id in a:
        (masks_a, cms_a), (masks_b, cms_b) = a[run_id], b[run_id]
        for name in masks_a:
            m = masks_b[name]
            if m.dim() == 4:
                conv_masks += 1
                assert m.is_contiguous(memory_format=torch.channels_last) or m.shape[1] == 1
            assert torch.equal(masks_a[name], m), (run_id, name)
        for i, (x, y) in enumerate(zip(cms_a, cms_b)):
            np.testing.assert_array_equal(x, y, err_msg=f"{run_id} step {i}")
    assert conv_masks > 0
    cols = ["run_id", "step", "class", "recall", "accuracy", "remaining"]
    ra = store.load_records(tmp_path / "cpu")[cols].sort_values(cols[:3]).reset_index(drop=True)
    rb = store.load_records(tmp_path / "cuda-path")[cols].sort_values(cols[:3])
    pd.testing.assert_frame_equal(ra, rb.reset_index(drop=True))


@pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(), reason="needs a GPU and compiled kernels"
)
@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_gpu_selection_and_confusion_equal_the_cpu(model):
    """On a real GPU: the same weights, gradients and masks, pruned on CUDA (channels_last,
    compiled Triton kernels) and on the CPU (torch path), give the same masks bit for bit at
    every step; the same logits give the same confusion matrix."""
    shape, classes = ((1, 28, 28), 10) if model == "lenet5" else ((3, 32, 32), 100)
    torch.manual_seed(0)
    net = build_model(model, shape, classes, 0.25 if model == "resnet20" else 1.0)
    x = torch.randn(64, *shape)
    y = torch.randint(0, classes, (64,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    cpu = prunable_layers(net)
    grads = {k: w.grad.detach().clone() for k, w in cpu.items()}
    dense = {k: w.detach().clone() for k, w in cpu.items()}

    def on_gpu(t):
        t = t.detach().cuda()
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    for strategy in ("mp", "up", "rp", "rp-layer"):
        layers_cpu = {k: torch.nn.Parameter(w.clone()) for k, w in dense.items()}
        layers_gpu = {k: torch.nn.Parameter(on_gpu(w)) for k, w in dense.items()}
        masks_cpu = {k: torch.ones_like(w, dtype=torch.bool) for k, w in layers_cpu.items()}
        masks_gpu = {k: torch.ones_like(w, dtype=torch.bool) for k, w in layers_gpu.items()}
        for t in (2.0, 4.0, 16.0):
            kw = dict(form="taylor", eps=5e-4, seed_parts=(0, t, "rp"))
            masks_cpu = prune_to(
                layers_cpu, masks_cpu, t, strategy, grads=grads, dense_weights=dense, **kw
            )
            masks_gpu = prune_to(
                layers_gpu,
                masks_gpu,
                t,
                strategy,
                grads={k: on_gpu(g) for k, g in grads.items()},
                dense_weights={k: on_gpu(w) for k, w in dense.items()},
                **kw,
            )
            for k in masks_cpu:
                assert torch.equal(masks_cpu[k], masks_gpu[k].cpu()), (strategy, t, k)
    with torch.no_grad():
        logits = net.eval()(torch.randn(5000, *shape))
    targets = torch.randint(0, classes, (5000,))
    expected = confusion_matrix(logits, targets, classes, backend="torch")
    got = confusion_matrix(logits.cuda(), targets.cuda(), classes)
    assert torch.equal(got.cpu(), expected)
