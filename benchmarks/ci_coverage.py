"""Coverage of rdfast's confidence intervals, by simulation.

    python -m benchmarks.ci_coverage [--reps 4000]

Draws `reps` samples of n replicates from a normal distribution (and from a skewed one, a
log-normal, since alpha_t is a ratio and need not be normal), computes each interval with the
code `rdfast analyze` runs (`rdfast.stats.t_interval`, `bootstrap_interval`, 9,999
resamples), and counts how often it holds the true mean. Writes results/ci_coverage.csv and
prints the table of benchmarks/README.md. The minimum sample sizes in
`rdfast.stats.COVERAGE` come from this table.
"""

from __future__ import annotations

import argparse
import datetime as dt

import numpy as np
import pandas as pd

from benchmarks.conftest import RESULTS, commit
from rdfast.report.tables import markdown
from rdfast.stats import bootstrap_interval, t_interval

DISTRIBUTIONS = {
    "normal": (lambda rng, size: rng.normal(1.0, 0.2, size), 1.0),
    # mean of lognormal(0, 0.5) = exp(0.125)
    "lognormal": (lambda rng, size: rng.lognormal(0.0, 0.5, size), float(np.exp(0.125))),
}


def coverage(method: str, n: int, ci: float, dist: str, reps: int, seed: int = 0) -> float:
    draw, truth = DISTRIBUTIONS[dist]
    rng = np.random.default_rng([seed, n, int(ci * 1000), len(dist)])
    samples = draw(rng, (reps, n))
    if method == "t":
        s = pd.DataFrame(samples)
        low, high = t_interval(s.mean(axis=1), s.std(axis=1), pd.Series(np.full(reps, n)), ci)
    else:
        arrays = pd.Series(list(samples))
        # One seed per replicate, as each `rdfast analyze` draws its own resampling indices:
        # batches of 200 share a seed inside `_bootstrap_interval`.
        lows, highs = [], []
        for start in range(0, reps, 200):
            lo, hi = bootstrap_interval(arrays.iloc[start : start + 200], ci, 9999, seed + start)
            lows.append(lo.to_numpy())
            highs.append(hi.to_numpy())
        low, high = np.concatenate(lows), np.concatenate(highs)
    low, high = np.asarray(low), np.asarray(high)
    return float(np.mean((low <= truth) & (truth <= high)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4000)
    ns = parser.parse_args(argv)
    rows = []
    for dist in DISTRIBUTIONS:
        for ci in (0.95, 0.99):
            for method in ("t", "bootstrap"):
                for n in (3, 5, 10, 20):
                    cov = coverage(method, n, ci, dist, ns.reps)
                    rows.append(
                        {"distribution": dist, "ci": ci, "method": method, "n": n, "coverage": cov}
                    )
                    print(f"{dist} {ci} {method} n={n}: {cov:.4f}", flush=True)
    table = pd.DataFrame(rows)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "ci_coverage.csv"
    table.assign(date=stamp, commit=commit(), reps=ns.reps).to_csv(
        out, mode="a", header=not out.exists(), index=False
    )
    wide = table.assign(pct=(100 * table["coverage"]).round(1)).pivot_table(
        index=["distribution", "ci", "method"], columns="n", values="pct"
    )
    wide.columns = [f"n={c}" for c in wide.columns]
    print(markdown(wide.reset_index().set_index("distribution"), index_name="distribution"))


if __name__ == "__main__":
    main()
