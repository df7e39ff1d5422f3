"""The experiment engine: train a dense model once, prune it with each strategy, record.

One *run* = (dataset, model, width, seed, strategy and its settings). All runs of one seed
branch from the same dense model, cached under a hash of what determines it, so strategy
comparisons are paired. Each run walks its ratios in order; after every step the state and
the records are written atomically, so a killed command loses at most the step in progress
and a rerun continues where it stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from rdfast.runs import store
from rdfast.config import (
    PRECISIONS,
    Experiment,
    check_strategies,
)
from rdfast.data import TensorData, load_dataset, normalize
from rdfast.runs.dense import DenseModels
from rdfast.errors import BadInput
from rdfast.kernels._backend import cuda_path, interpreting
from rdfast.mitigations import check_split
from rdfast.models import build_model, model_family, prunable_layers
from rdfast.pruning.strategies import (
    check_ratios,
)
from rdfast.runs.pruning_run import PruningRun, RunOutcome, environment, step_records  # noqa: F401
from rdfast.seeding import derive_seed
from rdfast.settings import run_key

DENSE_FORMAT = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise BadInput(f"unknown device {name!r}; choose from auto, cpu, cuda")
    return torch.device(name)


def resolve_precision(exp: Experiment, device_type: str) -> Experiment:
    """`exp` with its training precision resolved: auto is bf16 autocast on CUDA, fp32 on
    the CPU."""
    precision = exp.precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return replace(exp, train=replace(exp.train, precision=precision))


# ---------------------------------------------------------------------------- keys
# Functions of the settings alone, so a grid's driver names every run without loading data.


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


@dataclass
class Checked:
    """What `check_with_data` found: the data (on the CPU, normalized), a model built for
    it, its prunable layers and the normalization's record."""

    data: TensorData
    probe: torch.nn.Module
    layers: dict
    normalization: dict


def check_with_data(exp: Experiment) -> Checked:
    """Everything about `exp` that only its data and model can tell, checked once for
    `rdfast run` and for every sub-grid point of `rdfast grid` (before a task starts): the
    dataset and its subsets load, the constrained split can be drawn, the normalization fits
    the channels, the model takes the inputs, --exclude names its layers and leaves one,
    every ratio leaves a weight. BadInput, one line, on the first that fails."""
    data = load_dataset(exp.dataset, exp.data_root)
    if exp.prune.mitigation == "constrained":
        check_split(data, exp.prune.val_fraction)
    probe = build_model(exp.model, data.input_shape, data.num_classes, exp.width)
    data, normalization = normalize(data, exp.normalize, probe)
    try:  # a model that cannot take this data fails here, with a reason, not mid-run
        with torch.no_grad():
            probe.eval()(data.prepare(data.x_train[:2]))
    except RuntimeError as e:
        raise BadInput(
            f"model {exp.model} cannot take inputs of shape {data.input_shape}: "
            f"{' '.join(str(e).split())[:160]}"
        ) from None
    layers = prunable_layers(probe, exp.prune.exclude)
    check_ratios(sum(w.numel() for w in layers.values()), exp.prune.ratios)
    return Checked(data, probe, layers, normalization)


class Engine:
    def __init__(self, exp: Experiment, progress: bool | None = None, log=None):
        self.exp = exp
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg))
        self.data: TensorData | None = None
        self.dense_models = DenseModels(self)

    # ------------------------------------------------------------------ validation
    def prepare(self) -> None:
        """Validate every setting and load the data; nothing is written here."""
        exp = self.exp
        if exp.train is None:
            raise BadInput("training settings are missing")
        exp.train.validate()
        exp.prune.validate(exp.train)
        check_strategies(exp.strategies)
        if not exp.seeds:
            raise BadInput("no seeds given")
        self.device = resolve_device(exp.device)
        if exp.masked_kernels and self.device.type != "cuda" and not interpreting():
            raise BadInput("--masked-kernels needs a CUDA device (--device cuda)")
        if exp.masked_kernels and exp.compile:
            raise BadInput("--masked-kernels and --compile do not combine yet; choose one")
        if exp.precision not in ("auto", *PRECISIONS):
            raise BadInput(
                f"unknown precision {exp.precision!r}; choose from auto, {', '.join(PRECISIONS)}"
            )
        # The engine's own resolved copy: the caller's Experiment is left as it was given.
        self.exp = exp = resolve_precision(exp, self.device.type)
        checked = check_with_data(exp)
        data, self.normalization = checked.data, checked.normalization
        self.convolutional = any(isinstance(m, torch.nn.Conv2d) for m in checked.probe.modules())
        # channels_last pays on CUDA tensor cores for conv nets; on the CPU it would only
        # change the arithmetic order and with it the bit-identical records. RDFAST_CUDA_PATH
        # takes it on the CPU too, to check the CUDA code path without a GPU.
        self.channels_last = (self.device.type == "cuda" or cuda_path()) and self.convolutional
        data.channels_last = self.channels_last
        self.eval_batch = eval_batch(exp.model, self.device.type)
        self.data = data.to(self.device)
        self.out = store.check_out(exp.out)

    # ------------------------------------------------------------------ keys
    def dense_key(self, seed: int) -> dict:
        return dense_key(self.exp, seed, self.data.name, self.device.type, torch.get_num_threads())

    def run_settings(self, seed: int, strategy: str) -> dict:
        return run_settings(self.exp, self.dense_key(seed), strategy)

    # ------------------------------------------------------------------ pieces
    def _new_model(self, seed: int):
        torch.manual_seed(derive_seed(seed, "init"))
        model = build_model(
            self.exp.model, self.data.input_shape, self.data.num_classes, self.exp.width
        )
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _forward(self, model):
        """What training and evaluation call: the model, or its torch.compile'd form."""
        return torch.compile(model) if self.exp.compile else model

    def dense(self, seed: int) -> dict:
        return self.dense_models.get(seed)

    def _quiet(self):
        return None if self.progress is None else not self.progress

    # ------------------------------------------------------------------ one run
    def run_id(self, seed: int, strategy: str, settings: dict | None = None) -> str:
        settings = settings or self.run_settings(seed, strategy)
        return run_id(self.dense_key(seed), settings)

    def run_one(self, seed: int, strategy: str, bar) -> RunOutcome:
        return PruningRun(self, seed, strategy).run(bar)

    def execute(self) -> list[RunOutcome]:
        if self.data is None:
            self.prepare()
        exp = self.exp
        n_steps = len(exp.seeds) * len(exp.strategies) * len(exp.prune.ratios)
        outcomes = []
        queue, deferred = list(exp.seeds), set()
        todo = {seed: list(exp.strategies) for seed in exp.seeds}
        with tqdm(total=n_steps, desc="prune+retrain", unit="step", disable=self._quiet()) as bar:
            while queue:
                seed = queue.pop(0)
                while todo[seed]:
                    # While another process trains this seed's dense model, the seed's runs
                    # would only wait for it: once, the rest of them go to the back.
                    if (
                        queue
                        and seed not in deferred
                        and not self.dense_models.in_memory(seed)
                        and self.dense_models.elsewhere(seed)
                    ):
                        deferred.add(seed)
                        queue.append(seed)
                        break
                    outcomes.append(self.run_one(seed, todo[seed].pop(0), bar))
                else:
                    self.dense_models.forget(seed)  # its strategies are done: free the weights
                    # a write killed after the model was cached (e.g. its checksum's)
                    store.clear_temporaries(self.dense_models.path(seed).parent)
        store.consolidate(self.out)
        return outcomes
