"""The deadline of `ranks.spawn_ranks`: a hung rank fails the test, with its stack, instead of stalling the run."""
import time

import pytest

from ranks import spawn_ranks


def _hang_on_rank_1(rank):
    if rank == 1:
        time.sleep(600)


def _fail_on_rank_0(rank):
    if rank == 0:
        raise ValueError("rank 0 failed")


def test_a_hung_rank_is_killed_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"ranks \[1\] of 2 still running") as failure:
        spawn_ranks(_hang_on_rank_1, (), 2, deadline_s=20.0)  # time for both to start on a loaded machine
    assert "--- rank 1 ---" in str(failure.value) and "_hang_on_rank_1" in str(failure.value)
    assert time.monotonic() - start < 90


def test_a_rank_error_is_raised():
    with pytest.raises(Exception, match="rank 0 failed"):
        spawn_ranks(_fail_on_rank_0, (), 2)
