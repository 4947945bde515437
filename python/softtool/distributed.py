"""Running `softtool train` / `softtool eval` on several processes (torchrun, accelerate launch) or GPUs.

A DistributedContext is read from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). Without a launcher it is the single-process context: nothing is initialised and
every helper returns its input, so the one-process path costs nothing.

Training semantics under K ranks: the global batch of B examples is split into K contiguous shards,
each rank's summed loss is divided by the GLOBAL number of target tokens, and the prompt gradients
are SUMMED across ranks (not averaged as DDP does by default). The result is the gradient one
process computes for the whole batch, so a run gives the same loss curve and prompt on 1 or K ranks.

The frozen base model needs no gradient sync: only the prompt module is wrapped in DDP. For a base
model larger than one GPU, see `shard_base_fsdp` and docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from softtool.errors import SofttoolError

T = TypeVar("T")

BACKENDS = ("auto", "nccl", "gloo")
# Launchers (torchrun, accelerate launch, SLURM wrappers around them) export these for every worker.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE")


@dataclass
class DistributedOptions:
    """How processes talk to each other and where the frozen base model lives."""

    backend: str = field(
        default="auto",
        metadata={
            "help": "process-group backend: auto (nccl on CUDA, else gloo), nccl or gloo",
            "flag": "--dist-backend",
            "choices": BACKENDS,
        },
    )
    timeout_s: int = field(
        default=1800,
        metadata={
            "help": "seconds a rank waits for the others in a collective before failing",
            "flag": "--dist-timeout",
            "min": 1,
        },
    )
    device_map: str | None = field(
        default=None,
        metadata={"help": "spread the frozen base over this process's GPUs (accelerate), e.g. auto; one process only"},
    )
    fsdp: bool = field(
        default=False,
        metadata={"help": "shard the frozen base's transformer blocks over the ranks (FSDP); the prompt is replicated"},
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.device_map is not None and self.fsdp:
            raise ValueError(
                "device_map (one process over several GPUs) and fsdp (one GPU per process) exclude each other"
            )


def resolve_device(device: str, local_rank: int = 0, world_size: int = 1, launched: bool = False) -> torch.device:
    """The device of this rank: `auto`/`cuda` become cuda:LOCAL_RANK under a launcher."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SofttoolError(f"--device {device}: CUDA is not available here; use --device cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise SofttoolError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from exc
    if resolved.type == "cuda" and launched:
        if resolved.index is not None and world_size > 1:
            raise SofttoolError(
                f"--device {device}: under a launcher each rank uses cuda:LOCAL_RANK; pass --device cuda or auto"
            )
        resolved = torch.device("cuda", local_rank if resolved.index is None else resolved.index)
    return resolved


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise SofttoolError(f"${name} is not set; launch with torchrun or accelerate launch, which set it")
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise SofttoolError(f"${name}={value!r} is not an integer; check the launcher's environment") from exc


def _sum_allreduce_hook(process_group, bucket):
    # DDP's default hook averages; each rank's loss is already divided by the global token count,
    # so the single-process gradient is the plain sum over ranks.
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    work = torch.distributed.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@dataclass
class DistributedContext:
    """This process's place in the run: rank, world size, device, and the collectives the loop needs.

    Build it with `from_env()`; use it as a context manager (or call `close()`) so the process group
    is destroyed even when training fails.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (single process)
    _owns_group: bool = False

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "auto", options: DistributedOptions | None = None) -> DistributedContext:
        """Join the launcher's process group, or return the single-process context when not launched."""
        options = options or DistributedOptions()
        launched = all(name in os.environ for name in _LAUNCH_VARS)
        if not launched:
            return cls(device=resolve_device(device))
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local_rank = _env_int("LOCAL_RANK", 0)
        if not 0 <= rank < world:
            raise SofttoolError(f"$RANK={rank} is outside 0..$WORLD_SIZE-1 ({world - 1}); check the launcher")
        if options.device_map is not None and world > 1:
            raise SofttoolError(
                f"--device-map {options.device_map} spreads one process over several GPUs; run it without "
                f"torchrun (world size is {world}), or use --fsdp to shard the base over ranks"
            )
        dev = resolve_device(device, local_rank, world, launched=True)
        backend = options.backend if options.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        if backend == "nccl" and dev.type != "cuda":
            raise SofttoolError("--dist-backend nccl needs CUDA devices; use gloo on CPU")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise SofttoolError(f"${name} is not set; launch with torchrun or accelerate launch, which set it")
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            kwargs: dict[str, Any] = {}
            if backend == "nccl":
                kwargs["device_id"] = dev  # eager NCCL init: a bad GPU setup fails here, not mid-step
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=options.timeout_s),
                **kwargs,
            )
            owns = True
        return cls(rank, world, local_rank, dev, backend, owns)

    @property
    def is_distributed(self) -> bool:
        """True when a process group is active (even of size 1 under torchrun --nproc_per_node 1)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group this context created (idempotent)."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- collectives ----------------------------------------------------------------------------------
    def _tensor_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if not self.is_distributed:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def all_reduce_sum(self, value: float) -> float:
        """The sum of `value` over ranks (float64, so token counts stay exact)."""
        if not self.is_distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._tensor_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (a stop request, a failure)."""
        if not self.is_distributed:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._tensor_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run `fn` on rank 0 only and return its result on every rank; a SofttoolError it raises is
        raised on every rank, so no rank is left waiting in a collective for one that gave up."""
        if not self.is_distributed:
            return fn(*args, **kwargs)
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except SofttoolError as exc:
                error = str(exc)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise SofttoolError(error)
        return result

    # -- sharding -----------------------------------------------------------------------------------
    def shard_bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of n items; the first n % K ranks get one more."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard_indices(self, global_batch: Sequence[T]) -> list[T]:
        """This rank's part of a global batch (the K parts, in rank order, concatenate to the batch)."""
        start, stop = self.shard_bounds(len(global_batch))
        return list(global_batch[start:stop])

    def strided(self, n: int) -> range:
        """Indices rank, rank+K, ... of n work units (whole batches), for jobs where rank order does not matter."""
        return range(self.rank, n, self.world_size)

    def gather_in_order(self, pairs: Sequence[tuple[int, T]], n: int) -> list[T]:
        """Un-shard: every rank passes (original index, value) pairs for the items it did; every rank
        gets the n values in the original order. Raises if an index is missing or done twice."""
        gathered = self.gather_objects(list(pairs))
        out: list[Any] = [None] * n
        seen = [False] * n
        for part in gathered:
            for index, value in part:
                if seen[index]:
                    raise RuntimeError(f"item {index} was computed on two ranks")
                seen[index], out[index] = True, value
        if not all(seen):
            raise RuntimeError(f"items {[i for i, s in enumerate(seen) if not s][:10]} were computed on no rank")
        return out

    # -- the prompt module --------------------------------------------------------------------------
    def wrap_prompt(self, module: nn.Module) -> nn.Module:
        """DDP over the prompt parameters with SUM reduction (the module itself on a single process).

        DDP broadcasts rank 0's parameters at construction, so every rank starts from the same prompt.
        """
        if not self.is_distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        # No device_ids, also on CUDA: with them DDP moves the forward's inputs to the device and takes the
        # first of them, and the prompt module's forward has none (IndexError, seen with NCCL on an H200).
        # The module already sits on this rank's device, which is all DDP needs then.
        ddp = DistributedDataParallel(module, device_ids=None)
        ddp.register_comm_hook(None, _sum_allreduce_hook)
        return ddp

    @staticmethod
    def no_sync(wrapped: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce for this backward (all micro-batches but the last one)."""
        if skip and hasattr(wrapped, "no_sync"):
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def describe(self) -> str:
        if not self.is_distributed:
            return f"1 process on {self.device}"
        return f"rank {self.rank} of {self.world_size} ({self.backend}) on {self.device}"


def shard_base_fsdp(model, ctx: DistributedContext) -> nn.Module:
    """Shard the frozen base's transformer blocks over the ranks with FSDP2 (`fully_shard`).

    Each block's weights are gathered just before it runs and freed after, forward and backward, so a
    rank holds 1/K of the block weights plus one block at a time. The input embedding, final norm and
    LM head stay whole on every rank (a few percent of a 7B model) because the soft-prompt forward calls
    them directly, outside the model's own forward.
    """
    if not ctx.is_distributed:
        return model
    from torch.distributed.fsdp import fully_shard

    blocks = _transformer_blocks(model)
    mesh = torch.distributed.device_mesh.init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in blocks:
        # fully_shard also moves the block's shard to the mesh device (the model was loaded on the host).
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    inside = {id(m) for block in blocks for m in block.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module._parameters.values():
            if param is not None and param.device != ctx.device:
                param.data = param.data.to(ctx.device)  # in place, so tied weights stay one tensor
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != ctx.device:
                module._buffers[name] = buf.to(ctx.device)
    return model


def _transformer_blocks(model) -> list[nn.Module]:
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    for holder in (body, model):
        for name in ("layers", "h", "blocks"):
            blocks = getattr(holder, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return list(blocks)
    raise SofttoolError(
        f"--fsdp: cannot find the transformer blocks of {type(model).__name__} (looked for .layers, .h, .blocks)"
    )


@contextlib.contextmanager
def distributed_context(
    device: str = "auto", options: DistributedOptions | None = None
) -> Iterator[DistributedContext]:
    """`with distributed_context(...) as ctx:` joins (or skips) the process group and always leaves it."""
    ctx = DistributedContext.from_env(device, options)
    try:
        yield ctx
    finally:
        ctx.close()
