"""The few collectives the learners need besides DistributedDataParallel's gradient all-reduce.

All are no-ops (or trivial) with one learner, so the single-learner path never touches
``torch.distributed``. Tensors travel on the learners' device (gloo on CPU, NCCL on GPU); nothing
is pickled.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mtkd.checkpoint import state_dict_digest


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this learner (``(0, 1)`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every learner's ``tensor`` (same shape and dtype on all), in rank order."""
    rank, size = world()
    if size == 1:
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every learner (one all-reduce of one element)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_parameters(module: nn.Module, version: int, src: int = 0) -> int:
    """Copy ``module``'s parameters and an integer ``version`` from rank ``src`` to every learner;
    returns the version."""
    if world()[1] == 1:
        return version
    params = list(module.state_dict().values())
    flat = torch.cat([p.detach().reshape(-1).float() for p in params] +
                     [torch.tensor([float(version)], device=params[0].device)])
    dist.broadcast(flat, src=src)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return int(flat[-1].item())


def parameter_digests(module: nn.Module) -> list[str]:
    """Every learner's digest of ``module``'s parameters (16 hex digits each), in rank order."""
    mine = state_dict_digest(dict(module.named_parameters()))[:15]
    device = next(module.parameters()).device
    gathered = all_gather(torch.tensor([int(mine, 16)], dtype=torch.int64, device=device))
    return [f"{int(t.item()):015x}" for t in gathered]
