"""Several processes (``accelerate launch``): who is who, and the few collectives the trainers need.

One process is the default and needs none of this: every function here is the identity (or trivially
true) when ``torch.distributed`` is not running. Under ``accelerate launch --num_processes N`` each
process holds 1/N of every batch; statistics over the batch go through :func:`global_sum`, so all
processes compute the numbers one process would compute with the whole batch, and only the main
process writes files.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any

import torch

from gipo.errors import ConfigError

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""A sum over the batch's holders: :func:`local_sum` in pure math and tests, :func:`global_sum` in training."""


def local_sum(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def launched_with_several_processes() -> bool:
    """True under ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """Several processes train together. (An engine in this process, such as vLLM's, may start a process
    group of one: nothing to reduce over, and not gipo's to shut down.)"""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_with_deepspeed() -> bool:
    """True under ``accelerate launch`` with DeepSpeed (``distributed_type: DEEPSPEED`` or ``--use_deepspeed``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def make_accelerator(cpu: bool, find_unused_parameters: bool):
    """The ``Accelerator`` of a multi-process DDP run (it starts the process group from the launcher's
    environment: gloo on CPU, NCCL on GPUs)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # gipo shards with FSDP2 itself (`fsdp: true`), because generation, the frozen models and saving need it to;
    # accelerate's own FSDP mode would wrap the models differently (and on CPUs it silently becomes DDP).
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        raise ConfigError("accelerate launch with FSDP: gipo runs DDP, or shards with FSDP2 itself. Launch with "
                          "--multi_gpu (examples/accelerate/ddp.yaml or fsdp.yaml) and add --set fsdp=true to shard "
                          "(docs/distributed.md).")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
    kind = accelerator.distributed_type.value
    if kind not in ("NO", "MULTI_CPU", "MULTI_GPU"):
        raise ConfigError(f"accelerate launch with distributed_type {kind}: gipo supports MULTI_GPU (MULTI_CPU on "
                          "CPUs), with DDP or, with --set fsdp=true, its own FSDP2 sharding, and DEEPSPEED "
                          "(examples/accelerate/).")
    return accelerator


def start_deepspeed_processes(cpu: bool) -> torch.device:
    """Under a DeepSpeed launch: the process group (gloo on CPU, NCCL on GPUs) and this process's device.
    gipo builds one DeepSpeed engine per trained model itself (:func:`deepspeed_engine`), so accelerate's
    ``Accelerator``, which wraps a single model, is not used."""
    use_cuda = not cpu and torch.cuda.is_available()
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ConfigError("accelerate launch with DeepSpeed, but the deepspeed package is not installed: "
                          "pip install --no-build-isolation deepspeed==0.19.8 (docs/distributed.md).") from err
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not is_distributed():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def deepspeed_zero_settings() -> dict[str, Any]:
    """The ``zero_optimization`` section of the launch's DeepSpeed settings (accelerate's ``deepspeed_config``
    in the launch config, or the DeepSpeed JSON file it names), without accelerate's "auto" placeholders."""
    from accelerate.utils import DeepSpeedPlugin

    zero = dict(DeepSpeedPlugin().deepspeed_config.get("zero_optimization", {}))
    return {key: value for key, value in zero.items() if value != "auto"}


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int,
                     accumulation_steps: int, max_grad_norm: float | None):
    """``model`` and ``optimizer`` as a DeepSpeed engine with the launch's ZeRO settings; returns the engine and
    its (ZeRO) optimizer. The caller accumulates gradients over ``accumulation_steps`` backward calls and then
    steps once (DeepSpeed's unmanaged accumulation), as in one process; DeepSpeed clips at ``max_grad_norm``.
    Weights stay in fp32: bf16 comes from gipo's autocast, as without DeepSpeed."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": accumulation_steps,
              "managed_gradient_accumulation": False, "gradient_clipping": float(max_grad_norm or 0.0),
              "zero_optimization": deepspeed_zero_settings(), "zero_allow_untested_optimizer": True,
              "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, zero_optimizer


def checkpoint_classes() -> list[type]:
    """Classes besides tensors and plain types that a checkpoint of this launch holds: DeepSpeed's, inside its
    ZeRO optimizer states."""
    if not launched_with_deepspeed():
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def is_deepspeed_engine(model: Any) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def zero3_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters ZeRO-3 has partitioned across processes (none for other models)."""
    return [p for p in model.parameters() if hasattr(p, "ds_status")]


def _is_zero_optimizer(optimizer: Any) -> bool:
    return type(optimizer).__module__.startswith("deepspeed.")


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


def is_sharded(model: Any) -> bool:
    """Whether ``model``'s weights are split across processes (FSDP2, DeepSpeed ZeRO-3): every process must then
    run each of its forwards together."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or (isinstance(model, torch.nn.Module) and bool(zero3_parameters(model)))


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full state dict on the main process ({} elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    partitioned = zero3_parameters(model)
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if is_main_process() else {}
    else:
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
    partitioned = zero3_parameters(model)
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
            model.load_state_dict(state)
        return
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state dict; for a sharded model the full one, keyed by parameter name, on the main
    process; for DeepSpeed's ZeRO optimizer the list of every process's partition, on the main process (every
    process must call it)."""
    if _is_zero_optimizer(optimizer):
        return {"zero_partitions": gather_objects_to_main(optimizer.state_dict())}
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if _is_zero_optimizer(optimizer) or "zero_partitions" in state:
        partitions = state.get("zero_partitions")
        if partitions is None or not _is_zero_optimizer(optimizer) or len(partitions) != world_size():
            saved = "a plain optimizer state" if partitions is None else f"{len(partitions)} DeepSpeed ZeRO partitions"
            now = f"{world_size()} DeepSpeed processes" if _is_zero_optimizer(optimizer) else "no DeepSpeed"
            raise ConfigError(f"--resume: the checkpoint holds {saved}, and this launch has {now}; resume with the "
                              "launch that wrote it.")
        # ZeRO picks this process's partition from the list; its fp32 master weights come from the model's
        # weights, loaded just before.
        optimizer.load_state_dict(partitions, load_from_fp32_weights=False)
        return
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


def gather_objects_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj``, in rank order, on the main process only (None elsewhere)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main_process() else None
    torch.distributed.gather_object(obj, out, dst=0)
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
    """End the process group cleanly (every process at once), so no collective thread outlives the run. A
    finished trainer's sharded models sit in reference cycles that hold the group: collect them first, so that
    none of the group's native objects is left for interpreter exit to destroy (a rank could abort there)."""
    if is_distributed():
        gc.collect()
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
