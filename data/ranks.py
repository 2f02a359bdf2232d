"""The ranks of a distributed run, as the data pipeline sees them: which one this is, and what all hold.

Over a CPU (gloo) group made for the call: the data is read before the device is set up, and a
collective over NCCL would need it. Without a process group there is one rank.
"""

import torch.distributed as dist


def world():
    """``(rank, world_size)`` of this process ((0, 1) without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(mine, timeout):
    """Every rank's ``mine``, in rank order, on every rank (``[mine]`` without a process group).
    ``timeout``: how long a rank may wait for the slowest one."""
    _, world_size = world()
    if world_size == 1:
        return [mine]
    group = dist.new_group(backend="gloo", timeout=timeout)
    shares = [None] * world_size
    dist.all_gather_object(shares, mine, group=group)
    dist.destroy_process_group(group)
    return shares
