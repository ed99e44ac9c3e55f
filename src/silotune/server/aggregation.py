"""Federated aggregation of the clients' head and tail adapters, hosted by the trunk server.

Every R local steps each client sends the server its head and tail adapters (its *update*
for round r) and the number of training examples it holds. Once every client still taking
part has sent its update for round r, the round *closes*: the server combines the updates
into one *aggregate*, which every client loads before it trains round r + 1. A client
dropped mid-round (dead, timed out) does not hold the others back (``recheck``).

The server trusts nothing it is sent. What it knows on its own is the ``layout`` (the
adapters' names and shapes, from the model and the adapter method) and ``start`` (their
initial values). Round r's *starting point* is round r - 1's aggregate (``start`` for round
0). ``Aggregator.submit`` checks, in this order, and refuses with a ``ProtocolError``
(storing nothing) an update that:

1. comes from an unknown client id;
2. names a round that is not an integer, or a round after the open one (only the next
   round, latest closed + 1, is open; an update for a closed round is a late client's and is
   ignored, not an error);
3. comes from a client not taking part (``expected()``: dropped, inactive, finished);
4. claims a number of examples that is not an integer in 1..``max_examples``;
5. does not hold exactly the layout's tensor names;
6. holds a tensor of another shape, of an integer or bool dtype, or with NaN or Inf.

A client that sends again for the same open round replaces its earlier update (an honest
client re-sends when a reply is lost). Only the open round's updates are held, and only the
last two aggregates are kept.

How updates are combined (``AggregationSettings``):

- Each update is first taken as a *delta* from the round's starting point.
- ``norm_bound`` B: a delta whose L2 norm over all its tensors together exceeds B is scaled
  down to norm B. A client's pull on the fedavg aggregate is then at most its weight share
  times B, however large its update.
- ``fedavg``: the mean of the deltas weighted by the clients' example counts. Without a norm
  bound it is computed directly on the updates, bit-for-bit as the original FedAvg did.
  Example counts are still the clients' claims: ``max_examples`` caps them, so a liar can
  raise its weight to at most ``max_examples``.
- ``median``: per coordinate, the median of the deltas; for an even number of clients, the
  mean of the two middle values. Example counts are ignored.
- ``trimmed_mean``: per coordinate, drop the floor(trim_fraction * n) lowest and as many
  highest deltas of the n clients, and take the plain mean of the rest. Example counts are
  ignored. With too few clients for the fraction (floor(...) = 0) it is the plain mean.

With ``server_optimizer: none`` (the default) the aggregate is the starting point plus the
combined delta, as float32 (the dtype decoded messages arrive in). Clients are always taken
in client-id order, so a result does not depend on the order in which updates arrived.

Server optimizers (FedOpt, Reddi et al., "Adaptive Federated Optimization"): with N clients
the head and tail move each round by about the mean of N clients' updates, roughly 1/N of the
progress N times as many sequential steps would make. ``server_optimizer`` instead treats the
combined delta Δ (of any strategy, after any norm bound) as a pseudo-gradient g = -Δ and
steps a ``torch.optim`` optimizer on the aggregate x (float32, starting at ``start``):
x_r = x_{r-1} - step(g), with x_{r-1} the round's starting point.

- ``momentum`` (FedAvgM): ``torch.optim.SGD``, v = m v + g; x = x - lr v (no Nesterov).
  Defaults: ``server_lr`` 1.0, ``server_momentum`` 0.9. With lr 1 and momentum 0 it is
  plain averaging; on a steady direction the step grows to about lr / (1 - m) times Δ.
- ``adam`` (FedAdam): ``torch.optim.Adam`` (bias-corrected, as torch does it). Defaults:
  ``server_lr`` 0.01, ``server_betas`` [0.9, 0.99], ``server_epsilon`` 1e-3 (FedOpt's tau).
  Each coordinate moves by about lr per round whatever the size of Δ, so ``server_lr``
  needs tuning to the adapters' scale (the first round moves x by lr * g / (|g| + eps)).

Use one with many clients and a small budget of rounds, where plain averaging moves the
adapters too little; with few clients plain averaging is the safe choice. One optimizer
lives across rounds (its state: the momentum buffer, or Adam's moments and step count) and
is saved in ``state_dict`` (``server_optim``); a resumed server continues exactly as if it
had not stopped. Its hyperparameters always come from the current settings; a checkpoint
without an optimizer state (older, or of another kind) starts the optimizer afresh.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, ProtocolError, SiloTuneError

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "median", "trimmed_mean")
SERVER_OPTIMIZERS = ("none", "momentum", "adam")
DEFAULT_SERVER_LR = {"momentum": 1.0, "adam": 0.01}
AGGREGATE_DTYPE = torch.float32


@dataclass
class AggregationSettings:
    strategy: str = "fedavg"
    """How the round's updates are combined: ``fedavg``, ``median`` or ``trimmed_mean``."""
    trim_fraction: float = 0.1
    """``trimmed_mean``: the fraction of clients cut from *each* end, per coordinate (0 to < 0.5)."""
    norm_bound: float | None = None
    """L2 bound on each client's delta from the round's starting point; None: no bound."""
    server_optimizer: str = "none"
    """Step taken on the aggregate with the combined delta: ``none`` (add it), ``momentum`` (FedAvgM) or ``adam``."""
    server_lr: float | None = None
    """The server optimizer's learning rate; None: 1.0 for ``momentum``, 0.01 for ``adam``."""
    server_momentum: float = 0.9
    """``momentum``: the momentum factor (0 to < 1)."""
    server_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """``adam``: the decay rates of the first and second moments (two values, each 0 to < 1)."""
    server_epsilon: float = 1e-3
    """``adam``: added to the root of the second moment (FedOpt's tau; positive)."""

    def validate(self, bad) -> None:
        if self.strategy not in STRATEGIES:
            bad("aggregation.strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not 0 <= self.trim_fraction < 0.5:
            bad("aggregation.trim_fraction", "must be in [0, 0.5): the fraction cut from each end")
        if self.norm_bound is not None and not (self.norm_bound > 0 and math.isfinite(self.norm_bound)):
            bad("aggregation.norm_bound", "must be a positive number (or null for no bound)")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            bad("aggregation.server_optimizer",
                f"must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.server_optimizer!r}")
        if self.server_lr is not None and not _positive(self.server_lr):
            bad("aggregation.server_lr", "must be a positive number (or null for the optimizer's default)")
        if not (_number(self.server_momentum) and 0 <= self.server_momentum < 1):
            bad("aggregation.server_momentum", "must be in [0, 1)")
        betas = self.server_betas
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
            bad("aggregation.server_betas", f"must be two numbers, each in [0, 1), got {betas!r}")
        if not _positive(self.server_epsilon):
            bad("aggregation.server_epsilon", "must be a positive number")


class Aggregator:
    def __init__(self, n_clients: int, layout: dict[str, tuple[int, ...]], start: dict[str, torch.Tensor],
                 settings: AggregationSettings | None = None, expected: Callable[[], set[int]] | None = None,
                 max_examples: int | None = None, participants: Callable[[], set[int]] | None = None):
        """``expected()`` gives the clients a round waits for (default: all); ``participants()`` those
        that may submit (default: the expected ones; the trunk server also admits a client dropped
        mid-round that trained on, but never one that has finished); ``max_examples`` caps the
        example count a client may claim (None: no cap)."""
        self.n_clients = n_clients
        self.layout = {name: tuple(shape) for name, shape in layout.items()}
        self.settings = settings or AggregationSettings()
        self.expected = expected or (lambda: set(range(n_clients)))
        self.participants = participants or (lambda: self.expected())
        self.gather = None  # server-hierarchical: (round, this replica's updates) -> every replica's updates
        self.max_examples = max_examples

        def bad(key, msg):
            raise ConfigError(f"{key}: {msg}")

        self.settings.validate(bad)
        if max_examples is not None and not (_is_int(max_examples) and max_examples >= 1):
            raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
        fault = _layout_fault(self.layout, start)
        if fault is not None:
            raise ValueError(f"starting point does not match the adapter layout: {fault}")
        self.start = {name: start[name].detach().to(AGGREGATE_DTYPE, copy=True) for name in self.layout}
        if self.settings.strategy == "trimmed_mean" and int(self.settings.trim_fraction * n_clients) == 0:
            log.warning("trimmed_mean with trim_fraction %g and %d clients trims nothing: it is the plain mean",
                        self.settings.trim_fraction, n_clients)

        self.pending: dict[int, tuple[dict[str, torch.Tensor], int]] = {}  # the open round's updates by client
        self.results: dict[int, dict[str, torch.Tensor]] = {}  # aggregates of the last two closed rounds
        self.server_optim = self._new_server_optim()  # None for ``none``; its parameters hold the aggregate

    # ---- receiving updates ----
    def submit(self, client: int, round_: int, tensors: dict[str, torch.Tensor], num_examples: int) -> bool:
        """Check and store ``client``'s update for the open round; True if it closed the round.

        An update for a round already closed (a late client) is ignored and gives False;
        any other fault raises ProtocolError and stores nothing."""
        if not (_is_int(client) and 0 <= client < self.n_clients):
            raise ProtocolError(f"aggregation from unknown client {_short(client)} "
                                f"(clients are 0..{self.n_clients - 1})")
        if not _is_int(round_):
            raise ProtocolError(f"client {client}: aggregation round must be an integer, got "
                                f"{type(round_).__name__}")
        open_round = self.latest()[0] + 1
        if round_ < open_round:
            return False  # the round closed without this (late) client
        where = f"client {client}, round {round_}"
        if round_ > open_round:
            raise ProtocolError(f"{where}: update refused, round {open_round} is the one open")
        if client not in self.participants():
            raise ProtocolError(f"{where}: update refused, the client is not taking part in the round")
        if not (_is_int(num_examples) and num_examples >= 1
                and (self.max_examples is None or num_examples <= self.max_examples)):
            allowed = ">= 1" if self.max_examples is None else f"in 1..{self.max_examples}"
            shown = num_examples if _is_int(num_examples) else type(num_examples).__name__
            raise ProtocolError(f"{where}: num_examples must be an integer {allowed}, got {shown}")
        fault = _layout_fault(self.layout, tensors)
        if fault is not None:
            raise ProtocolError(f"{where}: {fault}")
        self.pending[client] = ({name: tensors[name].detach() for name in self.layout}, num_examples)
        return self._try_close(round_)

    def recheck(self) -> list[int]:
        """Rounds closed now that fewer clients are expected (call it after a client is dropped)."""
        round_ = self.latest()[0] + 1
        return [round_] if self._try_close(round_) else []

    def _try_close(self, round_: int) -> bool:
        if not self.pending or not self.expected() <= set(self.pending):
            return False
        if self.gather is not None:
            self.pending = self.gather(round_, self.pending)
        clients = sorted(self.pending)
        updates = [self.pending[c][0] for c in clients]
        weights = [self.pending[c][1] for c in clients]
        self.results[round_] = self._combine(self._starting_point(round_), updates, weights, clients, round_)
        self.pending = {}
        for old in [r for r in self.results if r < round_ - 1]:
            del self.results[old]
        return True

    def _starting_point(self, round_: int) -> dict[str, torch.Tensor]:
        return self.results.get(round_ - 1, self.start)

    # ---- combining ----
    def _combine(self, base: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]], weights: list[int],
                 clients: list[int], round_: int) -> dict[str, torch.Tensor]:
        """The aggregate of ``updates`` (in client-id order) for a round starting from ``base``."""
        strategy, bound = self.settings.strategy, self.settings.norm_bound
        if strategy == "fedavg" and bound is None and self.server_optim is None:
            return weighted_mean(updates, weights, AGGREGATE_DTYPE)  # the original FedAvg, bit for bit
        deltas = [{name: u[name].double() - base[name].double() for name in self.layout} for u in updates]
        if bound is not None:
            for client, delta in zip(clients, deltas):
                norm = clip_to_norm(delta, bound)
                if norm > bound:
                    log.info("client %d, round %d: update norm %.4g clipped to %.4g", client, round_, norm, bound)
        if strategy == "fedavg":
            combined = weighted_mean(deltas, weights, torch.float64)
        elif strategy == "median":
            combined = {name: coordinate_median(torch.stack([d[name] for d in deltas])) for name in self.layout}
        else:
            cut = int(self.settings.trim_fraction * len(deltas))
            combined = {name: trimmed_mean(torch.stack([d[name] for d in deltas]), cut) for name in self.layout}
        if self.server_optim is not None:
            return self._server_step(base, combined)
        return {name: (base[name].double() + combined[name]).to(AGGREGATE_DTYPE) for name in self.layout}

    # ---- the server optimizer ----
    def _server_hyper(self) -> dict:
        """The server optimizer's hyperparameters, from the settings."""
        s = self.settings
        lr = DEFAULT_SERVER_LR[s.server_optimizer] if s.server_lr is None else s.server_lr
        if s.server_optimizer == "momentum":
            return {"lr": lr, "momentum": s.server_momentum, "nesterov": False}
        return {"lr": lr, "betas": tuple(s.server_betas), "eps": s.server_epsilon}

    def _new_server_optim(self) -> torch.optim.Optimizer | None:
        """A fresh server optimizer over float32 copies of ``start``, in sorted name order; None for ``none``."""
        kind = self.settings.server_optimizer
        if kind == "none":
            return None
        params = [self.start[name].clone() for name in sorted(self.layout)]
        cls = torch.optim.SGD if kind == "momentum" else torch.optim.Adam
        return cls(params, foreach=False, **self._server_hyper())

    def _server_step(self, base: dict[str, torch.Tensor], combined: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The aggregate after one server optimizer step from ``base`` with the pseudo-gradient -``combined``."""
        params = dict(zip(sorted(self.layout), self.server_optim.param_groups[0]["params"]))
        for name, p in params.items():
            p.copy_(base[name])  # the parameters are the starting point (also right after a resume)
            p.grad = (-combined[name]).to(AGGREGATE_DTYPE)
        self.server_optim.step()
        self.server_optim.zero_grad(set_to_none=True)
        return {name: params[name].detach().clone() for name in self.layout}

    def _load_server_optim(self, state: dict) -> torch.optim.Optimizer | None:
        """The server optimizer resumed from ``state`` (fresh when it holds none of this kind)."""
        optim = self._new_server_optim()
        saved, kind = state.get("server_optim"), state.get("server_optimizer")
        if optim is None or saved is None:
            return optim
        if kind != self.settings.server_optimizer:
            log.warning("aggregation state holds a %r server optimizer, not %r: starting it afresh",
                        kind, self.settings.server_optimizer)
            return optim
        try:
            optim.load_state_dict(copy.deepcopy(saved))
        except (KeyError, ValueError, TypeError) as exc:
            raise SiloTuneError(f"aggregation state: the server optimizer state does not load ({exc})") from None
        optim.param_groups[0].update(self._server_hyper())  # hyperparameters come from the settings
        return optim

    # ---- reading results, checkpoints ----
    def result(self, round_: int) -> dict[str, torch.Tensor] | None:
        """Round ``round_``'s aggregate, if it is one of the last two closed rounds."""
        return self.results.get(round_)

    def latest(self) -> tuple[int, dict[str, torch.Tensor] | None]:
        """The last closed round and its aggregate; (-1, None) before the first."""
        if not self.results:
            return -1, None
        r = max(self.results)
        return r, self.results[r]

    def state_dict(self) -> dict:
        round_, aggregate = self.latest()
        state = {"round": round_, "aggregate": aggregate or {}}
        if self.server_optim is not None:  # a deep copy: later steps update the optimizer's tensors in place
            state.update(server_optimizer=self.settings.server_optimizer,
                         server_optim=copy.deepcopy(self.server_optim.state_dict()))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``: that round is the last closed one; nothing is pending.

        A state without a server optimizer state (from before there was one) starts it afresh."""
        round_, aggregate = state["round"], state["aggregate"]
        if not _is_int(round_) or round_ < -1:
            raise SiloTuneError(f"aggregation state: round must be an integer >= -1, got {round_!r}")
        if round_ != -1:
            fault = _layout_fault(self.layout, aggregate)
            if fault is not None:
                raise SiloTuneError(f"aggregation state for round {round_} does not match the adapters: {fault}")
        server_optim = self._load_server_optim(state)
        self.pending = {}
        self.results = {} if round_ == -1 else {
            round_: {name: aggregate[name].detach().to(AGGREGATE_DTYPE) for name in self.layout}}
        self.server_optim = server_optim


def weighted_mean(updates: list[dict[str, torch.Tensor]], weights: list[int],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """sum_i (w_i / total) * u_i per tensor, accumulated in float64, cast to ``dtype``.

    This exact expression (accumulation order included) is the original FedAvg's: keep it, the
    exactness tests compare trained adapters bit for bit."""
    total = float(sum(weights))
    return {k: sum(u[k].double() * (w / total) for u, w in zip(updates, weights)).to(dtype) for k in updates[0]}


def clip_to_norm(delta: dict[str, torch.Tensor], bound: float) -> float:
    """Scale ``delta`` in place to L2 norm (over all its tensors) at most ``bound``; returns the norm before."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
    if norm > bound:
        for name in delta:
            delta[name] = delta[name] * (bound / norm)
    return norm


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median over dim 0 (one row per client); the mean of the two middle values when even."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, cut: int) -> torch.Tensor:
    """Per-coordinate mean over dim 0 after dropping the ``cut`` lowest and ``cut`` highest values."""
    ordered = stacked.sort(dim=0).values
    return ordered[cut:ordered.shape[0] - cut].mean(dim=0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value) -> bool:
    return _number(value) and value > 0 and math.isfinite(value)


def _layout_fault(layout: dict[str, tuple[int, ...]], tensors) -> str | None:
    """What is wrong with ``tensors`` as a set of adapter values for ``layout``, or None."""
    if not isinstance(tensors, dict):
        return f"adapters must be a mapping of name to tensor, got {type(tensors).__name__}"
    missing = sorted(set(layout) - set(tensors))
    if missing:
        return f"missing adapter tensor {missing[0]!r}"
    unexpected = sorted((k for k in tensors if k not in layout), key=repr)
    if unexpected:
        return f"unexpected tensor {_short(unexpected[0])} (not an adapter of this model)"
    for name, shape in layout.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            return f"{name!r} must be a tensor, got {type(t).__name__}"
        if tuple(t.shape) != shape:
            return f"{name!r} has shape {tuple(t.shape)}, expected {shape}"
        if not t.is_floating_point():
            return f"{name!r} must be floating point, got {t.dtype}"
        if not bool(torch.isfinite(t).all()):
            return f"{name!r} holds NaN or infinite values"
    return None


def _short(key) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."
