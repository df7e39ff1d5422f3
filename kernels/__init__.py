"""Hot paths of the engine as Triton kernels, each beside its pure-torch reference.

Every public function takes `backend="auto" | "triton" | "torch"`: `auto` runs Triton on CUDA
tensors and torch otherwise; `triton` also runs on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1` set before this package is imported).
"""

if __name__ != "rdfast.kernels":  # imported as top-level `kernels` from a clone's root
    from rdfast._toplevel import hand_over

    hand_over(__name__, __file__)
else:
    from rdfast.kernels._backend import HAS_TRITON
    from rdfast.kernels.confusion import accuracy, confusion_matrix, per_class_recall
    from rdfast.kernels.masked_linear import (
        MaskedLinearFunction,
        SparseLinear,
        masked_linear,
        sparsify_for_inference,
    )
    from rdfast.kernels.saliency import SALIENCY_FORMS, saliency
    from rdfast.kernels.selection import kth_smallest, prune_lowest, prune_lowest_fused

    __all__ = [
        "HAS_TRITON",
        "SALIENCY_FORMS",
        "MaskedLinearFunction",
        "SparseLinear",
        "accuracy",
        "confusion_matrix",
        "kth_smallest",
        "masked_linear",
        "per_class_recall",
        "prune_lowest",
        "prune_lowest_fused",
        "saliency",
        "sparsify_for_inference",
    ]
