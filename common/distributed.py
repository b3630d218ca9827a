"""Running under `torchrun` (DistributedDataParallel): the process group, this process's rank, and collectives.

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR/PORT) in each.
`setup(device)` joins the processes into one group when WORLD_SIZE > 1: backend nccl when the resolved device is
CUDA (each process then uses cuda:LOCAL_RANK; more processes than GPUs are refused, or share them over gloo with
PATCHSCOPE_SHARE_GPUS=1), gloo otherwise. Without those variables (a plain `patchscope ...` or
a library call) every helper here is a no-op: rank 0 of 1, nothing of torch.distributed is initialised.

Rank 0 alone writes: `run_on_main` runs a step there (claiming a run folder, writing a manifest) and hands every
rank its result or its error, so a refusal seen by rank 0 stops all ranks instead of leaving them waiting in a
collective. `alone()` makes a command that is not sharded run on rank 0 as if it were the only process.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from patchscope.common.errors import InputError

log = logging.getLogger("patchscope.distributed")

T = TypeVar("T")
_state: dict[str, Any] = {"alone": False, "owned": False, "cuda": None}  # cuda: the device setup resolved


class FollowedError(InputError):
    """The error rank 0 reported (and printed); the other ranks raise it to exit 2 without printing it again."""

    quiet = True


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise InputError(f"environment variable {name}={os.environ.get(name)!r}: expected an integer "
                         f"(set by torchrun)") from None


def launched() -> bool:
    """Whether torchrun (or another launcher setting RANK and WORLD_SIZE) started more than one process."""
    return "RANK" in os.environ and _env_int("WORLD_SIZE", 1) > 1


def world_size() -> int:
    """Processes working together on this command: WORLD_SIZE under torchrun, else 1 (also under `alone`)."""
    if _state["alone"] or not launched():
        return 1
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's place among them, 0 to world_size() - 1."""
    return 0 if world_size() == 1 else _env_int("RANK", 0)


def local_rank() -> int:
    """This process's place on its machine: the CUDA device it uses."""
    return 0 if world_size() == 1 else _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


WAIT_FOR_RANK_0 = datetime.timedelta(hours=6)


def active() -> bool:
    """Whether collectives run: more than one process, joined into a group."""
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def local_world_size() -> int:
    """Processes of this command on this machine (LOCAL_WORLD_SIZE under torchrun), 1 otherwise."""
    return 1 if world_size() == 1 else _env_int("LOCAL_WORLD_SIZE", 1)


SHARE_GPUS = "PATCHSCOPE_SHARE_GPUS"  # =1: more processes than GPUs on a machine share them, over gloo


def cuda_placement(local_rank_: int, local_world: int, gpus: int, share: bool) -> tuple[int, str]:
    """(GPU index, backend) of a process under torchrun: GPU LOCAL_RANK and nccl while the machine has a GPU per
    process. NCCL cannot put two processes on one GPU, so with fewer GPUs than processes the launch is refused. With
    `share` (PATCHSCOPE_SHARE_GPUS=1, to check the distributed code on one GPU) the processes take the GPUs
    round-robin and talk over gloo, on every machine alike (the flag alone decides the backend: all ranks must
    agree on it, whatever each machine's count)."""
    if gpus < 1:
        raise InputError("--device cuda: this machine has no CUDA GPU")
    if share:
        return local_rank_ % gpus, "gloo"
    if local_rank_ < gpus and local_world <= gpus:
        return local_rank_, "nccl"
    raise InputError(f"torchrun started {max(local_world, local_rank_ + 1)} processes on this machine, which has "
                     f"{gpus} GPU{'s' * (gpus != 1)}, and NCCL cannot share a GPU between processes: give "
                     f"--nproc_per_node {gpus} or fewer, or set {SHARE_GPUS}=1 to share the GPUs over gloo "
                     f"(slow; for checking a launch on fewer GPUs)")


def setup(device: torch.device, timeout: datetime.timedelta | None = None) -> torch.device:
    """Join the torchrun process group (once) and return the device this process computes on.

    A single process gets `device` back and nothing is initialised. Under torchrun, `cuda` without an index
    becomes cuda:LOCAL_RANK (made the current device; see `cuda_placement`); the backend follows the device: nccl on
    CUDA (gloo where PATCHSCOPE_SHARE_GPUS=1 shares the GPUs), gloo on CPU.
    """
    if world_size() == 1:
        return device
    if device.type == "cuda":
        # Any index but the one setup resolved is refused, on every rank alike (cuda:0 would suit rank 0 alone,
        # and a refusal on some ranks only would leave the others waiting for them).
        if device.index is not None and device != _state["cuda"]:
            raise InputError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; give "
                             f"--device cuda (or auto) and pick GPUs with CUDA_VISIBLE_DEVICES")
        try:
            if "LOCAL_WORLD_SIZE" not in os.environ:  # without it a process cannot tell it lacks a GPU of its own
                raise InputError("LOCAL_WORLD_SIZE is not set: start the processes with torchrun, or have the "
                                 "launcher set LOCAL_WORLD_SIZE (processes on this machine) and LOCAL_RANK")
            index, chosen = cuda_placement(local_rank(), local_world_size(), torch.cuda.device_count(),
                                           os.environ.get(SHARE_GPUS, "") == "1")
        except InputError as error:  # every rank refuses; the first of each machine says why
            raise (error if local_rank() == 0 else FollowedError(str(error))) from None
        if chosen == "gloo" and local_rank() == 0:
            log.warning("%d processes share %d GPU(s) over gloo (%s=1): slow, for checking the distributed code",
                        local_world_size(), torch.cuda.device_count(), SHARE_GPUS)
        device = _state["cuda"] = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        chosen = "gloo"
    if not torch.distributed.is_available():
        raise InputError("this torch build has no torch.distributed: run without torchrun")
    if not torch.distributed.is_initialized():
        # long: the other ranks wait in a collective while rank 0 alone fills the image store, checks a large
        # sample folder or runs a command that is not sharded (NCCL's default would give up after 10 minutes)
        timeout = timeout if timeout is not None else WAIT_FOR_RANK_0
        torch.distributed.init_process_group(backend=chosen, init_method="env://", timeout=timeout)
        _state["owned"] = True
        atexit.register(shutdown)
        log.debug("rank %d of %d joined the process group (%s)", rank(), world_size(), chosen)
    return device


def shutdown() -> None:
    """Leave the process group this module started (at exit, or by the caller); nothing otherwise."""
    if _state["owned"] and torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
    _state["owned"] = False


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within: this process acts as the only one (world_size() 1, every helper a no-op): for work that is not
    sharded, run by rank 0 while the others wait."""
    before, _state["alone"] = _state["alone"], True
    try:
        yield
    finally:
        _state["alone"] = before


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def broadcast_object(value: T, src: int = 0) -> T:
    """`value` of rank `src` on every rank."""
    if not active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place and returned); the tensor itself in a single process."""
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def gather_ordered(index: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of `values` from every rank, merged into the order of their item `index` (one row per index).

    Each rank scores a disjoint share of the items; the result equals what one process scoring them all returns.
    """
    if not active():
        order = torch.argsort(index)
        return tuple(v[order] for v in values)
    parts = all_gather_object((index.cpu(), *[v.cpu() for v in values]))
    index = torch.cat([part[0] for part in parts])
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(len(index))):
        raise RuntimeError("sharded items do not cover every index exactly once")
    return tuple(torch.cat([part[i + 1] for part in parts])[order] for i in range(len(values)))


def refuse(message: str) -> None:
    """Raise a user error that every rank meets alike: rank 0 reports it, the others exit 2 quietly."""
    raise (InputError if is_main() else FollowedError)(message)


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on rank 0 only; every rank returns its result, or raises when it failed there.

    Rank 0 re-raises its own error; the others raise FollowedError (for a user error) or RuntimeError, so
    no rank is left waiting in a collective for a rank that stopped.
    """
    if not active():
        return fn(*args, **kwargs)
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as err:
            broadcast_object(("error", isinstance(err, InputError), str(err)))
            raise
        broadcast_object(("ok", result))
        return result
    outcome = broadcast_object(None)
    if outcome[0] == "ok":
        return outcome[1]
    if outcome[1]:
        raise FollowedError(outcome[2])
    raise RuntimeError(f"rank 0 failed: {outcome[2]}")


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorate a writer so that only rank 0 runs it (None elsewhere)."""
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: every world_size()-th, from its rank on."""
    return list(items[rank()::world_size()])


def wait_for_main(command: str) -> bool:
    """For a command that is not sharded: True on rank 0, which runs it `alone()`. Any other rank logs it once,
    waits at a barrier until rank 0 is done (`release_others`), and returns False: it should exit 0."""
    if world_size() == 1:
        return True
    setup(torch.device("cpu"), timeout=datetime.timedelta(days=7))  # gloo: waiting costs no device
    if is_main():
        log.info("%s is not sharded: rank 0 runs it alone, ranks 1-%d wait", command, world_size() - 1)
        return True
    barrier()
    shutdown()
    return False


def release_others() -> None:
    """Rank 0, once a `wait_for_main` command is done: let the waiting ranks exit."""
    if active() and is_main():
        barrier()


def gather_keyed(pairs: Sequence[tuple[int, Any]]) -> list[Any]:
    """Every rank's (key, item) pairs, merged in key order, on every rank: the items one process producing every
    key would list. Keys are distinct over the ranks (e.g. the first row of each batch a rank scored)."""
    parts = all_gather_object(list(pairs))
    merged = sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])
    keys = [key for key, _ in merged]
    if len(set(keys)) != len(keys):
        raise RuntimeError("sharded items share a key: two ranks did the same work")
    return [item for _, item in merged]


def all_reduce_grads(params: Any) -> None:
    """Sum the gradients of `params` over the ranks, in place (None gradients skipped); nothing in one process.

    For a loss that each rank computed as its share of a mean over the global batch, the sums are the gradients
    of that mean, as one process computes them (up to the order of the additions)."""
    if not active():
        return
    for param in params:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)


def check_global_batch(batch: int, per_rank_multiple: int = 1, why: str = "") -> None:
    """Refuse, on every rank alike, a global `--batch-size` the processes cannot share evenly (each rank taking a
    multiple of `per_rank_multiple`, `why` saying why); nothing in a single process unless that multiple fails."""
    world, step = world_size(), per_rank_multiple * world_size()
    if batch % step:
        refuse(f"--batch-size {batch} (the global batch) does not split over {world} processes{why}: "
               f"use a multiple of {step}")


def share_of(total: int, what: str) -> tuple[int, int]:
    """(first row, rows) of this rank's contiguous slice of a global batch of `total` rows; a total the ranks
    cannot split evenly is refused on every rank alike (a ValueError naming `what`)."""
    world = world_size()
    if total % world:
        raise ValueError(f"{what} {total} (the global batch) does not split over {world} processes: "
                         f"use a multiple of {world}")
    rows = total // world
    return rank() * rows, rows


@contextlib.contextmanager
def alike() -> Iterator[None]:
    """Within: a user error that every rank meets alike (the same settings, the same files) is printed by rank 0
    only; the other ranks raise it as FollowedError (exit 2, quietly)."""
    try:
        yield
    except FollowedError:
        raise
    except InputError as err:
        if is_main():
            raise
        raise FollowedError(str(err)) from None
