"""The one test for "is this a multi-process run" used across the package."""
from __future__ import annotations

import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when a torch.distributed process group is up with more than one rank in `group`."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
