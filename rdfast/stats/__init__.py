"""The statistics of recorded runs: loading the records (`records`), intervals and
multiplicity control (`intervals`), the measures (`measures`), group and paired tables
(`comparisons`), replicate checks (`replicates`), flips and PIE (`flips`), and `analyze`,
which puts them together (`analysis`).
"""
