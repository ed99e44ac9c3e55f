"""The trunk server's aggregation: exact FedAvg, refusal of malformed updates, robust strategies, server optimizers."""

import re

import pytest
import torch

from silotune.errors import ConfigError, ProtocolError, SiloTuneError
from silotune.server import checkpoint as ckpt
from silotune.server.aggregation import AggregationSettings, Aggregator

LAYOUT = {"head.a": (3, 4), "tail.b": (5,)}
MAX_EXAMPLES = 1000


def values(seed: int, scale: float = 1.0, base: dict | None = None) -> dict[str, torch.Tensor]:
    """Random float32 adapters for LAYOUT (``base`` plus ``scale`` * noise when given)."""
    g = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(shape, generator=g) * scale for k, shape in LAYOUT.items()}
    return noise if base is None else {k: base[k] + noise[k] for k in LAYOUT}


START = values(0)


def make(n_clients: int = 3, settings: AggregationSettings | None = None, active: set[int] | None = None,
         start: dict | None = None) -> Aggregator:
    expected = None if active is None else (lambda: set(active))
    return Aggregator(n_clients, LAYOUT, start or START, settings, expected=expected, max_examples=MAX_EXAMPLES)


def reference(updates: list[dict], weights: list[int]) -> dict[str, torch.Tensor]:
    """The original FedAvg formula, on the raw updates in client-id order."""
    total = float(sum(weights))
    return {k: sum(u[k].double() * (w / total) for u, w in zip(updates, weights)).to(torch.float32) for k in LAYOUT}


def l2(a: dict, b: dict) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in LAYOUT) ** 0.5


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b) == set(LAYOUT)
    for k in LAYOUT:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


HONEST = [values(10 + c, 0.1, START) for c in range(3)]
HONEST_WEIGHTS = [30, 50, 70]


def honest_result() -> dict[str, torch.Tensor]:
    agg = make()
    for c in range(3):
        agg.submit(c, 0, HONEST[c], HONEST_WEIGHTS[c])
    return agg.result(0)


# ---- plain FedAvg ----
def test_plain_fedavg_is_bit_identical_to_the_original_formula():
    agg = make()
    for c in (2, 0, 1):  # arrival order does not matter: clients are combined in id order
        closed = agg.submit(c, 0, HONEST[c], HONEST_WEIGHTS[c])
        assert closed == (c == 1)
    assert_same(agg.result(0), reference(HONEST, HONEST_WEIGHTS))
    assert agg.latest()[0] == 0
    far = make(start={k: torch.full(s, 1e30) for k, s in LAYOUT.items()})  # plain FedAvg ignores the start
    for c in range(3):
        far.submit(c, 0, HONEST[c], HONEST_WEIGHTS[c])
    assert_same(far.result(0), reference(HONEST, HONEST_WEIGHTS))


def test_fedavg_combines_in_client_id_order_whatever_the_arrival_order():
    scalars = [1e20, -1e20, 1.0]  # float64 sums of these depend on the order they are added in
    updates = [{k: torch.full(s, x) for k, s in LAYOUT.items()} for x in scalars]
    agg = make()
    for c in (0, 2, 1):
        agg.submit(c, 0, updates[c], 10)
    assert_same(agg.result(0), reference(updates, [10, 10, 10]))
    assert agg.result(0)["tail.b"][0] == torch.tensor(1 / 3, dtype=torch.float32)


def test_fedavg_weights_by_num_examples():
    agg = make(2, start={k: torch.zeros(s) for k, s in LAYOUT.items()})
    agg.submit(0, 0, {k: torch.zeros(s) for k, s in LAYOUT.items()}, 1)
    agg.submit(1, 0, {k: torch.ones(s) for k, s in LAYOUT.items()}, 3)
    for k in LAYOUT:
        assert torch.equal(agg.result(0)[k], torch.full(LAYOUT[k], 0.75))


# ---- refusals ----
def with_(**changes):
    out = {k: v.clone() for k, v in HONEST[1].items()}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


BAD = {  # name: (client, round, tensors, num_examples, what the error says)
    "unknown client": (7, 0, HONEST[1], 50, "unknown client 7"),
    "negative client": (-1, 0, HONEST[1], 50, "unknown client -1"),
    "future round": (1, 1, HONEST[1], 50, "round 0 is the one open"),
    "float round": (1, 0.0, HONEST[1], 50, "round must be an integer, got float"),
    "string round": (1, "0", HONEST[1], 50, "round must be an integer, got str"),
    "inactive client": (3, 0, HONEST[1], 50, "not taking part"),
    "zero examples": (1, 0, HONEST[1], 0, "num_examples"),
    "negative examples": (1, 0, HONEST[1], -5, "num_examples"),
    "too many examples": (1, 0, HONEST[1], MAX_EXAMPLES + 1, "num_examples"),
    "huge example count": (1, 0, HONEST[1], 10 ** 18, "num_examples"),
    "float examples": (1, 0, HONEST[1], 50.0, "num_examples"),
    "bool examples": (1, 0, HONEST[1], True, "num_examples"),
    "missing key": (1, 0, with_(**{"tail.b": None}), 50, "missing adapter tensor 'tail.b'"),
    "extra key": (1, 0, with_(**{"head.extra": torch.zeros(2)}), 50, "unexpected tensor 'head.extra'"),
    "not a tensor": (1, 0, with_(**{"tail.b": [0.0] * 5}), 50, "must be a tensor"),
    "wrong shape": (1, 0, with_(**{"head.a": torch.zeros(4, 3)}), 50, "has shape"),
    "int64 tensor": (1, 0, with_(**{"tail.b": torch.arange(5)}), 50, "floating point, got torch.int64"),
    "bool tensor": (1, 0, with_(**{"tail.b": torch.ones(5, dtype=torch.bool)}), 50, "floating point, got torch.bool"),
    "NaN": (1, 0, with_(**{"head.a": torch.zeros(3, 4).index_fill_(0, torch.tensor([1]), float("nan"))}), 50,
            "NaN or infinite"),
    "Inf": (1, 0, with_(**{"tail.b": torch.tensor([0.0, 0.0, float("-inf"), 0.0, 0.0])}), 50, "NaN or infinite"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_update_is_refused_and_stores_nothing(name):
    client, round_, tensors, n, says = BAD[name]
    agg = Aggregator(4, LAYOUT, START, expected=lambda: {0, 1, 2}, max_examples=MAX_EXAMPLES)  # 3 takes no part
    with pytest.raises(ProtocolError, match=re.escape(says)) as err:  # the round's first submission
        agg.submit(client, round_, tensors, n)
    assert "\n" not in str(err.value) and "client" in str(err.value)
    assert agg.pending == {} and agg.latest() == (-1, None)
    agg.submit(0, 0, HONEST[0], HONEST_WEIGHTS[0])
    with pytest.raises(ProtocolError, match=re.escape(says)):  # and mid-round
        agg.submit(client, round_, tensors, n)
    assert set(agg.pending) == {0}
    assert not agg.submit(1, 0, HONEST[1], HONEST_WEIGHTS[1])
    assert agg.submit(2, 0, HONEST[2], HONEST_WEIGHTS[2])
    assert_same(agg.result(0), honest_result())


def test_error_names_client_round_and_fault():
    agg = make()
    with pytest.raises(ProtocolError, match=r"client 1, round 0: 'head.a' has shape \(4, 3\), expected \(3, 4\)"):
        agg.submit(1, 0, with_(**{"head.a": torch.zeros(4, 3)}), 50)
    with pytest.raises(ProtocolError, match=r"client 1, round 0: missing adapter tensor 'tail.b'"):
        agg.submit(1, 0, with_(**{"tail.b": None}), 50)
    with pytest.raises(ProtocolError, match=r"client 1, round 0: num_examples must be an integer in 1..1000, got 0"):
        agg.submit(1, 0, HONEST[1], 0)


def test_bad_first_update_does_not_lock_out_honest_clients():
    """The layout is the server's own: a self-consistent but wrong first update cannot redefine it."""
    agg = make()
    wrong = {"head.a": torch.zeros(2, 2), "tail.b": torch.zeros(5, dtype=torch.float64), "x": torch.zeros(1)}
    with pytest.raises(ProtocolError):
        agg.submit(0, 0, wrong, 50)
    for c in range(3):
        agg.submit(c, 0, HONEST[c], HONEST_WEIGHTS[c])
    assert_same(agg.result(0), honest_result())


def test_late_update_is_ignored_and_resubmission_replaces():
    agg = make()
    agg.submit(0, 0, HONEST[2], 999)  # replaced by the re-send below
    agg.submit(0, 0, HONEST[0], HONEST_WEIGHTS[0])
    agg.submit(1, 0, HONEST[1], HONEST_WEIGHTS[1])
    assert agg.submit(2, 0, HONEST[2], HONEST_WEIGHTS[2])
    assert_same(agg.result(0), honest_result())
    assert agg.submit(1, 0, values(99), 50) is False  # round 0 is closed: a late client
    assert agg.pending == {}
    assert_same(agg.result(0), honest_result())
    assert not agg.submit(0, 1, HONEST[0], 50)  # round 1 is now the open one
    assert set(agg.pending) == {0}


def test_only_the_last_two_rounds_are_kept():
    agg = make(1)
    for r in range(3):
        assert agg.submit(0, r, HONEST[r], 10)
    assert agg.result(0) is None and agg.result(1) is not None and agg.latest()[0] == 2


# ---- dropped clients, checkpoints ----
def test_recheck_closes_the_round_when_a_client_is_dropped():
    active = {0, 1, 2}
    agg = make(active=active)
    assert agg.recheck() == []
    agg.submit(0, 0, HONEST[0], HONEST_WEIGHTS[0])
    agg.submit(1, 0, HONEST[1], HONEST_WEIGHTS[1])
    assert agg.recheck() == [] and agg.result(0) is None
    active.discard(2)
    assert agg.recheck() == [0]
    assert_same(agg.result(0), reference(HONEST[:2], HONEST_WEIGHTS[:2]))
    assert agg.recheck() == []
    with pytest.raises(ProtocolError, match="not taking part"):
        agg.submit(2, 1, HONEST[2], 50)


def test_state_dict_round_trip():
    fresh = make()
    assert fresh.state_dict() == {"round": -1, "aggregate": {}}
    agg = make(settings=AggregationSettings(strategy="median"))
    for c in range(3):
        agg.submit(c, 0, HONEST[c], HONEST_WEIGHTS[c])
    state = agg.state_dict()
    assert state["round"] == 0
    fresh.load_state_dict(state)
    assert fresh.latest()[0] == 0
    assert_same(fresh.latest()[1], agg.latest()[1])
    assert fresh.submit(0, 0, HONEST[0], 50) is False  # round 0 is closed there too
    fresh.submit(0, 1, HONEST[0], 50)  # and round 1 open
    fresh.load_state_dict({"round": -1, "aggregate": {}})
    assert fresh.latest() == (-1, None) and fresh.pending == {}
    with pytest.raises(SiloTuneError, match="does not match the adapters: missing adapter tensor 'head.a'"):
        fresh.load_state_dict({"round": 3, "aggregate": {"head.x": torch.ones(2)}})


# ---- robustness against one poisoned client ----
ROBUST_HONEST = [values(20 + c, 0.1, START) for c in range(4)]
ROBUST_WEIGHTS = [100, 200, 300, 400, 500]  # the attacker (client 4) claims the most examples


def poisoned(kind: str) -> dict[str, torch.Tensor]:
    if kind == "huge":
        return {k: torch.full(s, 1e6) for k, s in LAYOUT.items()}
    mean_delta = {k: sum(u[k] - START[k] for u in ROBUST_HONEST) / 4 for k in LAYOUT}
    return {k: START[k] - 1e5 * mean_delta[k] for k in LAYOUT}  # scaled, sign-flipped


def run_round(settings: AggregationSettings, attacker: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    agg = make(5, settings)
    for c, update in enumerate([*ROBUST_HONEST, attacker]):
        agg.submit(c, 0, update, ROBUST_WEIGHTS[c])
    return agg.result(0)


@pytest.mark.parametrize("kind", ["huge", "flipped"])
def test_norm_bound_limits_one_clients_pull_on_fedavg(kind):
    bound = 1.0
    share = ROBUST_WEIGHTS[4] / sum(ROBUST_WEIGHTS)
    settings = AggregationSettings(norm_bound=bound)
    attacked, baseline = run_round(settings, poisoned(kind)), run_round(settings, START)  # START: a zero delta
    # the honest deltas are inside the bound, so only the attacker's is scaled; its pull is share * bound
    pull = l2(attacked, baseline)
    assert share * bound * 0.999 <= pull <= share * bound + 1e-5
    # without the bound, the same attacker moves the average arbitrarily far
    plain = AggregationSettings()
    assert l2(run_round(plain, poisoned(kind)), run_round(plain, START)) > 1e3


@pytest.mark.parametrize("settings", [AggregationSettings(strategy="median"),
                                      AggregationSettings(strategy="trimmed_mean", trim_fraction=0.2)],
                         ids=["median", "trimmed_mean"])
@pytest.mark.parametrize("kind", ["huge", "flipped"])
def test_robust_strategies_stay_within_the_honest_range(settings, kind):
    stacked = {k: torch.stack([u[k] for u in ROBUST_HONEST]) for k in LAYOUT}
    low, high = {k: v.min(0).values for k, v in stacked.items()}, {k: v.max(0).values for k, v in stacked.items()}
    result = run_round(settings, poisoned(kind))
    for k in LAYOUT:
        assert result[k].dtype == torch.float32
        assert bool(((low[k] <= result[k]) & (result[k] <= high[k])).all()), k
    plain = run_round(AggregationSettings(), poisoned(kind))
    assert not all(bool(((low[k] <= plain[k]) & (plain[k] <= high[k])).all()) for k in LAYOUT)


def test_median_and_trimmed_mean_values():
    zero = {k: torch.zeros(s) for k, s in LAYOUT.items()}

    def combine(settings, scalars, weights=None):
        agg = Aggregator(len(scalars), LAYOUT, zero, settings)
        for c, x in enumerate(scalars):
            agg.submit(c, 0, {k: torch.full(s, float(x)) for k, s in LAYOUT.items()}, (weights or [1] * 9)[c])
        return float(agg.result(0)["tail.b"][0])

    median = AggregationSettings(strategy="median")
    assert combine(median, [5, 1, 100]) == 5
    assert combine(median, [1, 2, 3, 10]) == 2.5  # even count: mean of the two middle values
    assert combine(median, [1, 2, 3], weights=[1, 1, 1000]) == 2  # unweighted
    trimmed = AggregationSettings(strategy="trimmed_mean", trim_fraction=0.2)
    assert combine(trimmed, [-100, 1, 2, 6, 100]) == 3  # one cut from each end
    assert combine(trimmed, [0, 4, 8, 100]) == 28  # floor(0.2 * 4) = 0: nothing cut
    assert combine(trimmed, [1, 2, 3, 4, 5], weights=[1000, 1, 1, 1, 1]) == 3  # unweighted


def test_norm_bound_is_measured_from_the_rounds_starting_point():
    unit = {k: torch.ones(s) / sum(torch.ones(t).numel() for t in LAYOUT.values()) ** 0.5 for k, s in LAYOUT.items()}
    zero = {k: torch.zeros(s) for k, s in LAYOUT.items()}
    agg = Aggregator(1, LAYOUT, zero, AggregationSettings(norm_bound=1.0))
    agg.submit(0, 0, {k: 3 * unit[k] for k in LAYOUT}, 1)  # clipped to norm 1 from the start
    assert abs(l2(agg.result(0), zero) - 1.0) < 1e-6
    agg.submit(0, 1, {k: 1.9 * unit[k] for k in LAYOUT}, 1)  # 0.9 from round 0's aggregate: not clipped
    assert abs(l2(agg.result(1), zero) - 1.9) < 1e-6


# ---- settings ----
@pytest.mark.parametrize("changes, key", [
    ({"strategy": "mean"}, "aggregation.strategy"),
    ({"trim_fraction": 0.5}, "aggregation.trim_fraction"),
    ({"trim_fraction": -0.1}, "aggregation.trim_fraction"),
    ({"norm_bound": 0.0}, "aggregation.norm_bound"),
    ({"norm_bound": -1.0}, "aggregation.norm_bound"),
    ({"norm_bound": float("inf")}, "aggregation.norm_bound"),
    ({"norm_bound": float("nan")}, "aggregation.norm_bound"),
    ({"server_optimizer": "sgd"}, "aggregation.server_optimizer"),
    ({"server_optimizer": "fedadam"}, "aggregation.server_optimizer"),
    ({"server_lr": 0.0}, "aggregation.server_lr"),
    ({"server_lr": -1.0}, "aggregation.server_lr"),
    ({"server_lr": float("inf")}, "aggregation.server_lr"),
    ({"server_lr": float("nan")}, "aggregation.server_lr"),
    ({"server_momentum": 1.0}, "aggregation.server_momentum"),
    ({"server_momentum": -0.1}, "aggregation.server_momentum"),
    ({"server_momentum": float("nan")}, "aggregation.server_momentum"),
    ({"server_betas": [0.9]}, "aggregation.server_betas"),
    ({"server_betas": [0.9, 0.99, 0.999]}, "aggregation.server_betas"),
    ({"server_betas": [0.9, 1.0]}, "aggregation.server_betas"),
    ({"server_betas": [-0.1, 0.99]}, "aggregation.server_betas"),
    ({"server_betas": ["a", 0.99]}, "aggregation.server_betas"),
    ({"server_epsilon": 0.0}, "aggregation.server_epsilon"),
    ({"server_epsilon": -1e-3}, "aggregation.server_epsilon"),
    ({"server_epsilon": float("inf")}, "aggregation.server_epsilon"),
])
def test_invalid_settings_are_refused(changes, key):
    def bad(k, msg):
        raise ConfigError(f"{k}: {msg}")

    AggregationSettings().validate(bad)
    with pytest.raises(ConfigError, match=key):
        AggregationSettings(**changes).validate(bad)
    with pytest.raises(ConfigError, match=key):
        Aggregator(2, LAYOUT, START, AggregationSettings(**changes))


def test_invalid_server_optimizer_message_lists_the_choices():
    with pytest.raises(ConfigError, match=r"aggregation.server_optimizer: must be one of none, momentum, adam, got 'sgd'"):
        Aggregator(2, LAYOUT, START, AggregationSettings(server_optimizer="sgd"))
    for kind in ("none", "momentum", "adam"):  # and the valid settings pass, lr given or not
        Aggregator(2, LAYOUT, START, AggregationSettings(server_optimizer=kind, server_lr=0.5, server_momentum=0.0,
                                                         server_betas=[0.0, 0.5], server_epsilon=1e-8))


def test_starting_point_must_match_the_layout():
    with pytest.raises(ValueError, match="missing adapter tensor 'tail.b'"):
        Aggregator(2, LAYOUT, {"head.a": torch.zeros(3, 4)})


# ---- server optimizers (FedOpt) ----
def round_updates(base: dict, r: int, n: int = 3) -> list[dict]:
    """Client updates for round ``r``: the round's starting point plus a small, round-specific step."""
    return [values(100 * (r + 1) + c, 0.1, base) for c in range(n)]


def run_rounds(agg: Aggregator, rounds: range, weights: list[int] = HONEST_WEIGHTS) -> list[dict]:
    """Close ``rounds`` on ``agg``, each client updating from the round's starting point; the aggregates."""
    out = []
    for r in rounds:
        base = agg.latest()[1] or START
        for c, update in enumerate(round_updates(base, r, len(weights))):
            agg.submit(c, r, update, weights[c])
        out.append(agg.result(r))
    return out


def mean_delta(updates: list[dict], base: dict, weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum((u[k].double() - base[k].double()) * (w / total) for u, w in zip(updates, weights)) for k in LAYOUT}


def assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert set(a) == set(b) == set(LAYOUT)
    for k in LAYOUT:
        assert a[k].dtype == torch.float32
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=tol), (k, (a[k].double() - b[k]).abs().max())


def test_momentum_with_no_momentum_and_lr_1_is_plain_fedavg():
    plain = run_rounds(make(), range(3))
    fedavgm = run_rounds(make(settings=AggregationSettings(server_optimizer="momentum", server_lr=1.0,
                                                           server_momentum=0.0)), range(3))
    for r in range(3):
        assert_close(fedavgm[r], plain[r])
    assert l2(plain[2], START) > 0.1  # the rounds did move the adapters


@pytest.mark.parametrize("lr, momentum", [(None, 0.9), (0.7, 0.5)])
def test_fedavgm_follows_the_momentum_recursion(lr, momentum):
    agg = make(settings=AggregationSettings(server_optimizer="momentum", server_lr=lr, server_momentum=momentum))
    step = 1.0 if lr is None else lr  # the default server lr of momentum is 1.0
    x = {k: START[k].double() for k in LAYOUT}
    v = {k: torch.zeros(s, dtype=torch.float64) for k, s in LAYOUT.items()}
    for r in range(3):
        base = agg.latest()[1] or START
        updates = round_updates(base, r)
        for c in (2, 0, 1):
            agg.submit(c, r, updates[c], HONEST_WEIGHTS[c])
        delta = mean_delta(updates, base, HONEST_WEIGHTS)
        for k in LAYOUT:
            v[k] = momentum * v[k] - delta[k]  # v = m v + g, with g = -delta
            x[k] = x[k] - step * v[k]
        assert_close(agg.result(r), x, 1e-5)
        plain = {k: base[k].double() + delta[k] for k in LAYOUT}
        if r > 0:  # from round 1 on, the momentum makes it differ from plain averaging
            assert l2(agg.result(r), plain) > 0.01


@pytest.mark.parametrize("lr, eps", [(None, None), (0.05, 0.02)])
def test_fedadam_first_round_moves_each_coordinate_by_about_lr(lr, eps):
    settings = AggregationSettings(server_optimizer="adam", server_lr=lr)
    if eps is not None:
        settings.server_epsilon = eps
    step, eps = (0.01 if lr is None else lr), (1e-3 if eps is None else eps)  # defaults: lr 0.01, eps 1e-3
    agg = make(settings=settings)
    for c in range(3):
        agg.submit(c, 0, HONEST[c], HONEST_WEIGHTS[c])
    g = {k: -d for k, d in mean_delta(HONEST, START, HONEST_WEIGHTS).items()}
    # bias-corrected: m_hat = g, v_hat = g^2, so x = x - lr * g / (|g| + eps)
    expected = {k: START[k].double() - step * g[k] / (g[k].abs() + eps) for k in LAYOUT}
    assert_close(agg.result(0), expected, 1e-6)


def test_fedadam_matches_torch_adam_over_rounds():
    agg = make(settings=AggregationSettings(server_optimizer="adam", server_lr=0.05, server_betas=[0.8, 0.9],
                                            server_epsilon=1e-2))
    params = [START[k].clone() for k in LAYOUT]
    ref = torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.9), eps=1e-2)
    for r in range(3):
        base = agg.latest()[1] or START
        updates = round_updates(base, r)
        for c in range(3):
            agg.submit(c, r, updates[c], HONEST_WEIGHTS[c])
        delta = mean_delta(updates, base, HONEST_WEIGHTS)
        for p, k in zip(params, LAYOUT):
            p.grad = (-delta[k]).float()
        ref.step()
        assert_close(agg.result(r), dict(zip(LAYOUT, params)), 1e-6)


@pytest.mark.parametrize("settings", [AggregationSettings(strategy="median"), AggregationSettings(norm_bound=0.3)],
                         ids=["median", "norm_bound"])
def test_server_optimizer_steps_with_the_strategys_combined_delta(settings):
    settings.server_optimizer, settings.server_lr, settings.server_momentum = "momentum", 2.0, 0.5
    agg = make(settings=settings)
    x = {k: START[k].double() for k in LAYOUT}
    v = {k: torch.zeros(s, dtype=torch.float64) for k, s in LAYOUT.items()}
    for r in range(2):
        base = agg.latest()[1] or START
        updates = round_updates(base, r)
        for c in range(3):
            agg.submit(c, r, updates[c], HONEST_WEIGHTS[c])
        deltas = [{k: u[k].double() - base[k].double() for k in LAYOUT} for u in updates]
        if settings.strategy == "median":  # 3 clients: the middle value
            delta = {k: torch.stack([d[k] for d in deltas]).median(dim=0).values for k in LAYOUT}
        else:
            norms = [sum(float(t.pow(2).sum()) for t in d.values()) ** 0.5 for d in deltas]
            assert max(norms) > 0.3  # the bound does clip
            deltas = [{k: t * min(1.0, 0.3 / n) for k, t in d.items()} for d, n in zip(deltas, norms)]
            total = float(sum(HONEST_WEIGHTS))
            delta = {k: sum(d[k] * (w / total) for d, w in zip(deltas, HONEST_WEIGHTS)) for k in LAYOUT}
        for k in LAYOUT:
            v[k] = 0.5 * v[k] - delta[k]
            x[k] = x[k] - 2.0 * v[k]
        assert_close(agg.result(r), x, 1e-5)


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_server_optimizer_state_survives_a_checkpoint(kind, tmp_path):
    settings = AggregationSettings(server_optimizer=kind)
    agg = make(settings=settings)
    run_rounds(agg, range(2))
    state = agg.state_dict()
    assert state["round"] == 1 and state["server_optimizer"] == kind and state["server_optim"]["state"]
    ckpt.save(tmp_path / "server.ckpt", state)  # as the trunk server saves it: torch.load(weights_only=True) reads it
    third = run_rounds(agg, range(2, 3))[0]  # the original steps on: the saved state must not change with it
    for resumed_state in (state, ckpt.load(tmp_path / "server.ckpt")):
        resumed = make(settings=AggregationSettings(server_optimizer=kind))
        resumed.load_state_dict(resumed_state)
        assert_same(run_rounds(resumed, range(2, 3))[0], third)
    forgetful = make(settings=AggregationSettings(server_optimizer=kind))  # the aggregate alone is not enough
    forgetful.load_state_dict({"round": 1, "aggregate": state["aggregate"]})
    assert l2(run_rounds(forgetful, range(2, 3))[0], third) > 1e-4


def test_resumed_server_optimizer_takes_its_hyperparameters_from_the_settings():
    agg = make(settings=AggregationSettings(server_optimizer="momentum", server_lr=1.0, server_momentum=0.9))
    run_rounds(agg, range(2))
    resumed = make(settings=AggregationSettings(server_optimizer="momentum", server_lr=0.25, server_momentum=0.5))
    resumed.load_state_dict(agg.state_dict())
    group = resumed.server_optim.param_groups[0]
    assert (group["lr"], group["momentum"]) == (0.25, 0.5)
    assert resumed.server_optim.state_dict()["state"]  # while the momentum buffer is the checkpoint's


def test_state_without_a_server_optimizer_state_starts_it_fresh():
    old = make()  # plain averaging: the state has no server optimizer keys, as before there were any
    run_rounds(old, range(2))
    state = old.state_dict()
    assert set(state) == {"round", "aggregate"}
    settings = AggregationSettings(server_optimizer="momentum", server_lr=0.5)
    agg = make(settings=settings)
    agg.load_state_dict(state)
    assert agg.latest()[0] == 1
    assert agg.submit(0, 1, HONEST[0], 50) is False  # round 1 is closed
    base = state["aggregate"]
    updates = round_updates(base, 2)
    for c in range(3):
        agg.submit(c, 2, updates[c], HONEST_WEIGHTS[c])
    delta = mean_delta(updates, base, HONEST_WEIGHTS)  # a fresh optimizer: the first step is lr * delta
    assert_close(agg.result(2), {k: base[k].double() + 0.5 * delta[k] for k in LAYOUT}, 1e-6)
    other = make(settings=AggregationSettings(server_optimizer="adam"))  # another kind's state: started fresh too
    other.load_state_dict(agg.state_dict())
    assert other.server_optim.state_dict()["state"] == {}
