"""Settings of an experiment as dataclasses, with per-dataset presets that flags override."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from rdfast.errors import BadInput
from rdfast.settings import (
    OMIT,
    parse_floats,
    parse_names,
    parse_seeds,
    setting,
    setting_like,
)

# rp is global random pruning; rp-layer keeps MP's per-layer densities (OpenLTH's
# `randomly_prune` default, the authors' random baseline). `all` = the paper's four.
STRATEGIES = ("mp", "gp", "up", "rp", "rp-layer", "cs")
PAPER_STRATEGIES = ("mp", "gp", "up", "rp")
STRATEGY_ORDER = {s: i for i, s in enumerate(STRATEGIES)}  # the order tables and plots use
RETRAIN_MODES = ("finetune", "rewind")
# What retraining minimizes after each pruning step (rdfast/mitigations.py): cross-entropy
# alone (plain), distillation from the run's dense model (kd), Balancing Act's constrained
# excess accuracy gap (ceag), or rdfast's own recall-constrained variant (constrained).
MITIGATIONS = ("plain", "kd", "constrained", "ceag")


# alpha divides by the accuracy: near chance its slope and interval mean nothing (global
# random pruning on digits reaches 0.11 and 0.10 at t = 32 and 64, chance 0.10). `analyze`
# shows alpha's marks only where a group's mean accuracy is above DEFAULT_FLOOR x chance
# (chance = 1 / classes), never above halfway from chance to 1 (so a two-class task is not
# hidden whole): twice chance is 0.2 on ten classes, 0.02 on a hundred, 0.75 on two.
DEFAULT_FLOOR = 2.0


# The model a dataset gets when --model is left out, as OpenLTH's defaults do: a CIFAR
# ResNet on 32 x 32 colour images, LeNet-300-100 elsewhere.
DEFAULT_MODELS = {"cifar10": "resnet20", "cifar100": "resnet20", "svhn": "resnet20"}


def default_model(dataset: str) -> str:
    """The default model of a dataset spec (NAME[:options])."""
    return DEFAULT_MODELS.get(dataset.split(":", 1)[0].strip().lower(), "mlp")


def _when(mitigation: str):
    """Key function of a mitigation's own settings: in the key of its runs only (left out of
    the others', whose ids stay as they were before mitigations existed)."""
    return lambda v, run: v if run.mitigation == mitigation else OMIT


def parse_strategies(text: str) -> tuple[str, ...]:
    """`all`, or a comma list of strategy names."""
    if text.strip() == "all":
        return PAPER_STRATEGIES
    return check_strategies(parse_names(text), repr(text))


def check_strategies(names, given: str = "(none)") -> tuple[str, ...]:
    """The strategies asked for, or one line naming the unknown ones (`given`: as typed)."""
    names = tuple(names)
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        choices = ", ".join(STRATEGIES)
        raise BadInput(f"unknown strategy {', '.join(bad) or given}; choose from {choices} or all")
    return names


NORMALIZE_HELP = (
    "Input normalization the model expects, per channel: dataset (the train split's mean "
    "and std), none (pixels scaled to [0, 1], other inputs as stored), model (a timm "
    "model's pretrained mean/std), or MEAN/STD as comma lists, one value a channel or one "
    "for all, on the [0, 1] pixel scale (0.4914,0.4822,0.4465/0.247,0.243,0.261)."
)

SCHEDULES = ("cosine", "step")
PRECISIONS = ("fp32", "bf16")
DEFAULT_RATIOS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass(frozen=True)
class TrainSettings:
    """Dense training: SGD with momentum and weight decay eps, per-epoch lr schedule."""

    epochs: int = setting(help="Dense training epochs", preset=True, kind=int)
    lr: float = setting(help="Learning rate of dense training", preset=True, kind=float)
    batch_size: int = setting(help="Training batch size", preset=True, kind=int)
    weight_decay: float = setting(help="Weight decay eps of SGD", preset=True, kind=float)
    momentum: float = setting(0.9, cli=False)
    schedule: str = setting("cosine", "Learning-rate schedule.", choices=("cosine", "step"))
    # fp32, or bf16 autocast (the default on CUDA): set from the experiment's --precision
    precision: str = setting("fp32", cli=False)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise BadInput(
                f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}"
            )
        if self.epochs < 1:
            raise BadInput(f"--epochs must be >= 1, got {self.epochs}")
        if not 0 < self.lr < math.inf:
            raise BadInput(f"--lr must be > 0 and finite, got {self.lr}")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 <= self.weight_decay < math.inf:
            raise BadInput(f"--weight-decay must be >= 0 and finite, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise BadInput(
                f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}"
            )


# A "-max" form scores each weight by its largest score over the classes' own mean gradients
# (`pruning.strategies.class_max_scores`) instead of the mean gradient's score.
CLASS_MAX = "-max"


def _saliency_forms() -> tuple[str, ...]:
    from rdfast.kernels import SALIENCY_FORMS

    return (*SALIENCY_FORMS, *(f + CLASS_MAX for f in SALIENCY_FORMS))


@dataclass(frozen=True)
class PruneSettings:
    """How the ratios are reached and how the network recovers after each step."""

    ratios: tuple[float, ...] = setting(
        DEFAULT_RATIOS,
        "Pruning ratios t (total/remaining weights), > 1, strictly increasing.",
        parse=parse_floats,
        shown="2,4,8,16,32,64",
    )
    saliency: str = setting(
        "taylor",
        "Form of the gp/up scores: taylor |w*g|, |-w*g+eps*w^2|; sum |g|, |g|+eps*|w|; "
        "taylor-max, sum-max: per weight the largest such score over the classes' own mean "
        "gradients, so a weight one class needs is kept (after Tran et al. 2022).",
        choices=_saliency_forms,
        key=lambda v, run: v if run.uses_gradient else "none",
    )
    grad_batches: int = setting(
        16,
        "Training batches averaged for the gradient of gp/up (1 = authors' code), and over "
        "which cs measures each class's importance.",
        key=lambda v, run: v if run.calibrates else None,
    )
    up_eps: float | None = setting(
        None,
        "eps of UP = GP + eps*MP [the weight decay].",
        kind=float,
        key=lambda v, run: run.prune.eps(run.train) if run.strategy == "up" else None,
        key_name="eps",
    )
    retrain: str = setting(
        "finetune",
        "After each pruning step: fine-tune, or rewind to --rewind-epoch k and retrain "
        "from epoch k to the end of the schedule (OpenLTH's lottery loop).",
        choices=RETRAIN_MODES,
    )
    finetune_epochs: int = setting(
        5,
        "Epochs of fine-tuning after each pruning step",
        preset=True,
        kind=int,
        key=lambda v, run: v if run.finetunes else None,
    )
    finetune_lr: float | None = setting(
        None,
        "Fine-tuning learning rate [lr / 10].",
        kind=float,
        key=lambda v, run: run.prune.finetune_rate(run.train) if run.finetunes else None,
    )
    rewind_epoch: int = setting(
        1,
        "Dense epoch whose weights the survivors are rewound to (--retrain rewind).",
        key=lambda v, run: v if run.rewinds else None,
    )
    exclude: tuple[str, ...] = setting(
        (), "Comma list of layers never pruned, e.g. fc3.", parse=parse_names, shown=""
    )
    mitigation: str = setting(
        "plain",
        "What retraining minimizes: plain cross-entropy; kd, distillation from the run's "
        "dense model; ceag, Balancing Act (Hashemizadeh et al. 2024): one multiplier per "
        "class on its excess accuracy gap, measured on the training batches; constrained, "
        "rdfast's earlier variant on the excess recall drop of a held-out split (kept for "
        "the mitigations spec: on Fashion-MNIST it lowers alpha at a cost of up to 1.2 "
        "points of accuracy; prefer ceag).",
        choices=MITIGATIONS,
        key=lambda v, run: OMIT if v == "plain" else v,
    )
    kd_weight: float = setting(
        0.9,
        "kd: weight w of the distillation term, (1-w)*CE + w*T^2*KL(dense || pruned).",
        key=_when("kd"),
    )
    kd_temperature: float = setting(
        4.0, "kd: softmax temperature T of both models' outputs.", key=_when("kd")
    )
    constraint_eps: float = setting(
        0.01,
        "constrained: tolerance of each class's excess recall drop "
        "(R_1 - R_t) - (A_1 - A_t) on the validation split.",
        key=_when("constrained"),
    )
    multiplier_lr: float = setting(
        1.0,
        "constrained: step size of the multipliers' gradient ascent (10 updates per epoch).",
        key=_when("constrained"),
    )
    val_fraction: float = setting(
        0.1,
        "constrained: share of the training set held out of retraining, stratified and "
        "seeded by the run's seed, on which the constraints are measured.",
        key=_when("constrained"),
    )
    ceag_tolerance: float = setting(
        0.1,
        "ceag: tolerance of each class's excess accuracy gap (A_dense,c - A_c) - (A_dense - A) "
        "(0.1: Balancing Act's CIFAR setting).",
        key=_when("ceag"),
    )
    dual_lr: float = setting(
        0.01,
        "ceag: step size of the multipliers' projected ascent, one step per batch "
        "(1e-2: Balancing Act's CIFAR setting).",
        key=_when("ceag"),
    )
    ceag_memory: int = setting(
        40,
        "ceag: predictions per class in the buffer the training accuracies are measured on "
        "(a class's constraint counts once its buffer is full).",
        key=_when("ceag"),
    )

    def validate(self, train: TrainSettings) -> None:
        r = self.ratios
        if not r:
            raise BadInput("--ratios is empty")
        if any(not 1 < t < math.inf for t in r):
            raise BadInput(f"every ratio must be > 1 (t = 1 is the dense model), got {list(r)}")
        if any(b <= a for a, b in zip(r, r[1:])):
            raise BadInput(f"--ratios must be strictly increasing, got {list(r)}")
        if self.saliency not in _saliency_forms():
            raise BadInput(f"unknown saliency form {self.saliency!r}; choose from "
                           f"{', '.join(_saliency_forms())}")  # fmt: skip
        if self.grad_batches < 1:
            raise BadInput(f"--grad-batches must be >= 1, got {self.grad_batches}")
        if self.up_eps is not None and not 0 <= self.up_eps < math.inf:
            raise BadInput(f"--up-eps must be >= 0 and finite, got {self.up_eps}")
        if self.retrain not in RETRAIN_MODES:
            raise BadInput(f"unknown retrain mode {self.retrain!r}; choose from finetune, rewind")
        if self.finetune_epochs < 0:
            raise BadInput(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        if self.finetune_lr is not None and not 0 < self.finetune_lr < math.inf:
            raise BadInput(f"--finetune-lr must be > 0 and finite, got {self.finetune_lr}")
        if self.mitigation not in MITIGATIONS:
            raise BadInput(
                f"unknown mitigation {self.mitigation!r}; choose from {', '.join(MITIGATIONS)}"
            )
        ranges = {
            "--kd-weight must lie in [0, 1]": (self.kd_weight, 0 <= self.kd_weight <= 1),
            "--kd-temperature must be > 0 and finite": (
                self.kd_temperature, 0 < self.kd_temperature < math.inf
            ),
            "--constraint-eps must lie in [0, 1)": (
                self.constraint_eps, 0 <= self.constraint_eps < 1
            ),
            "--multiplier-lr must be > 0 and finite": (
                self.multiplier_lr, 0 < self.multiplier_lr < math.inf
            ),
            "--val-fraction must lie in (0, 0.5]": (
                self.val_fraction, 0 < self.val_fraction <= 0.5
            ),
            "--ceag-tolerance must lie in [0, 1)": (
                self.ceag_tolerance, 0 <= self.ceag_tolerance < 1
            ),
            "--dual-lr must be > 0 and finite": (self.dual_lr, 0 < self.dual_lr < math.inf),
            "--ceag-memory must be >= 1": (self.ceag_memory, self.ceag_memory >= 1),
        }  # fmt: skip
        for what, (value, ok) in ranges.items():
            if not ok:
                raise BadInput(f"{what}, got {value}")
        if self.retrain == "rewind" and not 0 <= self.rewind_epoch <= train.epochs:
            raise BadInput(
                f"--rewind-epoch must lie in 0..{train.epochs} (the dense epochs), "
                f"got {self.rewind_epoch}"
            )

    def eps(self, train: TrainSettings) -> float:
        return train.weight_decay if self.up_eps is None else self.up_eps

    def finetune_rate(self, train: TrainSettings) -> float:
        return train.lr / 10 if self.finetune_lr is None else self.finetune_lr


@dataclass
class Experiment:
    """Everything one `rdfast run` command asks for (with `train` and `prune`)."""

    dataset: str = setting(
        "digits",
        "Dataset name, optionally with options: NAME[:key=value,...] (see `rdfast datasets`).",
    )
    model: str | None = setting(
        None,
        "Model: mlp, lenet5, resnet20/32/44/56/110, vgg11, vgg16, timm:NAME, torchvision:NAME "
        "[resnet20 on cifar10, cifar100 and svhn; mlp (LeNet-300-100) elsewhere].",
        kind=str,
    )
    width: float = setting(1.0, "Width multiplier of the model's layers.")
    seeds: tuple[int, ...] = setting(
        (0, 1, 2, 3, 4),
        "Replicate seeds: a range 0-4, a list 0,2,5, or both.",
        parse=parse_seeds,
        shown="0-4",
    )
    strategies: tuple[str, ...] = setting(
        PAPER_STRATEGIES,
        "Pruning strategies: mp, gp, up, rp (global random), rp-layer (random at the "
        "per-layer densities magnitude pruning gives the same dense model), a comma list, or "
        "all (mp,gp,up,rp).",
        flag="--strategy",
        parse=parse_strategies,
        shown="all",
    )
    train: TrainSettings | None = None
    prune: PruneSettings = field(default_factory=PruneSettings)
    device: str = setting("auto", "Where to train.", choices=("auto", "cpu", "cuda"))
    data_root: Path | None = setting(
        None, "Folder of downloaded datasets [$RDFAST_DATA or ~/.cache/rdfast/data].", kind=Path
    )
    out: Path = setting(Path("runs"), "Experiment folder: records, manifests, checkpoints.")
    masked_kernels: bool = setting(
        False, "Run pruned Linear layers through the masked-linear Triton kernel (CUDA)."
    )
    precision: str = setting(
        "auto",
        "Training arithmetic: bf16 autocast on CUDA with auto, fp32 on the CPU.",
        choices=("auto", *PRECISIONS),
    )
    compile: bool = setting(False, "torch.compile the model (CUDA; first steps slower).")
    normalize: str = setting(
        "dataset",
        NORMALIZE_HELP,
    )
    preset: str = setting(
        "paper",
        "Where the training settings left out come from: paper (each dataset's recipe; conv "
        "nets on CIFAR/SVHN as in OpenLTH, 160 epochs) or cpu (conv nets on CIFAR/SVHN at a "
        "CPU study's cost: 15 epochs, one of fine-tuning; use with a train=10000 subset).",
        choices=("paper", "cpu"),
    )

    def __post_init__(self):
        if self.model is None:
            self.model = default_model(self.dataset)

    def validate(self) -> None:
        """The settings on their own (no data, no device): BadInput, one line, on the first
        that fails. `rdfast run` and every grid point check them here."""
        if self.train is None:
            raise BadInput("training settings are missing")
        self.train.validate()
        self.prune.validate(self.train)
        check_strategies(self.strategies)
        if not self.seeds:
            raise BadInput("no seeds given")


@dataclass(frozen=True)
class PruneJob:
    """Everything one `rdfast prune` asks for: a trained model, pruned once per ratio from the
    given weights (no dense training here), its per-class recall measured on a dataset."""

    checkpoint: Path | None = setting(
        None,
        "Trained weights: a .safetensors file, a folder of safetensors shards with its "
        "*.index.json, or a torch state dict (.pt/.pth/.bin, read with weights_only=True).",
        kind=Path,
    )
    model: str | None = setting(
        None,
        "Architecture of the checkpoint: mlp, lenet5, resnet20, ..., timm:NAME, "
        "torchvision:NAME (needed with --dataset).",
    )
    width: float = setting_like(Experiment, "width")
    dataset: str | None = setting(
        None,
        "Calibration batches from its train split, per-class recall on its test split "
        "(NAME[:key=value,...]; test=N subsets). Left out: streamed magnitude pruning of a "
        "safetensors checkpoint, no evaluation.",
    )
    strategies: tuple[str, ...] = setting_like(
        Experiment, "strategies", ("mp",), "Strategies: mp, gp, up, rp, rp-layer, a comma "
        "list, or all (mp,gp,up,rp)."
    )  # fmt: skip
    ratios: tuple[float, ...] = setting_like(
        PruneSettings, "ratios", (2.0, 4.0, 8.0), "Pruning ratios t (total/kept weights), > 1, "
        "strictly increasing; each is pruned once from the given model."
    )  # fmt: skip
    saliency: str = setting_like(PruneSettings, "saliency")
    grad_batches: int = setting_like(
        PruneSettings, "grad_batches", 16, "Calibration batches averaged for gp/up's gradient."
    )
    up_eps: float = setting_like(
        PruneSettings, "up_eps", 5e-4, "eps of UP = GP + eps*MP: the weight decay the model "
        "was trained with (5e-4: the authors')."
    )  # fmt: skip
    batch_size: int = setting(128, "Batch size of calibration and fine-tuning.")
    seeds: tuple[int, ...] = setting_like(
        Experiment, "seeds", (0,), "Seeds of the calibration draws and of rp's scores: one run "
        "per seed and strategy (0-4, 0,2,5)."
    )  # fmt: skip
    finetune_epochs: int = setting(
        0, "Epochs of fine-tuning after pruning (0: the pruned model as it is)."
    )
    finetune_lr: float = setting(0.01, "Fine-tuning learning rate (SGD, momentum 0.9, cosine).")
    weight_decay: float = setting(5e-4, "Weight decay of fine-tuning.")
    exclude: tuple[str, ...] = setting_like(PruneSettings, "exclude")
    include: tuple[str, ...] = setting(
        (),
        "Streamed pruning: comma list of tensor-name globs to prune [floating tensors with 2 "
        "or more dimensions].",
        parse=parse_names,
        shown="",
    )
    save: bool = setting(
        False,
        "Write each pruned model (safetensors shaped like the input) and its bit-packed masks "
        "under OUT/pruned/.",
    )
    normalize: str = setting_like(
        Experiment, "normalize", "dataset", NORMALIZE_HELP + " Give the normalization the "
        "checkpoint was trained with: a mismatch shows as accuracy near chance."
    )  # fmt: skip
    device: str = setting_like(Experiment, "device", help="Where to prune and evaluate.")
    data_root: Path | None = setting_like(Experiment, "data_root")
    out: Path = setting(
        Path("pruned"),
        "Output folder: records and manifests as `rdfast run` writes them, pruned checkpoints.",
    )

    def validate(self) -> None:
        check_strategies(self.strategies)
        if self.checkpoint is None:
            raise BadInput("--checkpoint is needed: the trained weights to prune")
        r = self.ratios
        if not r or any(not 1 < t < math.inf for t in r) or any(b <= a for a, b in zip(r, r[1:])):
            raise BadInput(f"--ratios must be > 1 and strictly increasing, got {list(r)}")
        if not self.seeds:
            raise BadInput("no seeds given")
        if "cs" in self.strategies:
            raise BadInput("--strategy cs measures each class's importance during rdfast run; "
                           "rdfast prune takes mp, gp, up, rp and rp-layer")  # fmt: skip
        if self.saliency.endswith(CLASS_MAX):
            raise BadInput(
                f"--saliency {self.saliency} scores with per-class gradients, which rdfast run "
                "computes; rdfast prune takes taylor or sum"
            )
        checks = {
            "--grad-batches must be >= 1": (self.grad_batches, self.grad_batches >= 1),
            "--batch-size must be >= 1": (self.batch_size, self.batch_size >= 1),
            "--finetune-epochs must be >= 0": (self.finetune_epochs, self.finetune_epochs >= 0),
            "--finetune-lr must be > 0 and finite": (
                self.finetune_lr, 0 < self.finetune_lr < math.inf
            ),
            "--up-eps must be >= 0 and finite": (self.up_eps, 0 <= self.up_eps < math.inf),
            "--weight-decay must be >= 0 and finite": (
                self.weight_decay, 0 <= self.weight_decay < math.inf
            ),
        }  # fmt: skip
        for what, (value, ok) in checks.items():
            if not ok:
                raise BadInput(f"{what}, got {value}")


# Presets per dataset: enough training to reach sensible accuracy, small enough for a laptop.
# weight_decay 5e-4 everywhere: the authors' code hard-codes UP's eps = 5e-4.
PRESETS: dict[str, dict] = {
    # 1,257 training images; 30 epochs reach ~97 % test accuracy with the mlp.
    "digits": dict(epochs=30, lr=0.05, batch_size=64, weight_decay=5e-4, finetune_epochs=4),
    "synthetic": dict(epochs=20, lr=0.05, batch_size=64, weight_decay=5e-4, finetune_epochs=3),
    # OpenLTH's mnist_lenet_300_100 uses lr 0.1, batch 128; fewer epochs suffice with cosine.
    "mnist": dict(epochs=10, lr=0.1, batch_size=128, weight_decay=5e-4, finetune_epochs=2),
    "fashion-mnist": dict(epochs=15, lr=0.1, batch_size=128, weight_decay=5e-4, finetune_epochs=3),
}
FALLBACK_PRESET = dict(epochs=20, lr=0.05, batch_size=128, weight_decay=5e-4, finetune_epochs=3)


# Presets per (dataset, model family), before the per-dataset ones above.
# CIFAR ResNets: He et al. 2016 (SGD momentum 0.9, lr 0.1, batch 128) with cosine decay over
# 160 epochs as in OpenLTH's cifar_resnet_20 recipe, weight decay 5e-4 (= the authors' UP eps);
# VGG: OpenLTH's cifar_vgg_16 (lr 0.1, batch 128, 160 epochs), same decay; SVHN converges in
# far fewer epochs (40). Fine-tuning: 10 epochs (5 on SVHN) at lr / 10 after each step.
_CIFAR = dict(epochs=160, lr=0.1, batch_size=128, weight_decay=5e-4, finetune_epochs=10)
_SVHN = dict(epochs=40, lr=0.05, batch_size=128, weight_decay=5e-4, finetune_epochs=5)
FAMILY_PRESETS: dict[tuple[str, str], dict] = {
    (data, family): recipe
    for data, recipe in (("cifar10", _CIFAR), ("cifar100", _CIFAR), ("svhn", _SVHN))
    for family in ("resnet", "vgg", "timm", "torchvision")
}
PRESETS.update(
    {
        "cifar10": dict(epochs=60, lr=0.05, batch_size=128, weight_decay=5e-4, finetune_epochs=5),
        "cifar100": dict(epochs=60, lr=0.05, batch_size=128, weight_decay=5e-4, finetune_epochs=5),
        "svhn": dict(_SVHN),
        "imagefolder": dict(
            epochs=60, lr=0.05, batch_size=64, weight_decay=5e-4, finetune_epochs=5
        ),
    }
)


# `--preset cpu`: conv nets on CIFAR and SVHN at a cost two CPU cores can afford, for
# studies of many runs (the paper-like recipe above takes ResNet-20 160 epochs, ~7 hours on
# this CPU for one dense model). ResNet-20 on a stratified 10,000-image CIFAR-10 subset,
# 15 epochs (cosine, lr 0.1): test accuracy 0.668 (seed 0, 737 s at 204 img/s on one AMD
# EPYC thread; the paper-like recipe reaches ~0.91 on the full set). One epoch of fine-tuning
# after each step. Other datasets' presets are CPU-sized already and stay as they are.
_CPU_CONV = dict(epochs=15, lr=0.1, batch_size=128, weight_decay=5e-4, finetune_epochs=1)
CPU_PRESETS: dict[tuple[str, str], dict] = {
    (data, family): _CPU_CONV
    for data in ("cifar10", "cifar100", "svhn")
    for family in ("resnet", "vgg", "timm", "torchvision")
}
PRESET_NAMES = ("paper", "cpu")


def preset(dataset_name: str, model: str = "mlp", name: str = "paper") -> dict:
    from rdfast.models import model_family

    key = (dataset_name, model_family(model))
    if name == "cpu" and key in CPU_PRESETS:
        return dict(CPU_PRESETS[key])
    return dict(FAMILY_PRESETS.get(key) or PRESETS.get(dataset_name, FALLBACK_PRESET))


def prune_settings(
    dataset_name: str, model: str = "mlp", preset_name: str = "paper", **overrides
) -> PruneSettings:
    """Defaults, then the overrides; preset fields left None come from the preset."""
    base = preset(dataset_name, model, preset_name)
    for f in fields(PruneSettings):
        if f.metadata.get("preset") and overrides.get(f.name) is None:
            overrides[f.name] = base[f.name]
    return PruneSettings(**overrides)


def train_settings(
    dataset_name: str, model: str = "mlp", preset_name: str = "paper", **overrides
) -> TrainSettings:
    """The (dataset, model) preset with every override that is not None applied."""
    base = preset(dataset_name, model, preset_name)
    base.pop("finetune_epochs")
    s = TrainSettings(**base)
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    s.validate()
    return s
