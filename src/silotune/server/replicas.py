"""Server-hierarchical training: M trunk replicas kept in step through torch.distributed.

FL-GLM's server-hierarchical parallelism runs several copies of the trunk at once, each
serving its own group of clients (client k goes to replica k mod M). Every replica runs
one of the ordinary schedules for its group (sequential), and at the close of every
FedAvg round — every ``federation.local_steps`` steps of each client, so H is the
round length, as FL-GLM averages server sub-models and client parts together — all
replicas meet in one collective step:

1. the trunk's trainable parameters **and** its AdamW moments (``exp_avg``,
   ``exp_avg_sq``) are averaged over the replicas (``all_reduce``), so afterwards the
   replicas are one model again, optimizer included (averaging only the parameters would
   leave each replica's moments pulling it its own way after the next step);
2. the round's client updates of every group are gathered (``all_gather_object``), so
   each replica combines the same updates of all clients with the same strategy and
   holds the same aggregate.

Each replica is a process; they find each other through torch.distributed's usual
environment (``torchrun``, or MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK), with the
gloo backend on CPU and NCCL on GPUs, so replicas can sit on several GPUs or machines.
Every replica must reach every round: a replica whose whole group is gone stalls the
others until the process group's timeout, and the run then fails with that error.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os

import torch
import torch.distributed as dist

from ..errors import ConfigError

log = logging.getLogger(__name__)


def groups(n_clients: int, replicas: int) -> list[list[int]]:
    """The clients of each replica: client k is served by replica k mod M."""
    if not 1 <= replicas <= n_clients:
        raise ConfigError(f"federation.replicas: {replicas} replicas for {n_clients} clients: need 1..{n_clients} "
                          "(every replica serves at least one client)")
    return [list(range(r, n_clients, replicas)) for r in range(replicas)]


def replica_of(client: int, replicas: int) -> int:
    return client % replicas


def replica_address(address: str, rank: int) -> str:
    """Where replica ``rank`` listens: the configured address's port + rank (one machine, several ports)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"deploy.address {address!r}: expected HOST:PORT")
    return f"{host}:{int(port) + rank}"


def env_rank() -> tuple[int, int] | None:
    """(rank, world size) from torch.distributed's environment (torchrun sets it), or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ConfigError("RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None


def init_group(rank: int, world: int, device: torch.device, init_method: str = "env://",
               timeout_s: float = 1800.0) -> None:
    """Join the replicas' process group: gloo on CPU, NCCL on CUDA."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if init_method == "env://":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"hierarchical schedule: {', '.join(missing)} not set; start the replicas with "
                              "torchrun (or set MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("replica %d of %d joined the process group (%s)", rank, world, backend)


class Replicas:
    """This process's place among the replicas, and the collective step at each round's close."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.runtime = None
        self.syncs = 0  # averagings done
        self.train_seconds = 0.0  # set by the simulation: this replica's training time
        self.fingerprints: list[str] = []  # SHA-256 of the averaged trunk (parameters + moments) after each

    def attach(self, runtime, aggregator) -> None:
        self.runtime = runtime
        aggregator.gather = self.exchange

    def members(self, n_clients: int) -> list[int]:
        return groups(n_clients, self.world)[self.rank]

    def exchange(self, round_: int, pending: dict) -> dict:
        """Average the trunk replicas, then return every replica's updates for ``round_``."""
        with self.runtime.lock:
            self.average(self.runtime)
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, {"round": round_, "updates": pending})
        merged = {}
        for rank, item in enumerate(gathered):
            if item["round"] != round_:
                raise RuntimeError(f"replica {rank} closed round {item['round']} while this one closed {round_}: "
                                   "the replicas are out of step")
            merged.update(item["updates"])
        return merged

    def average(self, runtime) -> None:
        """Mean of the trainable trunk parameters and their optimizer moments over the replicas."""
        tensors = [p.data for p in runtime.stepper.params]
        if runtime.stepper.opt is not None:
            for p in runtime.stepper.params:
                state = runtime.stepper.opt.state.get(p, {})
                tensors += [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        at = 0
        for t in tensors:
            t.copy_(flat[at:at + t.numel()].view_as(t))
            at += t.numel()
        self.syncs += 1
        self.fingerprints.append(hashlib.sha256(flat.numpy().tobytes() if flat.device.type == "cpu"
                                                else flat.cpu().numpy().tobytes()).hexdigest()[:16])
