"""Process groups and the rank layout.

Global rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank (Megatron's default): TP varies
fastest so a tensor-parallel group stays inside a node (NVLink), PP slowest so only activations
cross nodes. All state lives in one `ParallelState` object held by the registry below, fixed once
`initialize` returns: which model chunk is running is the caller's to pass (`virtual_rank=`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from megaglot.config import ConfigError, check_world_size


@dataclass
class ParallelState:
    """This rank's coordinates and the groups it belongs to."""

    tp_size: int
    """Tensor-parallel world size."""
    pp_size: int
    """Pipeline-parallel world size."""
    dp_size: int
    """Data-parallel world size (derived)."""
    vp_size: Optional[int]
    """Virtual pipeline chunks per stage (None = not interleaved)."""
    tp_rank: int
    """Rank inside the tensor-parallel group."""
    pp_rank: int
    """Pipeline stage of this rank."""
    dp_rank: int
    """Rank inside the data-parallel group."""
    tp_group: object
    """Ranks that split each layer."""
    pp_group: object
    """Ranks that hold successive stages of the same model replica."""
    dp_group: object
    """Ranks holding the same shard of the model."""
    mp_group: object
    """TP x PP ranks of one model replica (for norms and loss scaling)."""
    pp_ranks: list = field(default_factory=list)
    """Global ranks of this rank's pipeline group, by stage."""
    tp_ranks: list = field(default_factory=list)
    """Global ranks of this rank's tensor group."""
    dp_ranks: list = field(default_factory=list)
    """Global ranks of this rank's data-parallel group."""


class _Registry:
    """The process-group registry: the single piece of global state megaglot keeps."""

    state: Optional[ParallelState] = None


_REGISTRY = _Registry()


def global_rank(pp_rank: int, dp_rank: int, tp_rank: int, tp: int, dp: int) -> int:
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def check_layout(world_size: int, tensor_parallel: int, pipeline_parallel: int) -> int:
    """Data-parallel size for the layout; a ValueError that names the numbers otherwise."""
    for flag, size in (("tensor_parallel", tensor_parallel), ("pipeline_parallel", pipeline_parallel)):
        if not isinstance(size, int) or size <= 0:
            raise ConfigError(f"{flag} size must be a positive integer, got {size!r}")
    return check_world_size(world_size, tensor_parallel, pipeline_parallel)


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1,
               virtual_pipeline: Optional[int] = None) -> ParallelState:
    """Create every group over the already initialized default process group.

    Every rank must call this with the same arguments: `new_group` is collective and groups
    are created in the same order everywhere.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group "
                           "(torchrun sets the environment) before megaglot.parallel.initialize")
    if _REGISTRY.state is not None:
        raise RuntimeError("megaglot.parallel is already initialized; call destroy() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, pp = tensor_parallel, pipeline_parallel
    dp = check_layout(world, tp, pp)
    if virtual_pipeline is not None:
        if virtual_pipeline <= 0:
            raise ConfigError(f"virtual_pipeline must be positive, got {virtual_pipeline}")
        if virtual_pipeline > 1 and pp == 1:
            raise ConfigError("virtual pipeline stages need pipeline_parallel > 1")

    def rank_of(p, d, t):
        return global_rank(p, d, t, tp, dp)

    mine = {}
    # Tensor groups: fixed (pp, dp), varying tp.
    for p in range(pp):
        for d in range(dp):
            ranks = [rank_of(p, d, t) for t in range(tp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine["tp"] = (group, ranks)
    # Data groups: fixed (pp, tp), varying dp.
    for p in range(pp):
        for t in range(tp):
            ranks = [rank_of(p, d, t) for d in range(dp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine["dp"] = (group, ranks)
    # Pipeline groups: fixed (dp, tp), varying pp.
    for d in range(dp):
        for t in range(tp):
            ranks = [rank_of(p, d, t) for p in range(pp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine["pp"] = (group, ranks)
    # Model groups: fixed dp, all tp x pp.
    for d in range(dp):
        ranks = sorted(rank_of(p, d, t) for p in range(pp) for t in range(tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["mp"] = (group, ranks)

    pp_rank = rank // (dp * tp)
    dp_rank = (rank // tp) % dp
    tp_rank = rank % tp
    _REGISTRY.state = ParallelState(
        tp_size=tp, pp_size=pp, dp_size=dp, vp_size=virtual_pipeline,
        tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        tp_group=mine["tp"][0], pp_group=mine["pp"][0], dp_group=mine["dp"][0],
        mp_group=mine["mp"][0],
        pp_ranks=mine["pp"][1], tp_ranks=mine["tp"][1], dp_ranks=mine["dp"][1])
    return _REGISTRY.state


def is_initialized() -> bool:
    return _REGISTRY.state is not None


def get_state() -> ParallelState:
    if _REGISTRY.state is None:
        raise RuntimeError("megaglot.parallel is not initialized: call megaglot.parallel.state.initialize()")
    return _REGISTRY.state


def destroy() -> None:
    """Forget the groups (the default process group is left to its owner)."""
    state = _REGISTRY.state
    _REGISTRY.state = None
    if state is None:
        return
    seen = set()
    for group in (state.tp_group, state.pp_group, state.dp_group, state.mp_group):
        if group is not None and id(group) not in seen:
            seen.add(id(group))
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):
                pass  # already gone with the default group


# ---- getters --------------------------------------------------------------------------------
def get_tensor_parallel_group():
    return get_state().tp_group


def get_tensor_parallel_rank() -> int:
    return get_state().tp_rank if is_initialized() else 0


def get_tensor_parallel_world_size() -> int:
    return get_state().tp_size if is_initialized() else 1


def get_pipeline_parallel_group():
    return get_state().pp_group


def get_pipeline_parallel_rank() -> int:
    return get_state().pp_rank if is_initialized() else 0


def get_pipeline_parallel_world_size() -> int:
    return get_state().pp_size if is_initialized() else 1


def get_data_parallel_group():
    return get_state().dp_group


def get_data_parallel_rank() -> int:
    return get_state().dp_rank if is_initialized() else 0


def get_data_parallel_world_size() -> int:
    return get_state().dp_size if is_initialized() else 1


def get_model_parallel_group():
    return get_state().mp_group


def get_virtual_pipeline_world_size() -> Optional[int]:
    return get_state().vp_size


def is_pipeline_first_stage(virtual_rank: Optional[int] = None) -> bool:
    """This rank is the first pipeline stage; given the virtual rank of one of its model chunks
    (interleaved schedule), whether that chunk is the model's first (it embeds)."""
    state = get_state()
    if virtual_rank is not None and state.vp_size is not None and virtual_rank != 0:
        return False
    return state.pp_rank == 0


def is_pipeline_last_stage(virtual_rank: Optional[int] = None) -> bool:
    """This rank is the last pipeline stage; given the virtual rank of one of its model chunks,
    whether that chunk is the model's last (it computes the loss)."""
    state = get_state()
    if virtual_rank is not None and state.vp_size is not None and virtual_rank != state.vp_size - 1:
        return False
    return state.pp_rank == state.pp_size - 1


def get_pipeline_next_rank() -> int:
    state = get_state()
    return state.pp_ranks[(state.pp_rank + 1) % state.pp_size]


def get_pipeline_prev_rank() -> int:
    state = get_state()
    return state.pp_ranks[(state.pp_rank - 1) % state.pp_size]


def get_data_parallel_src_rank() -> int:
    """Global rank of data-parallel rank 0 in this rank's data group (for broadcasts)."""
    return get_state().dp_ranks[0]


def get_tensor_parallel_src_rank() -> int:
    return get_state().tp_ranks[0]
