"""One-pass confusion matrix against scikit-learn and torch.argmax + bincount."""

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion

from rdfast.kernels import confusion_matrix
from tests.kernels.conftest import DEVICE


@pytest.mark.filterwarnings("ignore:A single label was found")  # c = 1: sklearn's note
@pytest.mark.parametrize(
    "n,c", [(0, 3), (1, 1), (6, 2), (42, 10), (431, 100), (123, 1000), (37, 1030)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_sklearn_and_reference(backend, n, c, dtype):
    gen = torch.Generator().manual_seed(n + c)
    # Few distinct values so argmax ties are everywhere.
    logits = (torch.randint(-2, 3, (n, c), generator=gen).float()).to(dtype).to(DEVICE)
    y = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    cm = confusion_matrix(logits, y, c, backend=backend)
    assert cm.dtype == torch.int64 and cm.shape == (c, c)
    if n == 0:
        assert int(cm.sum()) == 0
        return
    pred = np.argmax(logits.float().cpu().numpy(), axis=1)  # numpy: first maximum on ties
    np.testing.assert_array_equal(
        cm.cpu().numpy(), sk_confusion(y.cpu().numpy(), pred, labels=range(c))
    )


def test_nan_and_inf_follow_torch_argmax(backend):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [[1.0, nan, 3.0, nan], [inf, 2.0, inf, 1.0], [-0.0, 0.0, -1.0, -inf], [-nan, 1.0, 2.0, 3.0]]
    ).to(DEVICE)
    y = torch.tensor([0, 1, 2, 3]).to(DEVICE)
    cm = confusion_matrix(logits, y, 4, backend=backend)
    # torch.argmax's rule, by hand: a NaN is the maximum (the first NaN wins); ties and
    # -0.0 == 0.0 go to the first index.
    assert cm.cpu().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]


def test_labels_input(backend):
    pred = torch.tensor([0, 2, 2, 1]).to(DEVICE)
    y = torch.tensor([0, 2, 1, 1]).to(DEVICE)
    cm = confusion_matrix(pred, y, 3, backend=backend)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_labels_over_several_programs(backend):
    # 2500 labels: three programs of 1024 rows, the last one partly masked.
    gen = torch.Generator().manual_seed(3)
    pred, y = torch.randint(0, 7, (2, 2500), generator=gen)
    cm = confusion_matrix(pred.to(DEVICE), y.to(DEVICE), 7, backend=backend)
    np.testing.assert_array_equal(cm.cpu().numpy(), sk_confusion(y, pred, labels=range(7)))


def test_validation():
    with pytest.raises(ValueError, match="columns"):
        confusion_matrix(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="targets"):
        confusion_matrix(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0)
