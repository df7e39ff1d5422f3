"""Statistics against independent references (numpy, scipy) and hand-computed cases."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from rdfast import stats
from rdfast.errors import BadInput
from rdfast.report import tables
from rdfast.runs import store


def fake_records(runs):
    """runs: list of dicts with seed, strategy, acc {t: A}, recall {t: [R_c]} (t=1 included)."""
    rows = []
    for r in runs:
        rid = f"{r['strategy']}-{r.get('width', 1.0)}-{r['seed']}-{r.get('tag', '')}"
        for step, t in enumerate(sorted(r["recall"])):
            for c, rec in enumerate(r["recall"][t]):
                rows.append(
                    {
                        "records_version": store.RECORDS_VERSION,
                        "run_id": rid,
                        "dense_id": f"d{r['seed']}{r.get('width', 1.0)}",
                        "dataset": "toy",
                        "model": "mlp",
                        "width": r.get("width", 1.0),
                        "seed": r["seed"],
                        "strategy": r["strategy"],
                        "saliency": r.get("saliency", "none"),
                        "eps": r.get("eps", np.nan),
                        "weight_decay": 5e-4,
                        "retrain": r.get("retrain", "finetune"),
                        "device": "cpu",
                        "step": step,
                        "t_target": float(t),
                        "class": c,
                        "class_name": str(c),
                        "support": r.get("support", [10] * 99)[c],
                        "recall": rec,
                        "accuracy": r["acc"][t],
                    }
                )
    return pd.DataFrame(rows)


def run_with(seed, x, y, a1=0.5, at=0.5, strategy="mp", t=4.0, **kw):
    """A run whose Bn_1 are x and Bn_t are y (recall = A * (1 + Bn))."""
    return {
        "seed": seed,
        "strategy": strategy,
        "acc": {1.0: a1, t: at},
        "recall": {1.0: [a1 * (1 + v) for v in x], t: [at * (1 + v) for v in y]},
        **kw,
    }


def test_alpha_is_lstsq_through_origin_and_hand_case():
    x = [0.2, -0.1, -0.1, 0.0]
    y = [0.5, -0.2, -0.4, 0.1]
    a = stats.analyze(fake_records([run_with(0, x, y)]), by=("strategy",))
    row = a.runs[a.runs["t"] == 4.0].iloc[0]
    # Hand: sum xy = 0.1 + 0.02 + 0.04 + 0 = 0.16; sum x^2 = 0.04 + 0.01 + 0.01 = 0.06.
    assert row["alpha"] == pytest.approx(0.16 / 0.06)
    # Recompute x, y from the stored recalls (floating-point rounding of R = A(1 + Bn)).
    xs = np.array(x)
    ref = np.linalg.lstsq(xs[:, None], np.array(y), rcond=None)[0][0]
    assert row["alpha"] == pytest.approx(ref, rel=1e-12)
    assert row["n_classes_used"] == 4
    # Standard error by hand: residuals e = y - alpha x, s^2 = sum e^2 / (n - 1).
    alpha = 0.16 / 0.06
    e = np.array(y) - alpha * xs
    assert row["alpha_se"] == pytest.approx(np.sqrt(np.sum(e**2) / 3 / 0.06), rel=1e-9)
    dense = a.runs[a.runs["t"] == 1.0].iloc[0]
    assert dense["alpha"] == pytest.approx(1.0) and dense["alpha_se"] == pytest.approx(0, abs=1e-9)


def test_class_quantities_and_intensification_ratio():
    a = stats.analyze(
        fake_records([run_with(0, [0.2, -0.2, 0.0], [0.4, -0.1, 0.3])]), by=("strategy",)
    )
    c = a.classes[a.classes["t"] == 4.0].sort_values("class")
    np.testing.assert_allclose(c["Bn"], [0.4, -0.1, 0.3], atol=1e-12)
    np.testing.assert_allclose(c["B"], [0.2, -0.05, 0.15], atol=1e-12)
    np.testing.assert_allclose(c["I"].iloc[:2], [2.0, 0.5], rtol=1e-9)
    assert np.isnan(c["I"].iloc[2])  # Bn_1 = 0: undefined
    assert any("I undefined for 1" in n for n in a.notes)


def test_class_recall_change_against_hand_values_and_scipy():
    # Three seeds, three classes; recalls written out, accuracies chosen freely.
    recalls = {
        0: {1.0: [0.9, 0.8, 0.7], 4.0: [0.85, 0.7, 0.4]},
        1: {1.0: [0.95, 0.8, 0.6], 4.0: [0.9, 0.75, 0.45]},
        2: {1.0: [0.9, 0.85, 0.65], 4.0: [0.9, 0.8, 0.35]},
    }
    accs = {0: (0.8, 0.65), 1: (0.78, 0.7), 2: (0.8, 0.68)}
    runs = [
        {"seed": s, "strategy": "mp", "acc": {1.0: accs[s][0], 4.0: accs[s][1]}, "recall": r}
        for s, r in recalls.items()
    ]
    a = stats.analyze(fake_records(runs), by=("strategy",), ci=0.95)
    cg = a.class_groups[a.class_groups["t"] == 4.0].set_index("class")
    assert list(cg.index) == [0, 1, 2] and (cg["n"] == 3).all()
    acc_change = np.mean([at - a1 for a1, at in accs.values()])
    for c in range(3):
        change = [recalls[s][4.0][c] - recalls[s][1.0][c] for s in recalls]
        lo, hi = scipy_stats.t.interval(0.95, 2, loc=np.mean(change), scale=scipy_stats.sem(change))
        row = cg.loc[c]
        assert row["mean_dense_recall"] == pytest.approx(
            np.mean([recalls[s][1.0][c] for s in recalls])
        )
        assert row["mean_recall_change"] == pytest.approx(np.mean(change))
        assert (row["change_ci_low"], row["change_ci_high"]) == (
            pytest.approx(lo),
            pytest.approx(hi),
        )
        assert row["mean_accuracy_change"] == pytest.approx(acc_change)
        assert row["mean_excess_change"] == pytest.approx(np.mean(change) - acc_change)
    # Class 2 by hand: changes -0.3, -0.15, -0.3 -> mean -0.25.
    assert cg.loc[2, "mean_recall_change"] == pytest.approx(-0.25)
    # The dense rows change by exactly nothing.
    assert (a.class_groups.loc[a.class_groups["t"] == 1.0, "mean_recall_change"] == 0).all()

    top = tables.paying_classes(a, 2)
    assert list(top["class"]) == ["2", "1"] and list(top["t"]) == ["4", "4"]
    assert list(top["change"]) == ["-0.250", "-0.067"]
    assert top["95 % CI"].iloc[0] == f"{lo:+.3f} to {hi:+.3f}"
    assert tables.paying_classes(a, 0).empty


# The toy models of these tests sit at accuracy 0.5 on three or four classes, at or below
# the default accuracy floor (2 x chance; rdfast.stats.accuracy_floor), where alpha gets no
# mark: the tests of the intervals and marks switch the floor off (NO_FLOOR).
NO_FLOOR = {"floor": 0.0}


def crafted_group(alphas, strategy="mp"):
    x = [0.2, -0.1, -0.1]
    return [run_with(s, x, [al * v for v in x], strategy=strategy) for s, al in enumerate(alphas)]


def test_ci_equals_scipy_t_interval_and_ttest():
    alphas = [1.2, 1.5, 0.9, 1.1, 1.3]
    a = stats.analyze(fake_records(crafted_group(alphas)), by=("strategy",), ci=0.99, **NO_FLOOR)
    g = a.groups[a.groups["t"] == 4.0].iloc[0]
    lo, hi = scipy_stats.t.interval(
        0.99, len(alphas) - 1, loc=np.mean(alphas), scale=scipy_stats.sem(alphas)
    )
    assert g["n"] == 5
    assert g["mean_alpha"] == pytest.approx(np.mean(alphas))
    assert (g["ci_low"], g["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert g["p_value"] == pytest.approx(scipy_stats.ttest_1samp(alphas, 1.0).pvalue)
    assert g["mark"] == "?"


def test_paired_differences_equal_scipy_ttest_rel():
    x = [0.2, -0.1, -0.1]
    mp_alpha, up_alpha = [1.2, 1.5, 0.9, 1.1], [1.1, 1.42, 0.78, 1.0]
    mp_acc, up_acc = [0.8, 0.7, 0.75, 0.72], [0.79, 0.71, 0.73, 0.7]
    runs = [
        run_with(s, x, [al * v for v in x], strategy=name, at=acc, eps=eps)
        for name, alphas, accs, eps in (
            ("mp", mp_alpha, mp_acc, np.nan),
            ("up", up_alpha, up_acc, 5e-4),
        )
        for s, (al, acc) in enumerate(zip(alphas, accs))
    ]
    a = stats.analyze(fake_records(runs), by=("strategy",), ci=0.95, **NO_FLOOR)
    row = a.paired[(a.paired["t"] == 4.0)].set_index("strategy").loc["up"]
    diff = np.subtract(up_alpha, mp_alpha)  # -0.1, -0.08, -0.12, -0.1
    assert row["n"] == 4 and row["baseline"] == "mp"
    assert row["mean_diff"] == pytest.approx(-0.1)
    lo, hi = scipy_stats.t.interval(0.95, 3, loc=diff.mean(), scale=scipy_stats.sem(diff))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert row["p_value"] == pytest.approx(scipy_stats.ttest_rel(up_alpha, mp_alpha).pvalue)
    assert row["mark"] == "<"
    assert row["mean_acc_diff"] == pytest.approx(np.mean(np.subtract(up_acc, mp_acc)))
    assert row["acc_p_value"] == pytest.approx(scipy_stats.ttest_rel(up_acc, mp_acc).pvalue)
    # The unpaired intervals of the two groups overlap; the paired one lies below 0.
    g = a.groups[a.groups["t"] == 4.0].set_index("strategy")
    assert g.loc["up", "ci_high"] > g.loc["mp", "ci_low"] and hi < 0
    alpha_tab, acc_tab, _ = tables.paired_tables(a)
    assert list(alpha_tab.index) == ["up"] and alpha_tab.loc["up", "t=4"] == "-0.10<"
    # No comparison without the baseline, on request, or when strategy is not a group column.
    assert stats.analyze(fake_records(runs), by=("strategy",), vs=None).paired is None
    only_up = fake_records([r for r in runs if r["strategy"] == "up"])
    assert stats.analyze(only_up, by=("strategy",)).paired is None
    with pytest.raises(BadInput, match="no rp runs"):
        stats.analyze(fake_records(runs), by=("strategy",), vs="rp")
    # eps differs between mp (NaN) and up by definition: grouping by it still pairs them.
    with_eps = stats.analyze(fake_records(runs), by=("strategy", "eps"), ci=0.95)
    assert with_eps.paired.loc[with_eps.paired["t"] == 4.0, "mean_diff"].item() == pytest.approx(
        -0.1
    )
    # Runs of another dense model (here: another seed) are not paired.
    other_seed = [r if r["strategy"] == "mp" else dict(r, seed=9) for r in runs[:5]]
    lone = stats.analyze(fake_records(other_seed), by=("strategy",))
    assert lone.paired is None and any("no comparison with mp" in n for n in lone.notes)
    # A baseline in two score forms: each form is paired with its own.
    forms = []
    for r in runs:
        for form, shift in (("taylor", 0.0), ("sum", 0.3)):
            if r["strategy"] == "up":
                alpha = up_alpha[r["seed"]] + shift
                forms.append(
                    dict(
                        run_with(r["seed"], x, [alpha * v for v in x], strategy="gp"),
                        saliency=form,
                        tag=form,
                    )
                )
                forms.append(dict(r, saliency=form, tag=form))
    by_form = stats.analyze(fake_records(forms), by=("strategy", "saliency"), vs="gp")
    p = by_form.paired[by_form.paired["t"] == 4.0].set_index("saliency")["mean_diff"]
    assert p.to_dict() == {"sum": pytest.approx(-0.3), "taylor": pytest.approx(0.0)}
    with pytest.raises(BadInput, match="must include strategy"):
        stats.paired_table(a.runs, ("dataset",), "mp", 0.99)


@pytest.mark.parametrize(
    "alphas, expected",
    [
        ([0.5, 0.52, 0.49, 0.51, 0.5], "<"),
        ([1.9, 2.0, 2.1, 2.05, 1.95], ">"),
        ([0.5, 1.5, 0.8, 1.3, 1.0], "?"),
    ],
)
def test_marks_on_crafted_groups(alphas, expected):
    a = stats.analyze(fake_records(crafted_group(alphas)), by=("strategy",), **NO_FLOOR)
    assert a.groups.loc[a.groups["t"] == 4.0, "mark"].item() == expected
    alpha_tab, _ = tables.paper_tables(a)
    assert alpha_tab.loc["mp", "t=4"] == f"{np.mean(alphas):.2f}{expected}"


def scipy_bootstrap(values, n_resamples, seed, ci=0.99):
    """The reference: one scipy.stats.bootstrap call (percentile) on one group's values."""
    res = scipy_stats.bootstrap(
        (np.asarray(values),),
        np.mean,
        confidence_level=ci,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return res.confidence_interval.low, res.confidence_interval.high


def test_bootstrap_matches_scipy_and_contains_mean():
    alphas = [1.2, 1.5, 0.9, 1.1, 1.3, 1.25]
    a = stats.analyze(
        fake_records(crafted_group(alphas)),
        by=("strategy",),
        ci_method="bootstrap",
        n_resamples=2000,
        seed=7,
    )
    g = a.groups[a.groups["t"] == 4.0].iloc[0]
    low, high = scipy_bootstrap(alphas, 2000, seed=7)
    assert g["ci_low"] == pytest.approx(low)
    assert g["ci_high"] == pytest.approx(high)
    assert g["ci_low"] < np.mean(alphas) < g["ci_high"]


def test_bootstrap_of_classes_and_pairs_equals_one_scipy_call_per_group():
    # Groups of 4 and 3 replicates, one of them constant: the batched bootstrap must give,
    # group by group, what a separate scipy.stats.bootstrap call with the same seed gives.
    x = [0.2, -0.1, -0.1]
    runs = [
        run_with(s, x, [al * v for v in x], at=0.6 + 0.01 * s)
        for s, al in enumerate([1.2, 1.5, 0.9, 1.1])
    ]
    runs += [
        run_with(s, x, [al * v for v in x], strategy="up", at=0.62)
        for s, al in enumerate([1.0, 1.3, 0.8])
    ]
    a = stats.analyze(
        fake_records(runs), by=("strategy",), ci_method="bootstrap", n_resamples=500, seed=3
    )

    def ref(values):
        return scipy_bootstrap(values, 500, seed=3)

    cg = a.class_groups.set_index(["strategy", "t", "class"])
    for (strategy, t, c), row in cg.iterrows():
        sub = a.classes[(a.classes["strategy"] == strategy) & (a.classes["t"] == t)]
        change = (
            sub.loc[sub["class"] == c, "recall"] - sub.loc[sub["class"] == c, "R1"]
        ).to_numpy()
        if np.all(change == change[0]):  # identical replicates: no interval
            assert np.isnan(row["change_ci_low"]) and np.isnan(row["change_ci_high"])
            continue
        expect = ref(change)
        assert (row["change_ci_low"], row["change_ci_high"]) == (
            pytest.approx(expect[0]),
            pytest.approx(expect[1]),
        )
    # Pairs exist for seeds 0-2 only (up has three seeds).
    p = a.paired[(a.paired["t"] == 4.0)].iloc[0]
    mp = a.runs[(a.runs["strategy"] == "mp") & (a.runs["t"] == 4.0)].sort_values("seed")
    up = a.runs[(a.runs["strategy"] == "up") & (a.runs["t"] == 4.0)].sort_values("seed")
    diff = up["alpha"].to_numpy() - mp["alpha"].to_numpy()[:3]
    assert p["n"] == 3
    assert (p["ci_low"], p["ci_high"]) == tuple(pytest.approx(v) for v in ref(diff))
    acc_diff = up["accuracy"].to_numpy() - mp["accuracy"].to_numpy()[:3]
    assert (p["acc_ci_low"], p["acc_ci_high"]) == tuple(pytest.approx(v) for v in ref(acc_diff))


def test_pooled_alpha_over_all_classes_of_all_replicates():
    x1, y1 = [0.2, -0.2], [0.4, -0.4]  # slope 2
    x2, y2 = [0.1, -0.1], [0.1, -0.1]  # slope 1
    runs = [run_with(0, x1, y1, a1=0.8, at=0.8), run_with(1, x2, y2, a1=0.8, at=0.8)]
    a = stats.analyze(fake_records(runs), by=("strategy",))
    g = a.groups[a.groups["t"] == 4.0].iloc[0]
    x, y = np.array(x1 + x2), np.array(y1 + y2)
    assert g["pooled_alpha"] == pytest.approx(np.sum(x * y) / np.sum(x * x))
    assert g["mean_alpha"] == pytest.approx(1.5)


def test_single_replicate_has_no_ci_and_no_mark():
    a = stats.analyze(fake_records(crafted_group([1.4])), by=("strategy",), **NO_FLOOR)
    g = a.groups[a.groups["t"] == 4.0].iloc[0]
    assert g["n"] == 1 and np.isnan(g["ci_low"]) and g["mark"] == ""
    assert tables.paper_tables(a)[0].loc["mp", "t=4"] == "1.40 (n=1)"


def test_zero_support_classes_left_out_and_reported():
    r = run_with(0, [0.2, -0.1, 0.0], [0.3, -0.2, 0.0], support=[10, 10, 0])
    r["recall"] = {t: [*v[:2], np.nan] for t, v in r["recall"].items()}
    a = stats.analyze(fake_records([r]), by=("strategy",), **NO_FLOOR)
    assert a.runs["n_classes_used"].eq(2).all()
    assert any("no test examples" in n and "classes 2" in n for n in a.notes)


def test_zero_accuracy_left_out_and_reported():
    r = run_with(0, [0.2, -0.2], [0.1, -0.1], at=0.0)
    r["recall"][4.0] = [0.0, 0.0]
    a = stats.analyze(fake_records([r]), by=("strategy",), **NO_FLOOR)
    assert 4.0 not in set(a.runs["t"])
    assert any("accuracy 0" in n for n in a.notes)


def test_run_with_dense_accuracy_zero_is_left_out_and_counted():
    # Seed 1's dense model has accuracy 0: Bn_1 is undefined, so the whole run goes.
    r0 = run_with(0, [0.2, -0.2], [0.3, -0.3])
    r1 = run_with(1, [0.2, -0.2], [0.3, -0.3], a1=0.0)
    r1["recall"][1.0] = [0.0, 0.0]
    a = stats.analyze(fake_records([r0, r1]), by=("strategy",), **NO_FLOOR)
    assert set(a.runs["seed"]) == {0}
    assert any("left out 1 runs without a usable dense" in n for n in a.notes)


def test_runs_with_different_t_are_noted():
    r1 = run_with(0, [0.2, -0.2], [0.3, -0.3], t=4.0)
    r2 = run_with(1, [0.2, -0.2], [0.3, -0.3], t=8.0)
    a = stats.analyze(fake_records([r1, r2]), by=("strategy",), **NO_FLOOR)
    assert set(a.groups["t"]) == {1.0, 4.0, 8.0}
    assert a.groups.set_index("t")["n"].to_dict() == {1.0: 2, 4.0: 1, 8.0: 1}
    assert any("different t values" in n for n in a.notes)


def test_mixed_settings_in_a_group_are_refused():
    r1 = run_with(0, [0.2, -0.2], [0.3, -0.3], tag="a")
    r2 = run_with(0, [0.2, -0.2], [0.3, -0.3], tag="b", retrain="rewind")
    with pytest.raises(BadInput, match="differ in retrain"):
        stats.analyze(fake_records([r1, r2]), by=("strategy",), **NO_FLOOR)
    a = stats.analyze(fake_records([r1, r2]), by=("strategy", "retrain"), **NO_FLOOR)
    assert len(a.groups) == 4


def test_other_records_version_refused():
    df = fake_records(crafted_group([1.0, 1.1]))
    df["records_version"] = 99
    with pytest.raises(BadInput, match="records of version"):
        stats.analyze(df)


def test_bad_arguments():
    df = fake_records(crafted_group([1.0, 1.1]))
    with pytest.raises(BadInput, match="cannot group by colour"):
        stats.analyze(df, by=("colour",))
    with pytest.raises(BadInput, match="--ci must lie"):
        stats.analyze(df, ci=1.5)


def test_pairs_only_runs_of_the_same_dense_model():
    """mp and up of seeds 0-2, but up of seeds 1 and 2 pruned another dense model (other
    training): only seed 0 pairs, and the note says why the other two do not."""
    x = [0.2, -0.1, -0.1]
    runs = [run_with(s, x, [a * v for v in x], at=0.6) for s, a in enumerate([1.2, 1.5, 0.9])]
    ups = [
        run_with(s, x, [a * v for v in x], strategy="up", at=0.61)
        for s, a in enumerate([1.0, 1.3, 0.8])
    ]
    records = fake_records(runs + ups)
    other = (records["strategy"] == "up") & (records["seed"] > 0)
    records.loc[other, "dense_id"] = records.loc[other, "dense_id"] + "-10-epochs"
    a = stats.analyze(records, by=("strategy",), **NO_FLOOR)
    p = a.paired[a.paired["t"] == 4.0].iloc[0]
    assert p["n"] == 1 and p["mark"] == ""  # one pair: no interval
    assert any(
        "2 runs are left out of the comparison with mp: 2 have no mp run on the same dense model"
        in n
        for n in a.notes
    ), a.notes
    # Same dense models, but up under other ratios or retraining settings (protocol); gp
    # under mp's own pairs normally.
    gps = [
        run_with(s, x, [a * v for v in x], strategy="gp", at=0.6)
        for s, a in enumerate([1.1, 1.4, 0.7])
    ]
    records = fake_records(runs + ups + gps).assign(protocol="p")
    records.loc[records["strategy"] == "up", "protocol"] = "q"
    a = stats.analyze(records, by=("strategy",))
    n = a.paired[a.paired["t"] == 4.0].set_index("strategy")["n"]
    assert n.to_dict() == {"gp": 3}
    assert any("3 share the dense model with a mp run but not its ratios" in n for n in a.notes)


def test_all_zero_dense_balance_is_counted_not_dropped_silently():
    x = [0.2, -0.1, -0.1]
    runs = [run_with(s, x, [a * v for v in x]) for s, a in enumerate([1.2, 1.5])]
    runs.append(run_with(2, [0.0, 0.0, 0.0], [0.1, -0.1, 0.0]))  # every R_1 = A_1
    a = stats.analyze(fake_records(runs), by=("strategy",))
    g = a.groups[a.groups["t"] == 4.0].iloc[0]
    assert g["n"] == 2
    assert any("alpha undefined for 1 runs" in n for n in a.notes), a.notes


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_identical_replicates_give_no_interval_and_no_mark(method):
    x = [0.2, -0.1, -0.1]
    runs = [run_with(s, x, [1.5 * v for v in x]) for s in range(3)]
    a = stats.analyze(fake_records(runs), by=("strategy",), ci_method=method, n_resamples=200)
    g = a.groups[a.groups["t"] == 4.0].iloc[0]
    assert g["mean_alpha"] == pytest.approx(1.5) and g["n"] == 3
    assert np.isnan(g["ci_low"]) and np.isnan(g["ci_high"]) and g["mark"] == ""
    assert any("same alpha in every replicate" in n for n in a.notes), a.notes


def test_replicates_with_different_settings_are_refused_by_name():
    x = [0.2, -0.1, -0.1]
    runs = [run_with(s, x, [a * v for v in x]) for s, a in enumerate([1.2, 1.5, 0.9])]
    records = fake_records(runs)
    records.loc[records["seed"] == 0, "weight_decay"] = 1e-3
    with pytest.raises(BadInput, match=r"differ in weight_decay \(0.001 vs 0.0005\)"):
        stats.analyze(records, by=("strategy",))
    # Settings only the manifests hold (fine-tuning epochs): named from them.
    records = fake_records(runs).assign(protocol="a")
    records.loc[records["seed"] == 0, "protocol"] = "b"
    ids = records.drop_duplicates("run_id").set_index("seed")["run_id"]
    records.attrs["settings"] = {
        ids[s]: {"finetune_epochs": 1 if s == 0 else 5, "ratios": [2, 4]} for s in range(3)
    }
    with pytest.raises(BadInput, match=r"differ in finetune_epochs \(1 vs 5\)"):
        stats.analyze(records, by=("strategy",))


def test_bootstrap_marks_only_where_its_coverage_is_known_to_hold():
    """5 replicates: a 99 % percentile bootstrap covers about 89 % (benchmarks/ci_coverage.py),
    so it gives no marks there; Student-t does. At 20 replicates the bootstrap marks too."""
    x = [0.2, -0.1, -0.1]

    def analyzed(n, method):
        gen = np.random.default_rng(n)
        runs = [run_with(s, x, [a * v for v in x]) for s, a in enumerate(2 + gen.random(n))]
        return stats.analyze(
            fake_records(runs), by=("strategy",), ci_method=method, n_resamples=500, **NO_FLOOR
        )

    t5, boot5, boot20 = analyzed(5, "t"), analyzed(5, "bootstrap"), analyzed(20, "bootstrap")
    at4 = [a.groups[a.groups["t"] == 4.0].iloc[0] for a in (t5, boot5, boot20)]
    assert at4[0]["mark"] == ">" and at4[1]["mark"] == "" and at4[2]["mark"] == ">"
    assert at4[1]["ci_low"] > 1  # the interval is still reported
    assert any("known to undercover (89.3 % at n = 5" in n for n in boot5.notes), boot5.notes
    assert not any("undercover" in n for n in t5.notes + boot20.notes)


def test_coverage_table_matches_a_fresh_simulation():
    """The table the marks rely on, against 600 fresh draws per cell (binomial SE about 1.3
    points at 89 %, 0.4 at 99 %): the constants are measured, not typed in."""
    from benchmarks.ci_coverage import coverage

    for (method, ci), table in stats.COVERAGE.items():
        for n in (5, 20):
            got = 100 * coverage(method, n, ci, "normal", reps=600, seed=11)
            assert abs(got - table[n]) < 4.5, (method, ci, n, got, table[n])


def test_disparity_is_the_range_of_excess_recall_drops_hand_computed():
    # Dense recalls 0.9, 0.7, 0.5 (accuracy 0.7 with equal support); at t = 8: 0.8, 0.7, 0.2
    # (accuracy 0.5666...). psi_c = (R_1 - R_t) - (A_1 - A_t): 0.1 - 0.1333 = -0.0333,
    # 0 - 0.1333 = -0.1333, 0.3 - 0.1333 = 0.1667: range 0.3, largest 0.1667.
    run = {"seed": 0, "strategy": "mp", "acc": {1.0: 0.7, 8.0: 1.7 / 3},
           "recall": {1.0: [0.9, 0.7, 0.5], 8.0: [0.8, 0.7, 0.2]}}  # fmt: skip
    a = stats.analyze(fake_records([run]), by=("strategy",))
    row = a.runs[a.runs["t"] == 8.0].iloc[0]
    assert row["disparity"] == pytest.approx(0.3, abs=1e-12)
    assert row["max_excess_drop"] == pytest.approx(0.3 - 0.4 / 3, abs=1e-12)
    dense = a.runs[a.runs["t"] == 1.0].iloc[0]
    assert dense["disparity"] == 0.0


def test_step_seconds_are_the_median_per_group_and_printed_as_the_cost_table():
    # Three seeds of mp with steps of 3 s, 5 s and 400 s (a stopped process) at t = 4, their
    # dense training 100, 120 and 130 s: the group's cost at t = 4 is the median, 5.0 s (the
    # mean, 136 s, would be the outlier's); the dense rows keep the training time.
    runs = [run_with(s, [0.2, -0.2], [0.3, -0.3]) for s in (0, 1, 2)]
    records = fake_records(runs)
    seconds = {(0, 0): 100.0, (0, 1): 3.0, (1, 0): 120.0, (1, 1): 5.0, (2, 0): 130.0,
               (2, 1): 400.0}  # fmt: skip
    records["seconds"] = [seconds[s, st] for s, st in zip(records["seed"], records["step"])]
    # Machine time differs from run to run: the tables leave it out unless asked for.
    plain = stats.analyze(records, by=("strategy",), **NO_FLOOR)
    assert "median_seconds" not in plain.groups and "seconds" not in plain.runs
    assert not tables.has_cost(plain)
    a = stats.analyze(records, by=("strategy",), cost=True, **NO_FLOOR)
    g = a.groups.set_index("t")
    assert g.loc[4.0, "median_seconds"] == pytest.approx(5.0)
    assert g.loc[1.0, "median_seconds"] == pytest.approx(120.0)
    assert tables.has_cost(a)
    assert tables.cost_table(a).loc["mp", "t=4"] == "5.0"
    # Records without step times give no cost table rather than an empty one.
    assert not tables.has_cost(
        stats.analyze(fake_records(runs), by=("strategy",), cost=True, **NO_FLOOR)
    )


def test_disparity_group_interval_and_paired_difference_against_scipy():
    rng = np.random.default_rng(5)
    runs = []
    for seed in range(5):
        r1 = list(rng.uniform(0.6, 0.95, size=4))
        for strategy, spread in (("mp", 0.05), ("up", 0.15)):
            rt = [r - rng.uniform(0, spread) for r in r1]
            runs.append({"seed": seed, "strategy": strategy, "acc": {1.0: np.mean(r1),
                         4.0: np.mean(rt)}, "recall": {1.0: r1, 4.0: rt}})  # fmt: skip
    a = stats.analyze(fake_records(runs), by=("strategy",), ci=0.99)
    pruned = a.runs[a.runs["t"] == 4.0]
    for strategy in ("mp", "up"):
        v = pruned.loc[pruned["strategy"] == strategy, "disparity"].to_numpy()
        g = a.groups[(a.groups["strategy"] == strategy) & (a.groups["t"] == 4.0)].iloc[0]
        lo, hi = scipy_stats.t.interval(0.99, len(v) - 1, loc=v.mean(), scale=scipy_stats.sem(v))
        assert g["mean_disparity"] == pytest.approx(v.mean(), rel=1e-12)
        assert (g["disparity_ci_low"], g["disparity_ci_high"]) == (
            pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))  # fmt: skip
    # Hand check of one run's Psi from its recalls, independent of the records pipeline.
    r1, rt = np.array(runs[1]["recall"][1.0]), np.array(runs[1]["recall"][4.0])
    psi = (r1 - rt) - (r1.mean() - rt.mean())
    got = pruned.loc[(pruned["strategy"] == "up") & (pruned["seed"] == 0), "disparity"].item()
    assert got == pytest.approx(psi.max() - psi.min(), rel=1e-12)
    p = a.paired[a.paired["t"] == 4.0].iloc[0]
    up = pruned[pruned["strategy"] == "up"].sort_values("seed")["disparity"].to_numpy()
    mp = pruned[pruned["strategy"] == "mp"].sort_values("seed")["disparity"].to_numpy()
    assert p["mean_disparity_diff"] == pytest.approx((up - mp).mean(), rel=1e-12)
    assert p["disparity_p_value"] == pytest.approx(scipy_stats.ttest_rel(up, mp).pvalue, rel=1e-9)


def test_floor_hides_alpha_and_its_mark_near_chance_and_counts_the_cells():
    # Four classes (chance 0.25, floor 2 x chance = 0.5; halfway from chance to the dense
    # accuracy 0.9: 0.575): a group at accuracy 0.45 and one at 0.9.
    runs = []
    for seed, noise in enumerate((0.0, 0.1, -0.1)):
        for strategy, at in (("rp", 0.45), ("mp", 0.9)):
            x = [0.1, -0.1, 0.05, -0.05]
            y = [(3 + noise) * v for v in x]
            runs.append(run_with(seed, x, y, a1=0.9, at=at, strategy=strategy))
    a = stats.analyze(fake_records(runs), by=("strategy",), vs="mp")
    g = a.groups.set_index(["strategy", "t"])
    assert g.loc[("rp", 4.0), "accuracy_floor"] == pytest.approx(0.575)
    assert bool(g.loc[("rp", 4.0), "below_floor"]) and g.loc[("rp", 4.0), "mark"] == ""
    assert not g.loc[("mp", 4.0), "below_floor"] and g.loc[("mp", 4.0), "mark"] == ">"
    # The numbers stay in the table; the printed cell does not show them.
    assert g.loc[("rp", 4.0), "mean_alpha"] == pytest.approx(3.0, abs=0.05)
    alpha_tab, _ = tables.paper_tables(a)
    assert alpha_tab.loc["rp", "t=4"] == tables.BELOW_FLOOR
    assert alpha_tab.loc["mp", "t=4"].endswith(">")
    assert any("1 (group, t) cells have a mean accuracy at most 2 x chance" in n for n in a.notes)
    p = a.paired.set_index(["strategy", "t"])
    assert bool(p.loc[("rp", 4.0), "below_floor"]) and p.loc[("rp", 4.0), "mark"] == ""
    # A floor of 1.5 (0.375) still hides the collapsed group (0.45 of a dense 0.9: below
    # halfway, 0.575); 0 switches the floor off.
    b = stats.analyze(fake_records(runs), by=("strategy",), floor=1.5)
    assert b.groups.set_index(["strategy", "t"]).loc[("rp", 4.0), "below_floor"]
    b = stats.analyze(fake_records(runs), by=("strategy",), floor=0.0)
    assert not b.groups["below_floor"].any()
    assert b.groups.set_index(["strategy", "t"]).loc[("rp", 4.0), "mark"] == ">"
    with pytest.raises(BadInput, match="--floor"):
        stats.analyze(fake_records(runs), by=("strategy",), floor=-1)


def test_accuracy_floor_rises_to_halfway_from_chance_to_the_dense_accuracy():
    # By hand: 10 classes, dense 0.98 -> (0.1 + 0.98) / 2 = 0.54 above 2 x chance (0.2); a
    # dense 0.3 leaves 2 x chance (0.2) above (0.1 + 0.3) / 2; floor 0: nothing hidden.
    got = stats.accuracy_floor(2.0, np.array([10, 10]), np.array([0.98, 0.3]))
    np.testing.assert_allclose(got, [0.54, 0.2])
    assert stats.accuracy_floor(0.0, np.array([10]), np.array([0.98])).tolist() == [0.0]


def test_accuracy_floor_is_a_multiple_of_chance_capped_halfway_to_one():
    # floor / C, but never above (1 + 1/C) / 2: by hand for 10, 100, 3 and 2 classes.
    got = stats.accuracy_floor(2.0, np.array([10, 100, 3, 2]))
    np.testing.assert_allclose(got, [0.2, 0.02, 2 / 3, 0.75])


def test_a_manifest_setting_splits_groups_and_each_side_pairs_with_plain(tmp_path):
    """ceag at two tolerances beside plain on the same dense models: the default grouping
    refuses them by the setting's name; --by ceag_tolerance splits them, and each tolerance
    pairs with the plain run of its seed (differences by hand)."""
    x = [0.2, -0.1, -0.1]
    sides = {"plain": [1.2, 1.5, 0.9], "c1": [1.1, 1.4, 0.8], "c2": [1.0, 1.2, 0.6]}
    runs = [
        run_with(s, x, [a * v for v in x], tag=tag)
        for tag, factors in sides.items()
        for s, a in enumerate(factors)
    ]
    records = fake_records(runs)
    tag = records["run_id"].str.rsplit("-", n=1).str[1]
    records["mitigation"] = np.where(tag == "plain", "plain", "ceag")
    records["mitigation_settings"] = tag
    tolerance = {"c1": 0.1, "c2": 0.01}
    records.attrs["settings"] = {
        rid: ({"mitigation": "ceag", "ceag_tolerance": tolerance[t]} if t in tolerance else {})
        for rid, t in zip(records["run_id"], tag)
    }
    with pytest.raises(BadInput, match=r"differ in ceag_tolerance \(0.1 vs 0.01\)"):
        stats.analyze(records, by=("strategy", "mitigation"))
    by = ("strategy", "mitigation", "ceag_tolerance")
    a = stats.analyze(records, by=by, vs="plain", **NO_FLOOR)
    labels = {tables.group_label(r, by) for _, r in a.groups.iterrows()}
    assert labels == {"mp plain", "mp ceag ceag_tolerance=0.1", "mp ceag ceag_tolerance=0.01"}
    p = a.paired[a.paired["t"] == 4.0].set_index("ceag_tolerance")
    assert p["n"].to_dict() == {"ceag_tolerance=0.1": 3, "ceag_tolerance=0.01": 3}
    assert p.loc["ceag_tolerance=0.1", "mean_diff"] == pytest.approx(-0.1)
    assert p.loc["ceag_tolerance=0.01", "mean_diff"] == pytest.approx((-0.2 - 0.3 - 0.3) / 3)
    # The tables printed again from their CSVs name the same groups.
    stats.write_tables(a, tmp_path)
    again = stats.read_tables(tmp_path)
    assert {tables.group_label(r, by) for _, r in again.groups.iterrows()} == labels
    with pytest.raises(BadInput, match="or a setting the runs' manifests hold"):
        stats.analyze(records, by=("strategy", "colour"))


def test_across_differences_equal_scipy_welch(tmp_path):
    """--across width=1: each width's groups against width 1's with the same strategy, unpaired
    (another dense model each), as scipy.stats.ttest_ind(equal_var=False) computes them."""
    x = [0.2, -0.1, -0.1]
    wide = {"alpha": [1.0, 1.1, 0.95, 1.05], "acc": [0.80, 0.81, 0.79, 0.80]}
    narrow = {"alpha": [1.6, 1.9, 1.5, 1.7, 2.0], "acc": [0.70, 0.74, 0.69, 0.72, 0.71]}
    runs = [
        run_with(s, x, [(al + shift) * v for v in x], strategy=strategy, at=acc, width=w)
        for strategy, shift in (("mp", 0.0), ("up", 0.1))
        for w, d in ((1.0, wide), (0.5, narrow))
        for s, (al, acc) in enumerate(zip(d["alpha"], d["acc"]))
    ]
    a = stats.analyze(fake_records(runs), by=("strategy", "width"), ci=0.95, across="width=1",
                      **NO_FLOOR)  # fmt: skip
    assert a.across_setting == ("width", 1.0)
    c = a.across[a.across["t"] == 4.0].set_index("strategy")
    assert list(c["width"]) == [0.5, 0.5]
    assert list(c["n"]) == [5, 5] and list(c["n_reference"]) == [4, 4]
    for strategy, shift in (("mp", 0.0), ("up", 0.1)):
        row = c.loc[strategy]
        hi_alpha = np.add(narrow["alpha"], shift)
        lo_alpha = np.add(wide["alpha"], shift)
        ref = scipy_stats.ttest_ind(hi_alpha, lo_alpha, equal_var=False)
        lo, hi = ref.confidence_interval(0.95)
        assert row["mean_diff"] == pytest.approx(hi_alpha.mean() - lo_alpha.mean())
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert row["p_value"] == pytest.approx(ref.pvalue)
        acc = scipy_stats.ttest_ind(narrow["acc"], wide["acc"], equal_var=False)
        assert row["acc_p_value"] == pytest.approx(acc.pvalue)
        assert row["mean_acc_diff"] == pytest.approx(np.mean(narrow["acc"]) - 0.80)
        assert row["mark"] == ">" and row["acc_mark"] == "<"
    # Holm over the family of the column (mp and up at t = 4).
    want = np.minimum(1, 2 * np.sort(c["p_value"].to_numpy()))
    want[1] = max(want)
    assert sorted(c["p_adjusted"]) == pytest.approx(want)
    alpha_tab, acc_tab, _ = tables.across_tables(a)
    assert list(alpha_tab.index) == ["mp width 0.5", "up width 0.5"]
    assert alpha_tab.loc["mp width 0.5", "t=4"] == f"{c.loc['mp', 'mean_diff']:+.2f}>"
    assert "width 1" in tables.across_legend(a) and "Welch" in tables.across_legend(a)
    assert "4 of 4 alpha differences against width 1" not in tables.summary(a)[-1]
    assert "2 of 2 alpha differences against width 1" in tables.summary(a)[-1]
    # The table travels with the others and prints again from its CSV.
    stats.write_tables(a, tmp_path)
    again = stats.read_tables(tmp_path)
    assert tables.across_tables(again)[0].equals(alpha_tab)
    assert tables.across_legend(again) == tables.across_legend(a)


def test_across_refuses_what_it_cannot_compare():
    x = [0.2, -0.1, -0.1]
    runs = [run_with(s, x, x, width=w) for s in range(3) for w in (0.5, 1.0)]
    records = fake_records(runs)
    for across, message in (("width=2", "no such width"), ("width", "COLUMN=VALUE"),
                            ("dataset=toy", "--by must include it")):  # fmt: skip
        with pytest.raises(BadInput, match=message):
            stats.analyze(records, by=("strategy", "width"), across=across)
    # A group without a reference partner is named in the notes, not compared.
    lone = stats.analyze(records[records["width"] == 0.5], by=("strategy", "width"),
                         across="width=0.5")  # fmt: skip
    assert lone.across is None and any("no comparison across width" in n for n in lone.notes)


def test_across_names_a_reference_by_its_value():
    from rdfast.stats.across import reference_value

    settings = pd.Series(["finetune_epochs=10", "finetune_epochs=3"])
    assert reference_value(settings, "finetune_epochs", "3") == "finetune_epochs=3"
    assert reference_value(settings, "finetune_epochs", "finetune_epochs=10") == settings[0]
    assert reference_value(pd.Series([0.5, 1.0]), "width", "1") == 1.0
    assert reference_value(pd.Series(["mnist", "digits"]), "dataset", "digits") == "digits"
    with pytest.raises(BadInput, match="no such finetune_epochs"):
        reference_value(settings, "finetune_epochs", "30")
    assert tables.setting_text("finetune_epochs", "finetune_epochs=3") == "finetune_epochs=3"
    assert tables.setting_text("width", 1.0) == "width 1"
    assert tables.setting_text("dataset", "mnist") == "dataset mnist"


def test_runs_of_a_dense_model_that_did_not_train_are_left_out():
    x = [0.2, -0.1, -0.1, 0.0]  # four classes: chance 0.25, untrained below 1.5 x 0.25
    trained = [run_with(s, x, [1.1 * v for v in x], a1=0.8, at=0.78) for s in range(3)]
    diverged = run_with(3, x, [3.0 * v for v in x], a1=0.3, at=0.3)  # a seed near chance
    records = fake_records([*trained, diverged])
    a = stats.analyze(records, by=("strategy",))
    assert set(a.runs["seed"]) == {0, 1, 2} and len(a.untrained) == 1
    assert any("1 runs left out" in n and "0.300" in n for n in a.notes), a.notes
    g = a.groups.set_index("t").loc[4.0]
    assert g["n"] == 3 and g["mean_alpha"] == pytest.approx(1.1)
    # --floor 0 keeps every run, the diverged one included.
    kept = stats.analyze(records, by=("strategy",), floor=0.0)
    assert set(kept.runs["seed"]) == {0, 1, 2, 3} and kept.untrained == ()
    # The limit by hand: below 1.5 x chance and a quarter of the way from chance to 1.
    from rdfast.stats.measures import untrained_runs

    def limit(c, a1):
        rows = pd.DataFrame({"run_id": "r", "A1": a1, "class": range(c)})
        return len(untrained_runs(rows, 2.0)) == 1

    assert limit(10, 0.1499) and not limit(10, 0.1501)
    assert limit(2, 0.6249) and not limit(2, 0.6251)  # not 0.75: a weak binary model stays


def test_a_dense_model_near_chance_is_warned_of_when_trained():
    from rdfast.runs.dense import warn_untrained

    said = []
    diverged = np.zeros((10, 10), dtype=np.int64)
    diverged[:, 3] = 100  # every test image called class 3: accuracy 0.1
    warn_untrained(diverged, 1, said.append)
    assert len(said) == 1 and "dense seed 1" in said[0] and "0.100" in said[0]
    trained = np.diag(np.full(10, 100))
    trained[0, 1] = 500  # accuracy 1000 / 1500: far above chance
    warn_untrained(trained, 2, said.append)
    assert len(said) == 1
