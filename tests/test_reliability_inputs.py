"""Bad input to every command, as a user or a damaged file gives it: one line on stderr,
exit 2 (bad input) or 1 (the machine's state), no traceback, nothing written. Checkpoints
are untrusted input: their headers and indexes are checked by the safetensors format's rules
before a byte of data is used, and every shard must lie inside the checkpoint's folder."""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from rdfast.cli.main import cli
from tests.conftest import ROOT


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)


def one_error_line(res, *, code=2) -> str:
    assert res.exit_code == code, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rdfast: error: "), res.output
    return lines[0]


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("seeds", ["0-3000000000", "0-100000000", "5-2147483648", "0-10000,9"])
def test_huge_seed_ranges_are_refused_by_their_bounds(tmp_path, seeds):
    """Checked by bounds before any seed is made (a range built first took 23 GB): run,
    prune and a grid spec alike, each in well under a second of parsing."""
    out = tmp_path / "out"
    line = one_error_line(invoke("run", "--seeds", seeds, "--out", out))
    assert "--seeds" in line
    ckpt = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(ckpt))
    one_error_line(invoke("prune", "--checkpoint", ckpt, "--seeds", seeds, "--out", out))
    spec = tmp_path / "s.toml"
    spec.write_text(f'dataset = "digits"\nseeds = "{seeds}"\n')
    one_error_line(invoke("grid", "run", spec, "--out", out, "--dry-run"))
    assert not out.exists()


# --------------------------------------------------------------------------- grid = run


@pytest.mark.parametrize(
    "body, message",
    [
        ("ratios = [2, 1e300]", "ratio t=1e+300 leaves no weight"),
        ('exclude = "nosuchlayer"', "--exclude names no prunable layer: nosuchlayer"),
        ('exclude = "fc1,fc2,fc3"', "--exclude leaves no layer to prune"),
        ('mitigation = "constrained"\nval_fraction = 0.0001', "--val-fraction 0.0001"),
        ('normalize = "0.5,0.5/0.5,0.5"', "2 mean and 2 std values for 1 input"),
    ],
)
def test_grid_refuses_at_dry_run_what_run_refuses(tmp_path, body, message):
    spec = tmp_path / "s.toml"
    spec.write_text(f'dataset = "digits"\nepochs = 1\n{body}\n')
    for args in (["--dry-run"], []):
        line = one_error_line(invoke("grid", "run", spec, "--out", tmp_path / "out", *args))
        assert message in line and "s.toml" in line, line
    assert not (tmp_path / "out").exists()
    flags = body.replace(" = ", "=").replace('"', "").split("\n")
    args = []
    for f in flags:
        k, v = f.split("=")
        args += [f"--{k.replace('_', '-')}", v.strip("[]").replace(" ", "")]
    line = one_error_line(invoke("run", "--epochs", "1", *args, "--out", tmp_path / "out"))
    assert message in line  # the same check, the same words


def test_grid_refuses_a_subset_smaller_than_the_classes(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('dataset = "digits:train=5"\n')
    line = one_error_line(invoke("grid", "run", spec, "--out", tmp_path / "out", "--dry-run"))
    assert "stratified training subset of 5" in line


def test_non_utf8_spec_is_one_line(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_bytes(b'name = "\xff\xfe"\n')
    line = one_error_line(invoke("grid", "run", spec, "--dry-run"))
    assert "not UTF-8" in line


# --------------------------------------------------------------------------- checkpoints


def raw_safetensors(path, header, data: bytes = b"") -> None:
    """A safetensors file with exactly this header (any JSON) and data."""
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


GOOD = {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
DAMAGED_HEADERS = {
    "a JSON list": [1, 2],
    "a tensor that is a string": {"a.weight": "F32"},
    "no data_offsets": {"a.weight": {"dtype": "F32", "shape": [2, 2]}},
    "shape a string": {"a.weight": {"dtype": "F32", "shape": "2,2", "data_offsets": [0, 16]}},
    "float offsets": {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0.0, 16.0]}},
    "negative offsets": {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}},
    "negative shape": {"a.weight": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}},
    "reversed offsets": {"a.weight": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}},
    "overlapping tensors": {
        "a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
    },
    "metadata not strings": {**GOOD, "__metadata__": {"format": 1}},
    "deeply nested": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("what", list(DAMAGED_HEADERS))
@pytest.mark.parametrize("mode", ["streamed", "model"])
def test_damaged_safetensors_headers_are_one_line(tmp_path, what, mode):
    ckpt = tmp_path / "model.safetensors"
    raw_safetensors(ckpt, DAMAGED_HEADERS[what], bytes(32))
    out = tmp_path / "out"
    extra = ["--model", "mlp", "--dataset", "digits"] if mode == "model" else []
    line = one_error_line(invoke("prune", "--checkpoint", ckpt, *extra, "--out", out))
    assert str(ckpt) in line
    assert not out.exists()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**40), 2**40)
        | st.floats()
        | st.text(max_size=5),
        lambda kids: (
            st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
        ),
        max_leaves=12,
    ),
    data=st.binary(max_size=40),
)
def test_any_header_is_used_or_refused_in_one_line(tmp_path, header, data):
    """Whatever JSON the header holds, rdfast reads it as the safetensors library does or
    refuses it as bad input: never a traceback, never a file the library itself refuses."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from rdfast.errors import BadInput
    from rdfast.pruning.checkpoints import Checkpoint

    ckpt = tmp_path / "h.safetensors"
    raw_safetensors(ckpt, {"t": header} if not isinstance(header, dict) else header, data)
    try:
        Checkpoint(ckpt)
    except BadInput:
        return
    try:
        load_file(str(ckpt))
    except SafetensorError as e:  # rdfast accepted what the library refuses
        if "MetadataIncompleteBuffer" not in str(e):  # trailing bytes: the library's own
            raise AssertionError(f"accepted a header the library refuses: {e}") from None


def sharded(tmp_path, weight_map):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a.weight": torch.ones(3, 3)}, str(folder / "model-1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    "weight_map, message",
    [
        (["model-1.safetensors"], "weight_map must map tensor names"),
        (None, "weight_map must map tensor names"),
        ({"a.weight": 3}, "weight_map must map tensor names"),
        ({"a.weight": "../../secret.safetensors"}, "is not a file name of the checkpoint's folder"),
        ({"a.weight": "/etc/passwd"}, "is not a file name of the checkpoint's folder"),
        ({"a.weight": "link.safetensors"}, "leads out of the checkpoint's folder"),
    ],
)
def test_index_paths_stay_inside_the_folder(tmp_path, weight_map, message):
    secret = tmp_path / "secret.safetensors"
    save_file({"a.weight": torch.ones(3, 3)}, str(secret))
    folder = sharded(tmp_path, weight_map)
    (folder / "link.safetensors").symlink_to(secret)
    out = tmp_path / "out"
    line = one_error_line(invoke("prune", "--checkpoint", folder, "--out", out))
    assert message in line, line
    assert not out.exists()


def test_hub_cache_snapshots_are_read_through_their_blob_links(tmp_path):
    """snapshots/REV/NAME -> ../../blobs/HASH is how the Hugging Face cache stores a model:
    those links stay inside the model's own repository folder and are read."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"a.weight": torch.randn(8, 8)}, str(repo / "blobs" / "f00d"))
    (snap / "model.safetensors").symlink_to("../../blobs/f00d")
    res = invoke("prune", "--checkpoint", snap, "--ratios", "2", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "t2" / "model.safetensors").is_file()


def test_full_disk_under_save_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **kw):
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: "
            'StorageFull, message: "No space left on device" })'
        )

    from rdfast.models import build_model

    ckpt = tmp_path / "m.safetensors"
    save_file(build_model("mlp", (64,), 10, 1.0).state_dict(), str(ckpt))
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    res = invoke("prune", "--checkpoint", ckpt, "--model", "mlp", "--dataset", "digits",
                 "--ratios", "2", "--save", "--out", out, "--no-progress")  # fmt: skip
    line = [x for x in res.output.splitlines() if x.startswith("rdfast: error")]
    assert res.exit_code == 1 and len(line) == 1 and "No space left" in line[0], res.output
    assert not list(out.rglob("*.safetensors"))


def test_one_line_as_a_process_too(tmp_path):
    """The console entry point, stderr only, no traceback."""
    ckpt = tmp_path / "model.safetensors"
    raw_safetensors(ckpt, [1, 2])
    res = subprocess.run([sys.executable, "-m", "rdfast.cli.main", "prune", "--checkpoint",
                          str(ckpt), "--out", str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=ROOT)  # fmt: skip
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert errno.ENOSPC == 28


# --------------------------------------------------------------------------- minor ones


def test_prune_records_never_go_among_a_users_files(tmp_path):
    from rdfast.models import build_model

    ckpt = tmp_path / "mlp.pt"
    torch.save(build_model("mlp", (64,), 10, 0.5).state_dict(), ckpt)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    res = invoke("prune", "--model", "mlp", "--width", "0.5", "--checkpoint", ckpt,
                 "--dataset", "digits", "--out", mine)  # fmt: skip
    assert "not empty and holds no rdfast records" in one_error_line(res)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_nan_weights_with_a_dataset_say_so_on_stderr(tmp_path):
    from rdfast.models import build_model

    state = build_model("mlp", (64,), 10, 0.5).state_dict()
    next(v for k, v in state.items() if k.endswith("weight"))[0, 0] = float("nan")
    ckpt = tmp_path / "mlp.pt"
    torch.save(state, ckpt)
    res = invoke("prune", "--model", "mlp", "--width", "0.5", "--checkpoint", ckpt,
                 "--dataset", "digits", "--out", tmp_path / "out", "--no-progress")  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "failed" in res.stderr and "NaN" in res.stderr, res.stderr


def test_out_below_a_file_says_it_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    ckpt = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(ckpt))
    res = invoke("prune", "--checkpoint", ckpt, "--out", tmp_path / "file" / "x")
    assert "is a file" in one_error_line(res)


def test_a_grid_with_no_run_complete_names_no_records(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('dataset = "digits"\nseeds = "0"\nstrategy = "mp"\nratios = [2]\n'
                    "epochs = 1\nlr = 1e12\n")  # fmt: skip
    res = invoke("grid", "run", spec, "--out", tmp_path / "out", "--workers", "1",
                 "--no-progress")  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "0/1 runs complete" in res.output and "records:" not in res.output
