"""Hot paths of the engine, each with a pure-torch reference.

The engine calls only these functions for scoring, global selection and evaluation, so a
faster implementation slots in behind the same signatures.
"""

from rdfast.kernels.confusion import accuracy, confusion_matrix, per_class_recall
from rdfast.kernels.saliency import SALIENCY_FORMS, saliency
from rdfast.kernels.selection import prune_lowest

__all__ = [
    "SALIENCY_FORMS",
    "accuracy",
    "confusion_matrix",
    "per_class_recall",
    "prune_lowest",
    "saliency",
]
