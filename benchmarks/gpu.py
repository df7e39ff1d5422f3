"""Everything a lent GPU should measure, in one command that fits 8 minutes on an H100.

    python -m benchmarks.gpu --out DIR            # on a CUDA machine
    python -m benchmarks.gpu --out DIR --dry-run  # anywhere: CPU, interpreter, tiny sizes

1. correctness on the device: the kernel tests compiled (`TRITON_INTERPRET=0 pytest
   tests/kernels`) and the CUDA-path tests (`tests/test_cuda_path.py`: selection and
   confusion on CUDA, channels_last, equal to the CPU torch path bit for bit);
2. timings, side by side in this process (CUDA events, median of the rounds):
   saliency + exact selection over 1e9 fp32 weights and gradients in 100 tensors (all-ones
   and 90 %-pruned masks) against `torch.topk` / `torch.kthvalue` on the concatenation; the
   confusion matrix at 1e6 x 100 and 1e5 x 1000 against argmax + bincount and torchmetrics;
   `masked_linear` against `F.linear(x, w * mask)` at batch 1 to 4096; ResNet-20 training,
   a plain loop against rdfast with bf16 autocast, channels_last and torch.compile;
3. a short `rdfast run --dataset cifar100 --model resnet20` on CUDA (official-format files
   written here), its images per second and whether its records are complete;
4. every figure as a CSV row (device, commit, date) in DIR/gpu.csv, the test logs beside it.

GB/s figures count the bytes each pass must move and sit against the device's theoretical
bandwidth (memory clock x bus width), so each row says how close it is to the roofline.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """Rows of figures, each stamped with the device, the commit and the date."""

    def __init__(self, out: Path, device: str, dry: bool):
        from benchmarks.conftest import commit, device_name, peak_bandwidth_gbs

        self.path = out / "gpu.csv"
        self.stamp = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "device": device_name(),
            "dry_run": dry,
        }
        self.peak = peak_bandwidth_gbs() if device == "cuda" else None
        self.rows: list[dict] = []

    def add(self, group: str, case: str, seconds: float | None = None, bytes_moved=None, **extra):
        row = {**self.stamp, "group": group, "case": case, "median_s": seconds}
        if bytes_moved and seconds:
            gbs = bytes_moved / seconds / 1e9
            row["gb_per_s"] = round(gbs, 1)
            if self.peak:
                row["pct_of_peak"] = round(100 * gbs / self.peak, 1)
        row.update(extra)
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in self.stamp}
        print(json.dumps(shown, default=str), flush=True)
        self.write()

    def write(self):
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(self.rows)


def timed(fn, device: str, rounds: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `rounds`, after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pytest_step(rec: Recorder, name: str, args: list[str], env: dict, out: Path, limit: int):
    """Run a pytest selection in a subprocess, its log under `out`; one row with the result."""
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=limit,
        )
        log.write_text(done.stdout + done.stderr)
        summary = (done.stdout.strip().splitlines() or [""])[-1]
        rc = done.returncode
    except subprocess.TimeoutExpired as e:
        log.write_text(f"timed out after {limit} s\n{e.stdout or ''}")
        summary, rc = f"timed out after {limit} s", 124
    rec.add("correctness", name, time.perf_counter() - t0, returncode=rc, summary=summary)


# --------------------------------------------------------------------------- timings


def selection(rec: Recorder, device: str, total: int, tensors: int, rounds: int):
    import torch

    from rdfast.kernels import prune_lowest_fused, saliency

    gen = torch.Generator(device=device).manual_seed(0)
    per = total // tensors
    ws = [torch.randn(per, device=device, generator=gen) for _ in range(tensors)]
    gs = [torch.randn(per, device=device, generator=gen) * 1e-3 for _ in range(tensors)]
    n = total // 2
    group = f"select-50%-{total:.0e}-in-{tensors}"
    # Bytes: 8 per weight (w and g) + 1 (mask) per pass; 3 histogram passes, the equal-count
    # pass and the mask pass, + 1 byte written per weight.
    per_pass = total * 9
    for kept in (1.0, 0.1):
        masks = [
            torch.rand(per, device=device, generator=gen) < kept if kept < 1 else
            torch.ones(per, dtype=torch.bool, device=device)
            for _ in range(tensors)
        ]  # fmt: skip
        k = int(sum(int(m.sum()) for m in masks)) // 2
        s = timed(
            lambda m=masks, k=k: prune_lowest_fused(ws, gs, m, k, strategy="up", eps=5e-4),
            device,
            rounds,
        )
        rec.add(group, f"rdfast_fused_up_kept{int(kept * 100)}", s, per_pass * 5 + total,
                kept=kept, per_pass_s=s / 5)  # fmt: skip
        del masks

    def concat_scores():
        return torch.cat([saliency(w, g, strategy="up", eps=5e-4) for w, g in zip(ws, gs)])

    for case, fn in (
        ("torch_topk_of_saliency", lambda: torch.topk(concat_scores(), n, largest=False).values),
        ("torch_kthvalue_of_saliency", lambda: torch.kthvalue(concat_scores(), n).values),
    ):
        try:
            s = timed(fn, device, max(1, rounds // 2))
            rec.add(group, case, s, total * 12)
        except RuntimeError as e:  # out of memory, or an unsupported size
            rec.add(group, case, None, error=" ".join(str(e).split())[:160])
        if device == "cuda":
            torch.cuda.empty_cache()


def confusion(rec: Recorder, device: str, shapes, rounds: int):
    import torch

    for n, c in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, c, device=device, generator=gen)
        y = torch.randint(0, c, (n,), device=device, generator=gen)
        group = f"confusion-{n:.0e}x{c}"
        for case, fn in _confusion_cases(x, y, c).items():
            rec.add(group, case, timed(fn, device, rounds), x.numel() * 4 + y.numel() * 8)


def _confusion_cases(x, y, c) -> dict:
    import torch

    from rdfast.kernels import confusion_matrix

    cases = {
        "rdfast": lambda: confusion_matrix(x, y, c),
        "argmax_bincount": lambda: torch.bincount(y * c + x.argmax(1), minlength=c * c),
    }
    try:
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        cases["torchmetrics"] = lambda: multiclass_confusion_matrix(x, y, num_classes=c)
    except ImportError:
        pass
    return cases


def masked_linear_gemm(rec: Recorder, device: str, batches, rounds: int, features: int):
    import torch
    from torch.nn import functional as F

    from rdfast.kernels import masked_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(features, features, device=device, generator=gen).to(dtype)
    mask = torch.rand(features, features, device=device, generator=gen) < 0.1
    backend = "auto" if device == "cuda" else "triton"
    for b in batches:
        x = torch.randn(b, features, device=device, generator=gen).to(dtype)
        group = f"masked-linear-{features}x{features}-{str(dtype)[6:]}-batch{b}"
        rec.add(
            group,
            "rdfast",
            timed(lambda x=x: masked_linear(x, w, mask, backend=backend), device, rounds),
        )
        rec.add(
            group, "F.linear(x, w*mask)", timed(lambda x=x: F.linear(x, w * mask), device, rounds)
        )


def resnet_throughput(rec: Recorder, device: str, n: int):
    import torch
    from torch.nn import functional as F

    from rdfast.config import train_settings
    from rdfast.data import TensorData, channel_stats
    from rdfast.models import build_model
    from rdfast.training import train

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    mean, std = channel_stats(x.cpu())

    def model(cl):
        torch.manual_seed(0)
        m = build_model("resnet20", (3, 32, 32), 10, 1.0).to(device)
        return m.to(memory_format=torch.channels_last) if cl else m

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def data(augment, cl):
        return TensorData("cifar-shaped", x, y, x[:256], y[:256], [str(i) for i in range(10)],
                          mean.to(device), std.to(device), augment, cl)  # fmt: skip

    m = model(False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    xf = data("none", False).prepare(x)  # pre-normalized floats: the plain loop's best case

    def plain_epoch():
        for i in range(0, n, 128):
            loss = F.cross_entropy(m(xf[i : i + 128]), y[i : i + 128])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()

    plain_epoch()
    t0 = time.perf_counter()
    plain_epoch()
    plain = n / (time.perf_counter() - t0)
    rec.add("resnet20-train", "plain_loop", n / plain, images_per_second=round(plain))
    fast = device == "cuda"
    d = data("crop-flip", fast)
    precision = "bf16" if fast else "fp32"
    settings = train_settings("cifar10", "resnet20", epochs=1, batch_size=128, precision=precision)
    m2 = model(fast)
    forward = torch.compile(m2) if fast else m2
    train(m2, d, settings, forward=forward)  # compile and warm up
    sync()
    stats = train(m2, d, settings, forward=forward)
    rec.add("resnet20-train", "rdfast_bf16_channels_last_compile" if fast else "rdfast_fp32",
            n / stats["images_per_second"], images_per_second=round(stats["images_per_second"]),
            speedup_vs_plain=round(stats["images_per_second"] / plain, 2))  # fmt: skip


def short_run(rec: Recorder, device: str, out: Path, dry: bool):
    """`rdfast run --dataset cifar100 --model resnet20` on official-format files."""
    from tests.official_formats import write_cifar100

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_train = 600 if dry else 10000
        write_cifar100(root / "data", n_train=n_train, n_test=200 if dry else 2000)
        runs = root / "runs"
        cmd = [sys.executable, "-m", "rdfast.cli.main", "run", "--dataset", "cifar100",
               "--model", "resnet20", "--width", "0.25" if dry else "1", "--epochs", "1",
               "--finetune-epochs", "1", "--ratios", "2,4", "--seeds", "0", "--strategy",
               "mp,up", "--grad-batches", "2", "--device", device, "--no-progress",
               "--data-root", str(root / "data"), "--out", str(runs)]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "RDFAST_OFFLINE": "1"})  # fmt: skip
        (out / "rdfast_run.log").write_text(done.stdout + done.stderr)
        manifests = [json.loads(p.read_text()) for p in runs.glob("runs/*/manifest.json")]
        complete = sum(m.get("status") == "complete" for m in manifests)
        dense = manifests[0].get("dense", {}) if manifests else {}
        rec.add("rdfast-run-cifar100-resnet20", "cli", time.perf_counter() - t0,
                returncode=done.returncode, runs_complete=f"{complete}/2",
                train_images_per_second=dense.get("train_images_per_second"),
                eval_images_per_second=dense.get("eval_images_per_second"))  # fmt: skip


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.csv and logs")
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes")
    parser.add_argument("--skip", default="", help="comma list of parts to leave out: "
                        "tests,selection,confusion,masked_linear,resnet,run")  # fmt: skip
    ns = parser.parse_args(argv)
    dry, skip = ns.dry_run, set(filter(None, ns.skip.split(",")))
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before rdfast.kernels is imported
    import torch

    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    if device == "cpu" and not dry:
        print("no CUDA device: use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    ns.out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(ns.out, device, dry)
    t_start = time.perf_counter()
    if "tests" not in skip:
        interp = {"TRITON_INTERPRET": "1" if dry else "0"}
        kernels = ["tests/kernels", "-x"] + (["-k", "kth_smallest_with_and_without"] if dry else [])
        pytest_step(rec, "kernel_tests", kernels, interp, ns.out, 240)
        path = ["tests/test_cuda_path.py"] + (["-k", "lenet5"] if dry else [])
        pytest_step(rec, "cuda_path_tests", path, interp, ns.out, 180)
    parts = [
        ("selection", lambda: selection(rec, device, 10**4 if dry else 10**9, 10 if dry else 100,
                                        1 if dry else 5)),
        ("confusion", lambda: confusion(rec, device, [(500, 10)] if dry else
                                        [(10**6, 100), (10**5, 1000)], 1 if dry else 10)),
        ("masked_linear", lambda: masked_linear_gemm(rec, device, [1, 8] if dry else
                                                     [1, 16, 128, 1024, 4096], 1 if dry else 10,
                                                     64 if dry else 4096)),
        ("resnet", lambda: resnet_throughput(rec, device, 256 if dry else 25600)),
        ("run", lambda: short_run(rec, device, ns.out, dry)),
    ]  # fmt: skip
    for name, fn in parts:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one failing part must not cost the others their figures
            rec.add(name, "error", time.perf_counter() - t0, error=" ".join(str(e).split())[:200])
        if device == "cuda":
            torch.cuda.empty_cache()
    rec.add("total", "wall", time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
