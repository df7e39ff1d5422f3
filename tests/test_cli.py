"""The command line end to end, and every bad-input case."""

import os
import signal
import subprocess
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from rdfast.cli.main import cli
from rdfast.runs import store
from tests.conftest import TINY, process_args, run_args

RECORD_COLUMNS = {
    "dataset",
    "model",
    "width",
    "seed",
    "strategy",
    "saliency",
    "eps",
    "t_target",
    "t_actual",
    "remaining",
    "total",
    "class",
    "support",
    "recall",
    "accuracy",
    "loss",
    "seconds",
}


def invoke(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def check_records(out, strategies, ratios, n_classes, seeds=(0,)):
    df = pd.read_parquet(out / "records.parquet")
    assert RECORD_COLUMNS <= set(df.columns)
    assert len(df) == len(seeds) * len(strategies) * (len(ratios) + 1) * n_classes
    assert set(df["strategy"]) == set(strategies)
    assert sorted(set(df["t_target"])) == [1.0, *ratios]
    for m in (out / "runs").iterdir():
        assert store.read_json(m / "manifest.json")["status"] == "complete"
    return df


def test_run_digits_end_to_end(tmp_path):
    res = invoke("run", *TINY, "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    df = check_records(tmp_path, ["mp", "gp", "up", "rp"], [2.0, 4.0], 10)
    assert "mean test accuracy" in res.output and "records:" in res.output
    # gp, up and rp against mp, seed by seed, under the alpha table.
    paired = res.output.split("E[alpha_t(s) - alpha_t(mp)]")[1].split("accuracy minus mp")[0]
    assert [ln.split()[0] for ln in paired.splitlines()[2:] if ln.strip()] == ["gp", "up", "rp"]
    assert (tmp_path / "confusion.parquet").exists()
    cm = pd.read_parquet(tmp_path / "confusion.parquet")
    assert cm.groupby(["run_id", "step"])["count"].sum().eq(540).all()  # digits test split
    assert df["support"].groupby([df["run_id"], df["step"]]).sum().eq(540).all()


def test_run_synthetic_with_options(tmp_path):
    res = invoke(
        "run",
        *TINY,
        "--dataset",
        "synthetic:classes=4,dim=6,n_train=200,n_test=80",
        "--strategy",
        "up,rp",
        "--saliency",
        "sum",
        "--out",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    df = check_records(tmp_path, ["up", "rp"], [2.0, 4.0], 4)
    assert set(df.loc[df["strategy"] == "up", "saliency"]) == {"sum"}


def test_run_mnist_subset_from_shared_data(tmp_path, shared_data):
    res = invoke(
        "run",
        *TINY,
        "--dataset",
        "mnist:train=1000,test=300",
        "--strategy",
        "mp",
        "--data-root",
        str(shared_data),
        "--out",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    df = check_records(tmp_path, ["mp"], [2.0, 4.0], 10)
    assert df.groupby("step")["support"].sum().eq(300).all()
    assert df.loc[df["step"] == 0, "accuracy"].iloc[0] > 0.5  # it learned something


def test_run_lenet5_rewind_with_exclude(tmp_path, shared_data):
    res = invoke(
        "run",
        *TINY,
        "--dataset",
        "fashion-mnist:train=600,test=200",
        "--model",
        "lenet5",
        "--width",
        "0.5",
        "--strategy",
        "gp",
        "--retrain",
        "rewind",
        "--rewind-epoch",
        "1",
        "--exclude",
        "conv1,fc3",
        "--data-root",
        str(shared_data),
        "--out",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    run_dir = next((tmp_path / "runs").iterdir())
    state = store.load_torch(run_dir / "step-2.pt")
    assert set(state["masks"]) == {"conv2", "fc1", "fc2"}


def test_version_and_datasets(tmp_path, shared_data):
    res = invoke("--version")
    assert res.exit_code == 0 and "rdfast" in res.output
    res = invoke("datasets", "--data-root", str(shared_data))
    assert res.exit_code == 0
    lines = {
        ln.split()[0]: ln
        for ln in res.output.splitlines()
        if ln.startswith("  ") and not ln.startswith("      ")
    }
    assert "present" in lines["mnist"] and "present" in lines["fashion-mnist"]
    assert "built in" in lines["digits"]
    res = invoke("datasets", "--data-root", str(tmp_path))
    assert "missing" in res.output.split("mnist", 1)[1].splitlines()[0]


def test_help_explains_every_option():
    res = invoke("run", "--help")
    for flag in (
        "--dataset",
        "--strategy",
        "--saliency",
        "--ratios",
        "--seeds",
        "--retrain",
        "--grad-batches",
        "--up-eps",
        "--exclude",
        "--device",
        "--out",
    ):
        assert flag in res.output


BAD = [
    (["--dataset", "cifar1000"], "unknown dataset 'cifar1000'; choose from"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'; choose from"),
    (["--strategy", "mp,xx"], "unknown strategy xx; choose from mp, gp, up, rp"),
    (["--ratios", "2,1"], "must be > 1"),
    (["--ratios", "0.5,2"], "must be > 1"),
    (["--ratios", "4,2"], "strictly increasing"),
    (["--ratios", "2,2"], "strictly increasing"),
    (["--ratios", "2,abc"], "malformed --ratios"),
    (["--ratios", "2,1e9"], "leaves no weight"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--weight-decay", "-1e-4"], "--weight-decay must be >= 0"),
    (["--seeds", "0-"], "malformed --seeds"),
    (["--seeds", "a,b"], "malformed --seeds"),
    (["--seeds", "4-1"], "malformed --seeds"),
    (["--seeds", "1,1"], "distinct"),
    (["--width", "0"], "--width must be > 0"),
    (["--width", "wide"], "'wide' is not a valid float"),
    (["--exclude", "fc9"], "--exclude names no prunable layer: fc9"),
    (["--exclude", "fc1,fc2,fc3"], "leaves no layer"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--grad-batches", "0"], "--grad-batches must be >= 1"),
    (["--saliency", "cubic"], "'cubic' is not one of"),
    (["--dataset", "synthetic:colors=3"], "bad dataset option"),
    (["--dataset", "digits:train=x"], "needs a int"),
    (["--model", "lenet5"], "lenet5 needs images of at least 12x12"),
    (["--retrain", "rewind", "--rewind-epoch", "99"], "--rewind-epoch must lie in"),
    (["--no-such-flag"], "No such option"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", *args, "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in res.output
    assert not out.exists()


def test_missing_mnist_names_expected_path(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        ["run", "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(out)],
        env={"RDFAST_OFFLINE": "1"},
    )
    assert res.exit_code == 2
    assert str(tmp_path / "MNIST" / "raw") in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_nan_loss_fails_runs_with_exit_code_1(tmp_path):
    res = invoke("run", *TINY, "--lr", "1e6", "--strategy", "mp,rp", "--out", str(tmp_path))
    assert res.exit_code == 1
    for run_dir in (tmp_path / "runs").iterdir():
        manifest = store.read_json(run_dir / "manifest.json")
        assert manifest["status"] == "failed"
        assert "loss became nan" in manifest["error"]
    res = invoke("status", str(tmp_path))
    assert res.exit_code == 1
    assert res.stdout.count("failed") >= 2 and "loss became nan" in res.stdout


def test_status(tmp_path):
    res = invoke("run", *TINY, "--strategy", "mp,up", "--out", str(tmp_path))
    assert res.exit_code == 0
    res = invoke("status", str(tmp_path))
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert "status" in lines[0] and "steps" in lines[0]
    assert " mp " in lines[1] and " up " in lines[2] and "complete" in lines[1]
    assert "2/2" in lines[1] and lines[-1] == "2 complete"
    res = CliRunner().invoke(cli, ["status", str(tmp_path / "none")])
    assert res.exit_code == 2 and "is not a directory" in res.stderr


@pytest.mark.slow
def test_killed_process_resumes_to_identical_table(tmp_path):
    """SIGKILL at an arbitrary moment, then the same command again: the same records."""
    small = dict(seeds="0,1", ratios="2,4,8", epochs="4", finetune="2")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(process_args(ref, **small), check=True, capture_output=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        process_args(killed, **small), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Wait until a few steps are on disk, then kill without warning.
    deadline = time.time() + 120
    while len(list(killed.glob("runs/*/step-*.parquet"))) < 7 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "records.parquet").exists()  # it really stopped part-way
    subprocess.run(process_args(killed, **small), check=True, capture_output=True)
    a = pd.read_parquet(ref / "records.parquet").drop(columns=["seconds"])
    b = pd.read_parquet(killed / "records.parquet").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(a, b)
    assert not list(killed.rglob("*.tmp"))


def test_masked_kernels_need_cuda(tmp_path):
    res = CliRunner().invoke(
        cli,
        ["run", "--masked-kernels", "--device", "cpu", "--out", str(tmp_path / "o")],
        env={"TRITON_INTERPRET": "0"},
    )
    assert res.exit_code == 2
    assert "--masked-kernels needs a CUDA device" in res.stderr
    assert not (tmp_path / "o").exists()


def test_run_cifar100_resnet20_end_to_end(tmp_path, monkeypatch):
    from tests.official_formats import write_cifar100

    monkeypatch.setenv("RDFAST_OFFLINE", "1")
    write_cifar100(tmp_path / "data", n_train=200, n_test=200)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        [
            "run",
            "--dataset",
            "cifar100",
            "--model",
            "resnet20",
            "--width",
            "0.25",
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--ratios",
            "2,4",
            "--seeds",
            "0",
            "--grad-batches",
            "2",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "rdfast: warning: CIFAR-100 files in" in res.stderr
    df = check_records(out, ["mp", "gp", "up", "rp"], [2.0, 4.0], 100)
    assert df.groupby(["run_id", "step"])["support"].sum().eq(200).all()
    manifest = store.read_json(next((out / "runs").iterdir()) / "manifest.json")
    assert manifest["dense"]["train_images_per_second"] > 0
    assert manifest["settings"]["train"]["precision"] == "fp32"


def test_run_imagefolder_bf16_on_cpu(tmp_path):
    from tests.official_formats import write_image_tree

    tree = write_image_tree(tmp_path / "pets", per_class=8, size=10)
    res = invoke(
        "run",
        *TINY,
        "--dataset",
        f"imagefolder:{tree}",
        "--image-size",
        "12",
        "--model",
        "lenet5",
        "--strategy",
        "mp",
        "--precision",
        "bf16",
        "--data-root",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
    )
    assert res.exit_code == 0, res.output
    check_records(tmp_path / "out", ["mp"], [2.0, 4.0], 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "mnist", "--image-size", "16"], "--image-size applies to image folders"),
        (["--model", "torchvision:resnet18", "--dataset", "digits"], "takes 3-channel images"),
        (["--model", "timm:resnet18", "--width", "0.5"], "--width scales rdfast's own models"),
        (["--masked-kernels", "--compile"], "do not combine"),
    ],
)
def test_more_bad_input(tmp_path, args, message, shared_data):
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli, ["run", *args, "--data-root", str(shared_data), "--out", str(out)]
    )
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_run_with_compile(tmp_path):
    """torch.compile in the loop (about 30 s of compiling on the CPU)."""
    res = invoke(
        *run_args(tmp_path, ratios="2", epochs="2", extra=["--strategy", "mp", "--compile"])
    )
    assert res.exit_code == 0, res.output
    df = check_records(tmp_path, ["mp"], [2.0], 10)
    assert df["accuracy"].min() > 0.5
