"""`spawn_ranks`: a test's ranks in spawned processes, with a deadline and the stacks of hung ranks.

`mp.spawn` waits for its ranks without a limit, and pytest joins its child processes at exit, so one
hung rank would stall CI past pytest-timeout, whose stack dump shows only the parent. (Seen in 3
full CI runs: `test_ffn_ddp`'s DDP teardown deadlock, explained there.)
Here every rank still running at the deadline dumps its threads' Python stacks (faulthandler, on
SIGUSR1) into the failure message, then is killed. A hang inside C++ shows there only as the Python
line that called it; its native frames need `py-spy dump --native --pid PID` while the rank hangs
(how the DDP deadlock was found: under CPU load it hung within a few runs of the test alone).
"""
import contextlib
import faulthandler
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

DEADLINE_S = 240.0
"""Below pytest-timeout's 300 s per test (pyproject.toml)."""


def _rank_main(rank: int, fn, args: tuple, stack_dir: str) -> None:
    """A rank's entry point: `fn(rank, *args)`, dumping its stacks to `stack_dir/rank{rank}` on SIGUSR1."""
    with Path(stack_dir, f"rank{rank}").open("w") as stacks:
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
        fn(rank, *args)


def _stacks_of(ranks: list[int], processes, stack_dir: str) -> str:
    """Signal each of `ranks` to dump its stacks; their text, one block per rank."""
    for rank in ranks:
        with contextlib.suppress(ProcessLookupError):  # it may have ended since
            os.kill(processes[rank].pid, signal.SIGUSR1)
    time.sleep(2.0)
    blocks = []
    for rank in ranks:
        path = Path(stack_dir, f"rank{rank}")
        text = path.read_text().strip() if path.exists() else "(not started: still importing)"
        blocks.append(f"--- rank {rank} ---\n{text or '(no stack dumped)'}")
    return "\n".join(blocks)


def spawn_ranks(fn, args: tuple, world: int, deadline_s: float = DEADLINE_S) -> None:
    """`mp.spawn(fn, args, nprocs=world)`; a rank's exception is raised here; ranks still running
    after `deadline_s` dump their stacks into the failure and are killed."""
    with tempfile.TemporaryDirectory(prefix="rank-stacks-") as stack_dir:
        ctx = mp.start_processes(_rank_main, args=(fn, args, stack_dir), nprocs=world, join=False,
                                 start_method="spawn")
        end = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > end:
                    alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
                    pytest.fail(f"ranks {alive} of {world} still running after {deadline_s:.0f} s; killed.\n"
                                f"{_stacks_of(alive, ctx.processes, stack_dir)}")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
