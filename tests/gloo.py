"""Process groups of a test: spawn `world` processes joined by gloo over TCP on this machine,
and leave them without a teardown that can abort.

A gloo process that ends normally is sometimes aborted after its work is done ("terminate
called without an active exception": a C++ thread of the group destroyed while still running,
in `destroy_process_group` or as Python finalizes); whole-suite runs here saw it even with a
barrier before the teardown. So the result a worker returns is written first, every process
then waits for the others and leaves by `os._exit`, which runs no destructor: the operating
system closes the sockets. A teardown abort can no longer fail a correct result, and a wrong
result still fails the test.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(worker, world: int, out_dir, *args) -> list:
    """Call `worker(rank, world, *args)` in `world` processes, each in a gloo group of all of
    them; return their results in rank order."""
    out_dir = Path(out_dir)
    mp.spawn(_main, args=(world, free_port(), str(out_dir), worker, args), nprocs=world)
    return [pickle.loads((out_dir / f"{r}.pkl").read_bytes()) for r in range(world)]


def _main(rank, world, port, out_dir, worker, args):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    result = worker(rank, world, *args)
    path = os.path.join(out_dir, f"{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)
    dist.barrier()  # no process leaves while another still waits in a collective
    os._exit(0)
