"""Datasets: the registry (`registry`), the built-in entries (`builtin`) and the tensors every
command works on (`tensors`).

Add a dataset in one place (`rdfast/data/builtin.py`, or a plugin module): a function
decorated with `@register_dataset` that returns a `Raw` (CPU tensors, uint8 images or float
features). The registry imports nothing of the other two modules, so there is no import
circle; the built-in entries register themselves when this package is imported.
"""

import rdfast.data.builtin  # noqa: E402, F401, I001  (the built-in entries register themselves)
from rdfast.data.registry import (
    AUGMENTATIONS,
    COMMON_OPTIONS,
    DATASETS,
    DatasetEntry,
    Option,
    Raw,
    register_dataset,
)
from rdfast.data.tensors import (
    DEFAULT_DATA_ROOT,
    TensorData,
    augment_batch,
    canonical_spec,
    channel_stats,
    load_dataset,
    normalize,
    parse_spec,
)

__all__ = [
    "AUGMENTATIONS", "COMMON_OPTIONS", "DATASETS", "DEFAULT_DATA_ROOT", "DatasetEntry",
    "Option", "Raw", "TensorData", "augment_batch", "canonical_spec", "channel_stats",
    "load_dataset", "normalize", "parse_spec", "register_dataset",
]  # fmt: skip
