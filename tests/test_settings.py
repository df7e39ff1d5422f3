"""One declaration per setting: the flags of `rdfast run`, their parsing and the run keys
all come from the fields of Experiment, TrainSettings and PruneSettings."""

from __future__ import annotations

import dataclasses

import click
from click.testing import CliRunner

from rdfast.cli.main import cli
from rdfast.commands import build_experiment
from rdfast.config import Experiment, PruneSettings, TrainSettings
from rdfast.settings import click_options, flag_name, flags, run_key, setting


def test_every_flag_field_is_an_option_of_run():
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    for cls in (Experiment, TrainSettings, PruneSettings):
        for f in flags(cls):
            assert flag_name(f) in help_text, (cls.__name__, f.name)
            assert f.metadata["help"], f.name


MITIGATION_KEYS = {
    "kd": {"mitigation", "kd_weight", "kd_temperature"},
    "constrained": {"mitigation", "constraint_eps", "multiplier_lr", "val_fraction"},
    "ceag": {"mitigation", "ceag_tolerance", "dual_lr", "ceag_memory"},
}


def test_every_prune_setting_enters_the_run_key():
    train = TrainSettings(epochs=3, lr=0.1, batch_size=32, weight_decay=5e-4)
    names = {f.metadata.get("key_name") or f.name for f in dataclasses.fields(PruneSettings)}
    mitigation_keys = set().union(*MITIGATION_KEYS.values())
    for strategy in ("mp", "up"):
        # Plain retraining: the mitigation settings are left out, so the runs recorded
        # before they existed keep their ids.
        assert set(run_key(PruneSettings(), train, strategy)) == names - mitigation_keys
        for mitigation, own in MITIGATION_KEYS.items():
            key = run_key(PruneSettings(mitigation=mitigation), train, strategy)
            assert set(key) == names - mitigation_keys | own
    key = run_key(PruneSettings(mitigation="kd", kd_temperature=2.0), train, "mp")
    assert key["mitigation"] == "kd" and key["kd_temperature"] == 2.0
    # Values that cannot matter for a strategy or a mode are None (or "none"): runs that
    # cannot differ share a key.
    key = run_key(PruneSettings(up_eps=0.1, retrain="rewind"), train, "mp")
    assert key["eps"] is None and key["saliency"] == "none" and key["finetune_lr"] is None
    assert run_key(PruneSettings(up_eps=0.1), train, "up")["eps"] == 0.1


def test_a_new_setting_is_one_field():
    """A field added to the prune settings becomes a flag, is parsed, and enters the key."""
    Extended = dataclasses.make_dataclass(
        "Extended",
        [("demo_knob", int, setting(3, "A knob that changes results."))],
        bases=(PruneSettings,),
        frozen=True,
    )

    @click.command()
    @click_options(Extended)
    def command(**kw):
        click.echo(repr(kw["demo_knob"]))

    res = CliRunner().invoke(command, ["--demo-knob", "7"])
    assert res.exit_code == 0 and res.output.strip() == "7"
    assert "A knob that changes results." in CliRunner().invoke(command, ["--help"]).output
    train = TrainSettings(epochs=3, lr=0.1, batch_size=32, weight_decay=5e-4)
    assert run_key(Extended(demo_knob=7), train, "mp")["demo_knob"] == 7


def test_flags_as_text_or_values_build_the_same_experiment():
    common = dict(dataset="digits", model="mlp", out="runs", epochs=2)
    text = build_experiment(seeds="0-2", strategies="mp,up", ratios="2,4", exclude="fc3", **common)
    values = build_experiment(
        seeds=(0, 1, 2), strategies=("mp", "up"), ratios=(2.0, 4.0), exclude=("fc3",), **common
    )
    assert text == values
    assert text.train.epochs == 2 and text.train.lr > 0  # the rest from the preset
    assert text.prune.finetune_epochs > 0  # a preset field left out
