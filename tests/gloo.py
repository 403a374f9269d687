"""Two-process torch.distributed (gloo) runs for tests: spawned, bounded in time."""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, target, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
        dist.barrier()  # no rank closes its connections while a peer still uses them
    finally:
        dist.destroy_process_group()


def run_ranks(target, *args, world: int = 2, timeout: float = 180.0) -> None:
    """Run ``target(rank, world, *args)`` in ``world`` spawned processes inside one gloo group.

    ``target`` must be a module-level function (spawn pickles it by name). Raises AssertionError
    when a process hangs past ``timeout`` seconds or exits non-zero.
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, target, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            raise AssertionError("a gloo worker hung")
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"gloo workers exited with {codes}"
