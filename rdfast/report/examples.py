"""The most-flipped test examples as pictures: for image datasets, a grid per group of the
test images whose prediction pruning changed in the most runs, each with its true class and
the dense and pruned models' (modal) predictions, as Hooker et al. show their PIE."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rdfast.errors import BadInput, DataMissing  # noqa: E402

MAX_CLASSES = 10  # rows of a grid: the classes with the most flipped examples
MAX_GROUPS = 6  # grids in a report


class TestImages:
    """The uint8 test images of one dataset (N x H x W x C) and its class names."""

    def __init__(self, images: np.ndarray, class_names: list[str]):
        self.images, self.class_names = images, class_names


def load_test_images(dataset: str, data_root) -> TestImages | str:
    """The test images of `dataset` (a records `dataset` spec), or the reason there are none
    to show: not an image dataset, or its files are not on this machine."""
    from rdfast.data import load_dataset

    try:
        data = load_dataset(dataset, data_root)
    except (BadInput, DataMissing) as e:
        return f"{dataset}: {e}"
    x = data.x_test
    if x.dim() != 4 or x.dtype.is_floating_point or x.shape[1] not in (1, 3):
        return f"{dataset}: not an image dataset"
    return TestImages(x.permute(0, 2, 3, 1).numpy(), list(data.class_names))


def flipped_grid(part: pd.DataFrame, images: TestImages, title: str, path: Path) -> None:
    """One row per class (those with the most flipped examples first, at most MAX_CLASSES),
    its most-flipped examples left to right: the image, its test index, dense -> pruned
    prediction and in how many of the group's runs it flipped."""
    names = images.class_names
    per_class = part.groupby("class")["runs_flipped"].sum().sort_values(ascending=False)
    classes = list(per_class.index[:MAX_CLASSES])
    cols = int(part.groupby("class").size().max())
    fig, axes = plt.subplots(
        len(classes), cols, figsize=(1.35 * cols + 0.8, 1.55 * len(classes)), squeeze=False
    )
    for r, c in enumerate(classes):
        rows = part[part["class"] == c].sort_values("runs_flipped", ascending=False)
        for k, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(rows):
                ax.axis("off")
                continue
            e = rows.iloc[k]
            img = images.images[int(e["example"])]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            dense, pruned = names[int(e["dense_prediction"])], names[int(e["pruned_prediction"])]
            ax.set_title(
                f"#{int(e['example'])}: {int(e['runs_flipped'])}/{int(e['n_runs'])}\n"
                f"{dense} -> {pruned}",
                fontsize=7,
            )
        axes[r][0].set_ylabel(names[int(c)], fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
