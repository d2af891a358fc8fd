"""`spawn_ranks`: a test's ranks in spawned processes, with a deadline.

`mp.spawn` waits for its ranks without a limit, and pytest joins its child processes at exit, so one
hung rank (seen in 3 full CI runs, in `test_ffn_ddp` twice on 2026-11-27, never when run alone)
would stall CI past pytest-timeout.
Here every rank still running at the deadline is killed and the test fails, naming the ranks.
"""
import time

import pytest
import torch.multiprocessing as mp

DEADLINE_S = 240.0
"""Below pytest-timeout's 300 s per test (pyproject.toml)."""


def spawn_ranks(fn, args: tuple, world: int, deadline_s: float = DEADLINE_S) -> None:
    """`mp.spawn(fn, args, nprocs=world)`; a rank's exception is raised here; ranks still running
    after `deadline_s` are killed and the test fails."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > end:
                alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
                pytest.fail(f"ranks {alive} of {world} still running after {deadline_s:.0f} s; killed")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
