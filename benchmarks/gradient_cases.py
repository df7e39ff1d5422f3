"""Cases of the GP/UP memory benchmark, each in a fresh process: a timm ViT-L/16 (303 M
parameters, random initialisation, 64 x 64 inputs, 10 classes), its gradient accumulated over
calibration batches, then pruned to t = 2 by UP (taylor). Prints one JSON line:

    gradient_s, gradient_peak_mb   the gradient pass (activations included; every case the same)
    prune_s, extra_peak_mb         the pruning alone: peak RSS during it minus RSS before it,
                                   with weights and gradients already resident
    masks_mb                       what of that is the masks the case returns (1 byte a weight)

    python -m benchmarks.gradient_cases CASE [BATCHES]
"""

from __future__ import annotations

import json
import sys
import time

from benchmarks.memory import reset_peak, status_mb

MODEL, IMAGE, CLASSES, BATCH, EPS = "vit_large_patch16_224", 64, 10, 4, 5e-4


def rdfast_in_place(model, grads):
    from rdfast.pruning.given_model import prune_in_place

    prune_in_place(model, 2.0, "up", grads=grads, eps=EPS)
    return 0


def rdfast_masks(model, grads):
    from rdfast.pruning.given_model import prune_module

    masks = prune_module(model, [2.0], "up", grads=grads, eps=EPS, apply=True)[2.0]
    return sum(m.numel() for m in masks.values())


def torch_global_unstructured(model, grads):
    """The peer's way to prune by a custom score: an importance_scores dict (the UP scores,
    computed by the caller), then weight_orig + weight_mask per layer."""
    from torch.nn.utils import prune

    from rdfast.models import prunable_layers

    modules = {n: m for n, m in model.named_modules() if n in prunable_layers(model)}
    w = {n: m.weight.detach() for n, m in modules.items()}
    scores = {
        (m, "weight"): (-w[n] * grads[n] + EPS * w[n] * w[n]).abs() for n, m in modules.items()
    }
    params = list(scores)
    total = sum(s.numel() for s in scores.values())
    prune.global_unstructured(
        params,
        pruning_method=prune.L1Unstructured,
        importance_scores=scores,
        amount=total - round(total / 2),
    )
    return sum(m.weight_mask.numel() for m in modules.values())


CASES = {
    "rdfast_prune_in_place": rdfast_in_place,
    "rdfast_prune_module": rdfast_masks,
    "torch_global_unstructured": torch_global_unstructured,
}


def main(case: str, batches: int = 2) -> None:
    import timm
    import torch
    from torch.nn import functional as F

    from rdfast.models import prunable_layers
    from rdfast.pruning.strategies import mean_gradients

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, img_size=IMAGE, num_classes=CLASSES)
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen), torch.randint(0, CLASSES, (BATCH,)))
        for _ in range(batches)
    ]
    layers = prunable_layers(model)
    reset_peak()
    start = time.perf_counter()
    grads = mean_gradients(model, layers, iter(data), F.cross_entropy)
    gradient_s = time.perf_counter() - start
    gradient_peak = status_mb("VmHWM")
    for p in model.parameters():  # what the case starts from: weights and their gradients
        p.requires_grad_(False)
    before = status_mb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    mask_bytes = CASES[case](model, grads)
    prune_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "parameters": sum(p.numel() for p in model.parameters()),
                "prunable": sum(w.numel() for w in layers.values()),
                "gradient_s": round(gradient_s, 2),
                "gradient_peak_mb": round(gradient_peak, 1),
                "rss_before_prune_mb": round(before, 1),
                "prune_s": round(prune_s, 2),
                "extra_peak_mb": round(status_mb("VmHWM") - before, 1),
                "masks_mb": round(mask_bytes / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
