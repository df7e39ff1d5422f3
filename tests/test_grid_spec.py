"""Grid specs: how a spec expands into runs and dense models (counted by hand), and bad specs
refused in one line naming the key, exit code 2, nothing written."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from rdfast.cli.main import cli
from rdfast.errors import BadInput
from rdfast.grid import spec as grid_spec


def expand(text: str):
    return grid_spec.expand(grid_spec.tomllib.loads(text), "spec.toml")


def test_axes_multiply_and_runs_that_cannot_differ_are_one():
    g = expand("""
seeds = "0-2"
strategy = "all"
saliency = ["taylor", "sum"]
width = [0.5, 1]
""")
    # Per (width, seed): mp and rp ignore the saliency form (one run each), gp and up do not
    # (two each): 6 runs; 2 widths x 3 seeds = 6 dense models.
    assert g.points == 4
    assert len(g.dense) == 6
    assert len(g.runs) == 2 * 3 * 6
    by = {}
    for r in g.runs.values():
        by.setdefault((r.exp.width, r.seed), []).append((r.strategy, r.exp.prune.saliency))
    assert sorted(s for s, _ in by[(0.5, 0)]) == ["gp", "gp", "mp", "rp", "up", "up"]


def test_subgrids_override_the_top_level_and_share_dense_models():
    g = expand("""
seeds = [0, 1]
strategy = ["mp"]
epochs = 3
ratios = "2,4"

[[grid]]
retrain = "finetune"

[[grid]]
retrain = "finetune"
finetune_epochs = [1, 2]

[[grid]]
epochs = 4
""")
    # Sub-grids 1 and 2 train the same dense models (fine-tuning does not enter the dense
    # key) but make different runs (sub-grid 1 fine-tunes for digits' preset 4 epochs, 2 for
    # 1 and 2); sub-grid 3 trains for 4 epochs: new dense models.
    assert len(g.dense) == 4
    assert [r.exp.prune.ratios for r in g.runs.values()][0] == (2.0, 4.0)
    assert len(g.runs) == 2 * (1 + 2 + 1)
    assert {r.exp.train.epochs for r in g.runs.values()} == {3, 4}
    assert {r.threads for r in g.runs.values()} == {1}


def test_a_list_of_ratio_lists_is_an_axis_and_flag_spellings_are_keys():
    g = expand("""
seeds = "0"
strategy = "mp"
ratios = [[2, 4], [2, 8]]
finetune-epochs = 1
[resources]
num_cpus = 2
""")
    assert sorted(r.exp.prune.ratios for r in g.runs.values()) == [(2.0, 4.0), (2.0, 8.0)]
    assert {r.exp.prune.finetune_epochs for r in g.runs.values()} == {1}
    assert {r.threads for r in g.runs.values()} == {2}  # the task's CPUs are its threads


def test_shipped_specs_expand():
    cpu = grid_spec.load("paper-cpu")
    gpu = grid_spec.load("paper-gpu")
    # (3 datasets x 4 mlp widths + 2 datasets x lenet5) x 2 retraining modes x 10 seeds:
    # 280 dense models; each with mp, rp and gp, up under two saliency forms: 6 runs.
    assert len(cpu.dense) == 280 and len(cpu.runs) == 1680
    # 2 datasets x 4 models x 5 seeds, four strategies each.
    assert len(gpu.dense) == 40 and len(gpu.runs) == 160
    assert {r.exp.device for r in gpu.runs.values()} == {"cuda"}
    assert {r.resources["num_gpus"] for r in gpu.runs.values()} == {1.0}
    # 2 datasets x 2 widths x 10 seeds; mp and up under three mitigations each, which share
    # their dense models.
    mit = grid_spec.load("mitigations")
    assert len(mit.dense) == 40 and len(mit.runs) == 240
    counts = pd.Series([r.exp.prune.mitigation for r in mit.runs.values()]).value_counts()
    assert counts.to_dict() == {"plain": 80, "kd": 80, "constrained": 80}
    # 2 widths x 5 seeds, five strategies each, under the CPU preset (15 epochs, 1 of
    # fine-tuning) and the default model of CIFAR-10.
    cifar = grid_spec.load("cifar10-cpu")
    assert len(cifar.dense) == 10 and len(cifar.runs) == 50
    assert {(r.exp.model, r.exp.train.epochs, r.exp.prune.finetune_epochs)
            for r in cifar.runs.values()} == {("resnet20", 15, 1)}  # fmt: skip
    # (digits: mlp; mnist, fashion-mnist, cifar10: mlp and lenet5) x 2 widths x 10 seeds.
    claim4 = grid_spec.load("claim4")
    assert len(claim4.dense) == 140 and len(claim4.runs) == 420
    # Fashion-MNIST: 2 widths x 10 seeds; CIFAR-10: 5 seeds. Per Fashion-MNIST dense model:
    # mp, up, cs plain; gp, up taylor-max; mp, up under ceag (two tolerances) and kd (11);
    # per CIFAR-10 one: mp, up, cs; up taylor-max; mp, up under ceag (two) and kd (10); and
    # five Fashion-MNIST ones at width 1 fine-tuned for 10 epochs a step, plain and ceag.
    fair = grid_spec.load("fairness")
    assert len(fair.dense) == 25 and len(fair.runs) == 20 * 11 + 5 * 10 + 5 * 2
    tolerances = {r.exp.prune.ceag_tolerance for r in fair.runs.values()
                  if r.exp.prune.mitigation == "ceag"}  # fmt: skip
    assert tolerances == {0.1, 0.01}
    # Its CIFAR-10 mp and up runs are cifar10-cpu's at width 0.5 (one --out trains them once).
    plain = {k for k, r in fair.runs.items() if r.exp.dataset.startswith("cifar10")
             and r.exp.prune.mitigation == "plain" and r.strategy in ("mp", "up")
             and r.exp.prune.saliency == "taylor"}  # fmt: skip
    assert len(plain) == 10 and plain <= set(cifar.runs)
    saliency = {(r.strategy, r.exp.prune.saliency) for r in fair.runs.values()
                if r.exp.prune.saliency != "taylor"}  # fmt: skip
    assert saliency == {("gp", "taylor-max"), ("up", "taylor-max")}
    # 2 datasets x 2 widths x 10 seeds, five strategies each; its Fashion-MNIST mp and up are
    # the fairness spec's plain ones (the same run ids: one --out trains them once).
    claims = grid_spec.load("claims-lenet")
    assert len(claims.dense) == 40 and len(claims.runs) == 200
    shared = {k for k, r in claims.runs.items() if r.exp.dataset == "fashion-mnist"
              and r.strategy in ("mp", "up")}  # fmt: skip
    assert len(shared) == 40 and shared <= set(fair.runs)


BAD = [
    ('epoch = 3', "spec.toml: unknown key 'epoch'; did you mean epochs?"),
    ('epochs = "ten"', "spec.toml: epochs must be an integer, got 'ten'"),
    ('epochs = 2.5', "spec.toml: epochs must be an integer, got 2.5"),
    ('lr = true', "spec.toml: lr must be a number, got True"),
    ('width = []', "spec.toml: width is an empty axis"),
    ('seeds = []', "spec.toml: seeds is an empty list"),
    ('retrain = "prune"', "spec.toml: retrain must be one of finetune, rewind, got 'prune'"),
    ('strategy = ["mp", "xp"]', "unknown strategy xp"),
    ('seeds = "3-1"', "malformed --seeds '3-1'"),
    ('ratios = [2, "4"]', "spec.toml: ratios must be a list of numbers"),
    ('out = "runs"', "spec.toml: key 'out' is given on the command line (--out)"),
    ('[resources]\nnum_gpu = 1', "spec.toml: unknown key resources.num_gpu"),
    ('[[grid]]\nepochs = 0', "spec.toml [[grid]] 1: --epochs must be >= 1, got 0"),
    ('width = [0.5, 1]\n[[grid]]\nepochs = [2, 0]',
     "spec.toml [[grid]] 1 (width=0.5, epochs=0): --epochs must be >= 1, got 0"),
    ('[[grid]]\ndataset = "cifar1000"', "unknown dataset 'cifar1000'"),
    ('[[grid]]\nmodel = "resnet21"', "unknown model 'resnet21'"),
    ('device = "cuda"', "device cuda needs resources.num_gpus > 0"),
    ('imports = ["no_such_module_here"]', "imports: cannot import no_such_module_here"),
    ('grid = []', "spec.toml: grid is empty"),
    ('epochs = [3, 4', "spec.toml: not valid TOML"),
]  # fmt: skip


@pytest.mark.parametrize("line,message", BAD, ids=[b[0] for b in BAD])
def test_bad_specs_are_one_line_naming_the_key_exit_2_nothing_written(tmp_path, line, message):
    spec = tmp_path / "spec.toml"
    spec.write_text(line + "\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["grid", str(spec), "--out", str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rdfast: error: "), res.output
    assert message in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--executor", "slurm"], "Invalid value for '--executor'"),
        (["--executor", "ray", "--address", "127.0.0.1:1"], "cannot reach Ray at 127.0.0.1:1"),
        (["--executor", "ray", "--address", "ray://127.0.0.1:1"],
         "cannot reach Ray at ray://127.0.0.1:1"),
        (["--executor", "ray", "--address", "head-node"], "--address head-node: use auto"),
        (["--address", "auto"], "--address is for --executor ray"),
        (["--workers", "0"], "--workers must be >= 1"),
    ],
)  # fmt: skip
def test_bad_executor_options_exit_2_nothing_written(tmp_path, args, message):
    spec = tmp_path / "spec.toml"
    spec.write_text('seeds = "0"\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["grid", str(spec), "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output
    assert not out.exists()


def test_a_missing_spec_names_the_shipped_ones(tmp_path):
    with pytest.raises(BadInput, match="paper-cpu, paper-gpu"):
        grid_spec.load(tmp_path / "nope.toml")
