"""Split example indices among federated clients: IID, or label-skewed by a Dirichlet prior.

Both functions return one sorted index list per client; together the lists cover
``0..n-1`` exactly once, and the same arguments always give the same split.
Plainly invalid arguments raise ValueError; a split the data cannot support (too few
examples, a Dirichlet draw that keeps leaving a client short) raises DataError.
"""

from __future__ import annotations

import numpy as np

from silotune.errors import DataError


def _check_clients(n: int, n_clients: int, min_size: int = 1) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients must be an int >= 1, got {n_clients!r}")
    if n < n_clients * min_size:
        raise DataError(f"cannot give each of {n_clients} clients {min_size} example(s): only {n} examples")


def partition_iid(n: int, n_clients: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(n)`` and cut it into ``n_clients`` parts whose sizes differ by at most one."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_clients(n, n_clients)
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(order, n_clients)]


def partition_dirichlet(
    labels: list[int],
    n_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 10_000,
) -> list[list[int]]:
    """Label-skewed split: each class's examples go to clients in ``Dirichlet(alpha)`` proportions.

    For every class the (shuffled) indices are cut at the cumulative proportions of one
    Dirichlet draw over the clients. The whole draw is repeated until every client holds
    at least ``min_size`` examples (DataError after ``max_tries``). Small ``alpha`` gives
    strongly skewed clients, large ``alpha`` approaches an IID split.
    """
    if labels is None or any(label is None for label in labels):
        raise ValueError("partition_dirichlet needs a label for every example; use partition_iid instead")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    labels_arr = np.asarray(labels)
    _check_clients(len(labels_arr), n_clients, max(min_size, 1))
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels_arr == c)) for c in np.unique(labels_arr)]
    for _ in range(max_tries):
        cuts = []
        sizes = np.zeros(n_clients, dtype=np.int64)
        for idx in by_class:
            props = rng.dirichlet(np.full(n_clients, float(alpha)))
            bounds = np.round(np.cumsum(props) * len(idx)).astype(np.int64)
            bounds[-1] = len(idx)
            bounds = np.maximum.accumulate(np.clip(bounds, 0, len(idx)))
            sizes += np.diff(bounds, prepend=0)
            cuts.append(bounds[:-1])
        if sizes.min() >= min_size:
            clients: list[list[int]] = [[] for _ in range(n_clients)]
            for idx, bounds in zip(by_class, cuts, strict=True):
                for client, part in enumerate(np.split(idx, bounds)):
                    clients[client].extend(part.tolist())
            return [sorted(c) for c in clients]
    raise DataError(
        f"no Dirichlet split (alpha={alpha}) gave all {n_clients} clients >= {min_size} examples "
        f"in {max_tries} draws; raise alpha, lower min_size or use fewer clients"
    )
