"""The experiment engine: train a dense model once, prune it with each strategy, record.

One *run* = (dataset, model, width, seed, strategy and its settings). All runs of one seed
branch from the same dense model, cached under a hash of what determines it, so strategy
comparisons are paired. Each run walks its ratios in order; after every step the state and
the records are written atomically, so a killed command loses at most the step in progress
and a rerun continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rdfast.config import PRECISIONS, Experiment
from rdfast.data import TensorData, load_dataset, normalize
from rdfast.errors import BadInput
from rdfast.kernels._backend import interpreting
from rdfast.mitigations import check_split
from rdfast.models import build_model, check_takes, is_convolutional, prunable_layers
from rdfast.pruning.strategies import check_ratios
from rdfast.runs import store
from rdfast.runs.context import RunContext, use_channels_last
from rdfast.runs.dense import DenseModels
from rdfast.runs.keys import eval_batch, resolve_precision
from rdfast.runs.lifecycle import RunOutcome
from rdfast.runs.pruning_run import PruningRun


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise BadInput(f"unknown device {name!r}; choose from auto, cpu, cuda")
    return torch.device(name)


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
    check_takes(probe, data, exp.model)
    layers = prunable_layers(probe, exp.prune.exclude)
    check_ratios(sum(w.numel() for w in layers.values()), exp.prune.ratios)
    return Checked(data, probe, layers, normalization)


class Engine:
    """`rdfast run`: validates an experiment (`prepare`, nothing written), then walks its seeds
    and strategies (`execute`), each run branching from its seed's dense model."""

    def __init__(self, exp: Experiment, progress: bool | None = None, log=None):
        self.exp = exp
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg))
        self.ctx: RunContext | None = None
        self.save_every = 60.0  # seconds of dense training a killed run may repeat, at most

    # ------------------------------------------------------------------ validation
    def prepare(self) -> None:
        """Validate every setting and load the data; nothing is written here."""
        exp = self.exp
        exp.validate()
        device = resolve_device(exp.device)
        if exp.masked_kernels and device.type != "cuda" and not interpreting():
            raise BadInput("--masked-kernels needs a CUDA device (--device cuda)")
        if exp.masked_kernels and exp.compile:
            raise BadInput("--masked-kernels and --compile do not combine yet; choose one")
        if exp.precision not in ("auto", *PRECISIONS):
            raise BadInput(
                f"unknown precision {exp.precision!r}; choose from auto, {', '.join(PRECISIONS)}"
            )
        # The engine's own resolved copy: the caller's Experiment is left as it was given.
        self.exp = exp = resolve_precision(exp, device.type)
        checked = check_with_data(exp)
        data, self.normalization = checked.data, checked.normalization
        channels_last = use_channels_last(device, is_convolutional(checked.probe))
        data.channels_last = channels_last
        self.ctx = RunContext(
            exp=exp,
            data=data.to(device),
            device=device,
            out=store.check_out(exp.out),
            channels_last=channels_last,
            eval_batch=eval_batch(exp.model, device.type),
            log=lambda msg: self.log(msg),  # self.log may be replaced after prepare
            progress=self.progress,
        )
        self.dense_models = DenseModels(self.ctx, self.save_every)

    # What callers read once prepared.
    data = property(lambda self: self.ctx.data)
    device = property(lambda self: self.ctx.device)
    out = property(lambda self: self.ctx.out)

    def dense_key(self, seed: int) -> dict:
        return self.ctx.dense_key(seed)

    def run_id(self, seed: int, strategy: str) -> str:
        return self.ctx.run_id(seed, strategy)

    def dense(self, seed: int) -> dict:
        """The seed's dense model, from OUT or trained now."""
        return self.dense_models.get(seed)

    # ------------------------------------------------------------------ runs
    def run_one(self, seed: int, strategy: str, bar) -> RunOutcome:
        return PruningRun(self.ctx, self.dense_models, seed, strategy).run(bar)

    def execute(self) -> list[RunOutcome]:
        if self.ctx is None:
            self.prepare()
        exp = self.exp
        n_steps = len(exp.seeds) * len(exp.strategies) * len(exp.prune.ratios)
        outcomes = []
        queue, deferred = list(exp.seeds), set()
        todo = {seed: list(exp.strategies) for seed in exp.seeds}
        with tqdm(total=n_steps, desc="prune+retrain", unit="step", disable=self.ctx.quiet) as bar:
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
