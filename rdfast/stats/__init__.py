"""The statistics of recorded runs: loading the records (`records`), intervals and
multiplicity control (`intervals`), the measures (`measures`), group and paired tables
(`comparisons`), replicate checks (`replicates`), flips and PIE (`flips`), and `analyze`,
which puts them together (`analysis`).

    from rdfast import stats
    a = stats.analyze(stats.load("out/runs"))
    a.groups  # one row per (group, t): E[alpha_t], its interval and mark, accuracy, Psi
"""

from rdfast.stats.analysis import DEFAULT_BY, Analysis, analyze, read_tables, write_tables
from rdfast.stats.comparisons import paired_table
from rdfast.stats.intervals import (
    ADJUSTMENT_NAMES,
    ADJUSTMENTS,
    CI_METHODS,
    COVERAGE,
    adjust_p,
    bootstrap_interval,
    t_interval,
)
from rdfast.stats.measures import accuracy_floor
from rdfast.stats.records import load

__all__ = [
    "ADJUSTMENTS", "ADJUSTMENT_NAMES", "CI_METHODS", "COVERAGE", "DEFAULT_BY", "Analysis",
    "accuracy_floor", "adjust_p", "analyze", "bootstrap_interval", "load", "paired_table",
    "read_tables", "t_interval", "write_tables",
]  # fmt: skip
