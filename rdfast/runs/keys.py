"""The keys that name dense models and runs: functions of the settings alone, so `run` and a
grid's driver (which names every run without loading data) compute the same ids, and
`prune --dataset` names its runs by the same rules (its dense model: the given checkpoint).
"""

from __future__ import annotations

from dataclasses import asdict, replace

from rdfast.config import Experiment
from rdfast.models import model_family
from rdfast.runs import store
from rdfast.settings import run_key

DENSE_FORMAT = 1


def resolve_precision(exp: Experiment, device_type: str) -> Experiment:
    """`exp` with its training precision resolved: auto is bf16 autocast on CUDA, fp32 on
    the CPU."""
    precision = exp.precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return replace(exp, train=replace(exp.train, precision=precision))


# Test images evaluated at a time. Conv nets on the CPU get 256: oneDNN runs ResNet-20 on
# batches of 4,096 3-5x slower than on 256 (AMD EPYC, one thread: 95-131 against 471-485
# img/s, 2026-12-07). The batch can move the last bits of the logits, so a batch other than
# the default is part of the dense key (every earlier key stays as it was).
EVAL_BATCH = 4096
EVAL_BATCH_CPU_CONV = 256


CONV_FAMILIES = ("lenet5", "resnet", "vgg", "timm", "torchvision")


def eval_batch(model: str, device_type: str) -> int:
    """From the model's name alone (a grid computes keys without building models): the
    built-in conv nets and timm/torchvision models; a model a plugin registers keeps the
    default."""
    conv = model_family(model) in CONV_FAMILIES
    return EVAL_BATCH_CPU_CONV if device_type == "cpu" and conv else EVAL_BATCH


def dense_key(exp: Experiment, seed: int, data_name: str, device_type: str, threads: int) -> dict:
    """What determines the dense model of `seed` (`exp` with its precision resolved;
    `data_name`: the dataset's canonical spec)."""
    return {
        "format": DENSE_FORMAT,
        "dataset": data_name,
        "model": exp.model,
        "width": exp.width,
        "seed": seed,
        "train": asdict(exp.train),
        "rewind_epoch": exp.prune.rewind_epoch if exp.prune.retrain == "rewind" else None,
        "device": device_type,
        # CPU reductions split work by thread: 1 and 2 threads give losses that differ in
        # the 7th digit, so the thread count is part of what a CPU model is.
        **({"threads": threads} if device_type == "cpu" else {}),
        # Models normalized by the train split's statistics keep the ids they had before
        # the setting existed; any other normalization changes the arithmetic: keyed.
        **({"normalize": exp.normalize} if exp.normalize != "dataset" else {}),
        **({"eval_batch": b} if (b := eval_batch(exp.model, device_type)) != EVAL_BATCH else {}),
    }


def run_settings(exp: Experiment, dense: dict, strategy: str) -> dict:
    """What determines a run besides its dense model (`dense`: its key): every PruneSettings
    field (through its key function), the strategy and the kernels it trains with."""
    p = exp.prune
    return {
        "dense_id": store.stable_hash(dense),
        "strategy": strategy,
        **run_key(p, exp.train, strategy),
        "masked_kernels": exp.masked_kernels,
        # Rewound survivors train from the rewind epoch to the end of the schedule, the
        # learning rate resuming there (OpenLTH's lottery loop); the key is absent for
        # fine-tuning, whose run ids stay as they were.
        **({"rewind_schedule": "resume"} if p.retrain == "rewind" else {}),
    }


def run_id(dense: dict, settings: dict) -> str:
    """A run's id: the hash of its dense model's key, its settings and the records format."""
    return store.stable_hash({"dense": dense, **settings, "records": store.RECORDS_VERSION})


# ---------------------------------------------------------------------------- prune
GIVEN_SOURCE = "checkpoint"  # in every given-model run's settings: what the dense model is


def given_dense_id(sha256: str, model: str, width: float) -> str:
    """The dense model of `rdfast prune --dataset`: the checkpoint (by its sha256) as built."""
    return store.stable_hash({"checkpoint": sha256, "model": model, "width": width})


def given_run_settings(job, strategy: str, dense_id: str, device_type: str, batch: int) -> dict:
    """What determines a run of a given model (`job`: a PruneJob) besides its seed and data;
    `batch`: the evaluation batch."""
    j = job
    gradient = strategy in ("gp", "up")
    finetune = j.finetune_epochs > 0
    return {
        "dense_id": dense_id,
        "strategy": strategy,
        "source": GIVEN_SOURCE,
        "schedule": "one-shot",
        "ratios": list(j.ratios),
        "saliency": j.saliency if gradient else "none",
        "grad_batches": j.grad_batches if gradient else None,
        "eps": j.up_eps if strategy == "up" else None,
        "retrain": "finetune" if finetune else "none",
        "finetune_epochs": j.finetune_epochs,
        "finetune_lr": j.finetune_lr if finetune else None,
        "weight_decay": j.weight_decay if finetune else None,
        "batch_size": j.batch_size,
        "exclude": list(j.exclude),
        "device": device_type,
        # keyed when not the default, so the ids of earlier runs stay as they were
        **({"normalize": j.normalize} if j.normalize != "dataset" else {}),
        **({"eval_batch": batch} if batch != EVAL_BATCH else {}),
    }


def given_run_id(settings: dict, data_name: str, seed: int) -> str:
    return store.stable_hash(
        {**settings, "dataset": data_name, "seed": seed, "records": store.RECORDS_VERSION}
    )
