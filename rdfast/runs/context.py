"""What the dense models and runs of one experiment share, fixed once the engine has
validated the experiment and loaded its data: handed down instead of the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rdfast.config import Experiment
from rdfast.data import TensorData
from rdfast.kernels._backend import cuda_path
from rdfast.models import build_model
from rdfast.runs import keys
from rdfast.seeding import derive_seed


def use_channels_last(device: torch.device, convolutional: bool) -> bool:
    """channels_last pays on CUDA tensor cores for conv nets; on the CPU it would only change
    the arithmetic order and with it the bit-identical records (and buys 1.2x on an AVX2
    EPYC: benchmarks/README.md). RDFAST_CUDA_PATH takes it on the CPU too, to check the CUDA
    code path without a GPU. The same choice for `rdfast run` and `rdfast prune`."""
    return (device.type == "cuda" or cuda_path()) and convolutional


@dataclass(frozen=True)
class RunContext:
    exp: Experiment  # precision resolved
    data: TensorData  # on `device`, normalized
    device: torch.device
    out: Path  # OUT, checked
    channels_last: bool  # models and batches in channels_last (CUDA conv nets)
    eval_batch: int  # test images evaluated at a time (keyed where not the default)
    log: Callable[[str], None]  # progress lines
    progress: bool | None = None  # bars: None = where the terminal shows them

    @property
    def quiet(self) -> bool | None:
        """tqdm's `disable`: None lets tqdm decide."""
        return None if self.progress is None else not self.progress

    # ------------------------------------------------------------------ keys
    def dense_key(self, seed: int) -> dict:
        return keys.dense_key(
            self.exp, seed, self.data.name, self.device.type, torch.get_num_threads()
        )

    def run_settings(self, seed: int, strategy: str) -> dict:
        return keys.run_settings(self.exp, self.dense_key(seed), strategy)

    def run_id(self, seed: int, strategy: str, settings: dict | None = None) -> str:
        settings = settings or self.run_settings(seed, strategy)
        return keys.run_id(self.dense_key(seed), settings)

    # ------------------------------------------------------------------ models
    def new_model(self, seed: int) -> torch.nn.Module:
        """The seed's freshly initialized model on the device (the same draws every time)."""
        torch.manual_seed(derive_seed(seed, "init"))
        model = build_model(
            self.exp.model, self.data.input_shape, self.data.num_classes, self.exp.width
        )
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def forward(self, model):
        """What training and evaluation call: the model, or its torch.compile'd form."""
        return torch.compile(model) if self.exp.compile else model
