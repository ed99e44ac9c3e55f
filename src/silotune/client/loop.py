"""A client's whole training run as a generator: local steps, FedAvg push, aggregate pull.

Each update carries the number of examples the client trained on in that round (the
FedAvg weight; the server refuses more than a round can hold). It yields
``("step", loss)`` after every local step, ``("pushed", round)`` after sending its
update and ``("wait", round)`` while the round's average is not ready. A client process
simply runs it to the end (sleeping on "wait"); the simulation advances all clients'
generators in round-robin order, which is the sequential schedule the server enforces,
so both execute the same client code in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator

from .runtime import SplitClient


def client_run(client: SplitClient, batches: Iterator[dict], steps: int, local_steps: int,
               first_round: int = 0, done: int = 0):
    round_ = first_round
    while done < steps:
        num_examples = 0
        for _ in range(min(local_steps, steps - done)):
            batch = next(batches)
            loss = client.train_step(batch)
            num_examples += batch["input_ids"].shape[0]
            done += 1
            yield "step", loss
        client.push_update(round_, num_examples)
        pushed_in = client.transport.epoch
        yield "pushed", round_
        while not client.pull_aggregate(round_):
            if client.transport.epoch != pushed_in:  # the server restarted and lost our update
                client.push_update(round_, num_examples)
                pushed_in = client.transport.epoch
            yield "wait", round_
        round_ += 1
