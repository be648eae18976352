"""Filling the base-spectrum cache over ``torch.distributed`` (``torchrun``), or in one process.

Under torchrun (``RANK``/``WORLD_SIZE`` in the environment) the weights are split over the
ranks by cost, not by count: a base spectrum costs about ``m * n * min(m, n)``, and the
assignment is the greedy longest-first one (each weight, most expensive first, to the rank with
the least work so far), within 4/3 of the best possible balance. Each rank computes its weights
on its own device (``cuda:LOCAL_RANK`` with NCCL when CUDA is there, else the CPU with gloo) and
writes its entries itself: the cache is content-addressed and every write is atomic, so ranks on
several nodes sharing one cache directory never clash, a rank that dies leaves no partial entry,
and a re-run computes only what is missing. Rank 0 prints the summary after a barrier.
"""

from __future__ import annotations

import heapq
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .layers import Layer


def spectrum_cost(shape) -> int:
    """What a base spectrum of an (m, n) weight costs, up to a constant."""
    m, n = shape
    return m * n * min(m, n)


def balance(costs: list[int], world: int) -> list[int]:
    """Rank of each item: longest processing time first, each to the least-loaded rank."""
    loads = [(0, r) for r in range(world)]
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owner


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class FillSummary:
    """What a fill did, over all ranks."""

    weights: int
    computed: int
    already_cached: int
    seconds: float
    ranks: int
    per_rank_seconds: list[float]


def fill_cache(layers: list[Layer], cache, device=None, progress=True,
               model: str | None = None) -> FillSummary | None:
    """Compute (or find) the base spectrum of every layer in ``cache`` (new entries labelled with
    ``model`` and the layer's name). Under torchrun each rank does its share and the summary is
    returned on rank 0 (None on the others)."""
    if not launched_by_torchrun():
        return _fill(layers, cache, device, progress, 0, 1, model)
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        owner = balance([spectrum_cost(layer.shape) for layer in layers], world)
        mine = [layer for layer, r in zip(layers, owner) if r == rank]
        summary = _fill(mine, cache, device, progress and rank == 0, rank, world, model)
        gathered = [None] * world
        dist.all_gather_object(gathered, summary)
        dist.barrier()
        if rank != 0:
            return None
        return FillSummary(
            weights=len(layers), computed=sum(s.computed for s in gathered),
            already_cached=sum(s.already_cached for s in gathered),
            seconds=max(s.seconds for s in gathered), ranks=world,
            per_rank_seconds=[s.seconds for s in gathered])
    finally:
        dist.destroy_process_group()


def _fill(layers, cache, device, progress, rank, world, model) -> FillSummary:
    t0 = time.perf_counter()
    hits = cache.stats.hits
    desc = "base spectra" if world == 1 else f"base spectra (rank {rank} of {world})"
    for layer in tqdm(layers, desc=desc, unit="module", disable=not progress):
        cache.get(layer.base_weight(device), model=model, layer=layer.name)
    seconds = time.perf_counter() - t0
    found = cache.stats.hits - hits
    return FillSummary(len(layers), len(layers) - found, found, seconds, world, [seconds])
