"""A client's whole training run as a generator: local steps, FedAvg push, aggregate pull.

Each update carries the number of examples the client trained on in that round (the
FedAvg weight; the server refuses more than a round can hold). It yields
``("step", Step(loss, seconds))`` after every local step, ``("pushed", round)`` after
sending its update, ``("wait", round)`` while the round's average is not ready and
``("averaged", round)`` once it has loaded it. A client process simply runs it to the
end (sleeping on "wait").

``run_concurrently`` is the simulation's driver: one thread per client, each running
this loop against the server, so the server's schedule (not the driver) decides which
steps run when, exactly as with client processes over the network.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ..protocol.messages import Control
from .runtime import SplitClient


class Step(NamedTuple):
    """One local step's training loss and wall time (seconds, the whole split step)."""

    loss: float
    seconds: float


def client_run(client: SplitClient, batches: Iterator[dict], steps: int, local_steps: int,
               first_round: int = 0, done: int = 0):
    round_ = first_round
    while done < steps:
        num_examples = 0
        for _ in range(min(local_steps, steps - done)):
            batch = next(batches)
            start = time.perf_counter()
            loss = client.train_step(batch)
            seconds = time.perf_counter() - start
            num_examples += batch["input_ids"].shape[0]
            done += 1
            yield "step", Step(loss, seconds)
        client.push_update(round_, num_examples)
        pushed_in = client.transport.epoch
        yield "pushed", round_
        while not client.pull_aggregate(round_):
            if client.transport.epoch != pushed_in:  # the server restarted and lost our update
                client.push_update(round_, num_examples)
                pushed_in = client.transport.epoch
            yield "wait", round_
        yield "averaged", round_
        round_ += 1


def run_concurrently(clients: list[SplitClient], streams: list, steps: int, local_steps: int,
                     on_event: Callable[[SplitClient, str, object], None] | None = None,
                     poll: float = 0.002) -> list[list[float]]:
    """Run every client's loop in its own thread, as separate processes would, and say goodbye at the
    end; returns each client's losses. ``on_event(client, event, value)`` sees every event of its loop but
    "wait" (from the client's thread): ``("step", Step)``, ``("pushed", round)``, ``("averaged", round)``.
    The server's schedule decides the order of the steps, so a schedule that waits for several clients
    (client-batch) gets them; if one client fails, the others stop and its error is raised."""
    losses: list[list[float]] = [[] for _ in clients]
    errors: list[BaseException] = []
    failed = threading.Event()

    def body(k: int) -> None:
        client = clients[k]
        try:
            for event, value in client_run(client, streams[k], steps, local_steps):
                if failed.is_set():
                    raise RuntimeError("stopped: another client failed")
                if event == "step":
                    losses[k].append(value.loss)
                if event == "wait":
                    time.sleep(poll)
                elif on_event is not None:
                    on_event(client, event, value)
            client.finish()
        except BaseException as exc:
            if not failed.is_set():
                errors.append(exc)
            failed.set()
            try:
                client.transport.call(Control(client.id, client.step, command="bye"))  # let the others go on
            except Exception:
                pass

    threads = [threading.Thread(target=body, args=(k,), name=f"client-{c.id}", daemon=True)
               for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return losses
