"""Several processes (``accelerate launch``): who is who, and the few collectives the trainers need.

One process is the default and needs none of this: every function here is the identity (or trivially
true) when ``torch.distributed`` is not running. Under ``accelerate launch --num_processes N`` each
process holds 1/N of every batch; statistics over the batch go through :func:`global_sum`, so all
processes compute the numbers one process would compute with the whole batch, and only the main
process writes files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from gipo.config import ConfigError

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""A sum over the batch's holders: :func:`local_sum` in pure math and tests, :func:`global_sum` in training."""


def local_sum(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def launched_with_several_processes() -> bool:
    """True under ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def make_accelerator(cpu: bool, find_unused_parameters: bool):
    """The ``Accelerator`` of a multi-process run (it starts the process group from the launcher's
    environment: gloo on CPU, NCCL on GPUs; DDP, FSDP or DeepSpeed as the launch config says)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # gipo shards with FSDP2 itself (`fsdp: true`), because generation, the frozen models and saving need it to;
    # accelerate's own FSDP mode would wrap the models differently (and on CPUs it silently becomes DDP).
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"accelerate launch with {name}: gipo runs DDP, or shards with FSDP2 itself. Launch "
                              "with --multi_gpu (examples/accelerate/ddp.yaml or fsdp.yaml) and add --set fsdp=true "
                              "to shard; DeepSpeed is not supported (docs/distributed.md).")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
    kind = accelerator.distributed_type.value
    if kind not in ("NO", "MULTI_CPU", "MULTI_GPU"):
        raise ConfigError(f"accelerate launch with distributed_type {kind}: gipo supports MULTI_GPU (MULTI_CPU on "
                          "CPUs), with DDP or, with --set fsdp=true, its own FSDP2 sharding (examples/accelerate/).")
    return accelerator


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 (``fully_shard``): each transformer block (a class in a model's ``_no_split_modules``) one unit,
    then the whole model, so that only one block's full weights are gathered at a time. In place: the model's
    parameters become shards (DTensors); build its optimizer after this."""
    from torch.distributed.fsdp import fully_shard

    blocks = set()
    for module in model.modules():
        blocks.update(getattr(module, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2: every process must then run each of its forwards together."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full state dict on the main process ({} elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    # Tied weights (an LM head sharing the embedding) come back as copies: make them one tensor again, so that
    # save_pretrained writes them once, as it does for the unsharded model.
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(param), name)
        if first != name and first in state and name in state:
            state[name] = state[first]
    return state


def load_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (the same on every process); a sharded model keeps its shards of it."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state dict; for a sharded model the full one, keyed by parameter name, on the main
    process (every process must call it)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes, differentiable (its backward sums the gradients back); the identity in
    one process."""
    if is_distributed():
        import torch.distributed.nn.functional as dist_fn

        return dist_fn.all_reduce(tensor)
    return tensor


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the samples of all processes (processes may hold different counts)."""
    total = global_sum(values.detach().float().sum())
    count = global_sum(values.new_tensor(float(values.numel()), dtype=torch.float))
    return total / count.clamp(min=1)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all processes along dim 0 (rank order)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise: true where any process has a true flag (so all processes take the same branch)."""
    if not is_distributed():
        return flags
    total = flags.to(torch.float)
    torch.distributed.all_reduce(total)
    return total > 0


def shutdown() -> None:
    """End the process group cleanly (every process at once), so no collective thread outlives the run."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def shard(items: list[Any]) -> list[Any]:
    """This process's contiguous share of a global batch (its size a multiple of the process count)."""
    n = world_size()
    if n == 1:
        return items
    size = len(items) // n
    return items[rank() * size:(rank() + 1) * size]
