"""Confusion matrix, recall and accuracy against scikit-learn."""

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion

from rdfast.kernels import accuracy, confusion_matrix, per_class_recall
from rdfast.runs.steps import step_records


def test_confusion_recall_accuracy_match_sklearn():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 7, generator=gen)
    y = torch.randint(0, 7, (1000,), generator=gen)
    cm = confusion_matrix(logits, y, 7)
    pred = logits.argmax(1).numpy()
    np.testing.assert_array_equal(cm.numpy(), sk_confusion(y.numpy(), pred, labels=range(7)))
    np.testing.assert_allclose(
        per_class_recall(cm).numpy(), recall_score(y.numpy(), pred, average=None), rtol=1e-12
    )
    assert accuracy(cm) == accuracy_score(y.numpy(), pred)


def test_argmax_ties_take_first_index_and_labels_accepted():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    cm = confusion_matrix(logits, torch.tensor([0, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert torch.equal(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 2]), 3), cm)


def test_step_records_hand_case():
    # 3 classes; class 2 has no test example.
    cm = np.array([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    df = step_records({"run_id": "r"}, cm, ["a", "b", "c"], step=1, t_target=2.0)
    assert df["support"].tolist() == [4, 4, 0]
    assert df["recall"].iloc[:2].tolist() == [0.75, 0.5]
    assert pd.isna(df["recall"].iloc[2])
    assert (df["accuracy"] == 5 / 8).all()
    assert df["class_name"].tolist() == ["a", "b", "c"]
