"""`rdfast analyze` on 1,000,000 record rows: read the Parquet table, compute every statistic.

100 classes x 7 t x 4 strategies x 10 seeds x 36 widths = 1,008,000 rows, 1,440 runs.
Target: under 5 s on 2 CPU cores (vectorized groupby sums; no Python loop over rows/classes).
"""

import numpy as np
import pandas as pd
import pytest

from rdfast import stats
from rdfast.runs import store

CLASSES, TS, STRATEGIES, SEEDS, WIDTHS = (
    100,
    (1, 2, 4, 8, 16, 32, 64),
    ("mp", "gp", "up", "rp"),
    10,
    36,
)


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    runs = [(s, w, sd) for s in STRATEGIES for w in range(WIDTHS) for sd in range(SEEDS)]
    n_runs = len(runs)
    n = n_runs * len(TS) * CLASSES
    run_idx = np.repeat(np.arange(n_runs), len(TS) * CLASSES)
    step = np.tile(np.repeat(np.arange(len(TS)), CLASSES), n_runs)
    cls = np.tile(np.arange(CLASSES), n_runs * len(TS))
    recall = np.clip(rng.normal(0.7, 0.1, n), 0, 1)
    acc = np.repeat(recall.reshape(-1, CLASSES).mean(axis=1), CLASSES)
    strat = np.array([r[0] for r in runs])[run_idx]
    width = np.array([0.25 * (1 + r[1]) for r in runs])[run_idx]
    seed = np.array([r[2] for r in runs])[run_idx]
    df = pd.DataFrame(
        {
            "records_version": store.RECORDS_VERSION,
            "run_id": pd.Series(run_idx).map("r{:05d}".format),
            "dense_id": "d",
            "dataset": "synthetic",
            "model": "mlp",
            "width": width,
            "seed": seed,
            "strategy": strat,
            "saliency": np.where(np.isin(strat, ["gp", "up"]), "taylor", "none"),
            "eps": np.nan,
            "weight_decay": 5e-4,
            "retrain": "finetune",
            "device": "cpu",
            "step": step,
            "t_target": np.array(TS, dtype=float)[step],
            "class": cls,
            "class_name": cls.astype(str),
            "support": 100,
            "recall": recall,
            "accuracy": acc,
        }
    )
    out = tmp_path_factory.mktemp("big")
    df.to_parquet(out / "records.parquet", index=False)
    return out


@pytest.mark.benchmark(group="analyze-1M")
def test_analyze_one_million_rows(benchmark, records_dir):
    result = benchmark.pedantic(
        lambda: stats.analyze(stats.load(records_dir)), rounds=3, warmup_rounds=1
    )
    assert len(result.runs) == 1_440 * 7
    benchmark.extra_info["rows"] = 1_008_000
