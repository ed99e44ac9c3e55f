"""The privacy audit: the tap, every attack, the defences as the server sees them, and the CLI."""

import json

import pytest
import torch
import yaml

from silotune.audit import peer_attack
from silotune.audit.embedding_inversion import nearest_rows
from silotune.audit.gradient_inversion import GradientSettings, infer_labels, reconstruct_targets
from silotune.audit.knowledge import AttackerKnowledge
from silotune.audit.learned_inversion import LearnedSettings, train_inverter
from silotune.audit.optimisation_inversion import OptimisationSettings, optimise_invert
from silotune.audit.runner import audit_defence, auxiliary, run_config
from silotune.audit.scoring import FrequencyBaseline, leakage, private_mask
from silotune.audit.search_inversion import search_invert
from silotune.audit.settings import load_audit
from silotune.audit.tap import ServerTap
from silotune.cli import main
from silotune.crypto import AeadSession, ClientHandshake, Identity, server_accept
from silotune.data import load_task
from silotune.models.loading import load_tokenizer
from silotune.models.partition import load_stage
from silotune.protocol.messages import ForwardActivations, Gradients
from silotune.simulate import prepare_data, run
from silotune.train.batching import collate, drop_last_token, encode_example, prompt_batch
from silotune.train.loss import lm_loss
from silotune.transport.inprocess import InProcessTransport

BASE = {"split": {"head_blocks": 1, "tail_blocks": 1}, "adapters": {"lora": {"r": 4}},
        "data": {"max_train": 48, "max_test": 8, "max_length": 48},
        "train": {"steps": 8, "batch_size": 4, "eval_batch_size": 16},
        "federation": {"clients": 2, "local_steps": 2}, "optim": {"lr": 5.0e-3}, "centralized": False}
FAST_ATTACKS = {"learned": {"steps": 150, "width": 64, "heads": 2, "batch_size": 16, "negatives": 512},
                "optimisation": {"steps": 40}, "search": {"shortlist": 16, "learned_shortlist": 8}}


def audit_file(tmp_path, model_dir, defences=None, base_extra=None, **extra):
    base = json.loads(json.dumps(BASE))
    base["model"] = str(model_dir)
    for key, value in (base_extra or {}).items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.update({key: value})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    audit = {"base": "base.yaml", "aux_examples": 160, "attack": FAST_ATTACKS,
             "defences": defences or {"none": []}, "output": str(tmp_path / "out"), **extra}
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(audit, sort_keys=False))
    return tmp_path / "audit.yaml"


def session(client_id, server, ident):
    hs = ClientHandshake(client_id, ident, server.public)
    _, keys = server_accept(hs.hello, server, {client_id: ident.public})
    return AeadSession(keys, "client"), AeadSession(keys, "server")


def test_peer_inverts_plaintext_but_not_encrypted_activations(tiny_chat_dir):
    tok = load_tokenizer(tiny_chat_dir)
    head = load_stage(tiny_chat_dir, "head", 1, 1)  # the peer's copy equals the victim's after FedAvg
    batch = prompt_batch(tok, ["Review: a warm, funny and moving film\nSentiment:",
                               "Review: dull\nSentiment:"], 64)
    plain = peer_attack(head, batch, None, None)
    assert plain["readable"] and plain["rate"] > 0.5
    server = Identity.generate()
    victim, _ = session(0, server, Identity.generate())
    _, peer_view = session(1, server, Identity.generate())
    sealed = peer_attack(head, batch, victim, peer_view)
    assert not sealed["readable"] and sealed["recovered"] == 0


# ---- the tap ----

class Spy:
    """The real trunk server, with a note of every message object it was handed."""

    def __init__(self, server):
        self.server, self.seen = server, []

    def handle(self, msg):
        self.seen.append(msg)
        reply = self.server.handle(msg)
        self.seen.append(reply)
        return reply


def one_tapped_step(model_dir, privacy=(), wire="bf16"):
    from silotune.federation import build_parties

    cfg = run_config(load_audit_stub(model_dir), [f"federation.wire_dtype={wire}", *privacy])
    tok = load_tokenizer(model_dir)
    task, rows, parts = prepare_data(cfg, tok)
    taps, spies = [], []

    def connect(server):
        if not taps:
            spies.append(Spy(server))
            taps.append(ServerTap(spies[0], {(0, 1)}))
        from silotune.protocol.codec import wire_dtype
        return InProcessTransport(taps[0], wire_dtype(cfg.federation.wire_dtype))

    from silotune.protocol.codec import wire_dtype
    _, clients = build_parties(model_dir, cfg.split, cfg.adapters, cfg.optim, 2, 0,
                               wire_dtype(cfg.federation.wire_dtype), cfg.privacy, connect)
    batch = collate([rows[i] for i in parts[0][:4]], tok.pad_token_id)
    with torch.no_grad():
        sent = drop_last_token(batch)
        before = clients[0].head(sent["input_ids"], sent["lengths"])  # the head's output, before its update
    clients[0].train_step(batch)
    return taps[0], spies[0], before, batch


_STUBS = {}


def load_audit_stub(model_dir):
    import tempfile
    from pathlib import Path

    if model_dir not in _STUBS:
        _STUBS[model_dir] = load_audit(audit_file(Path(tempfile.mkdtemp()), model_dir))
    return _STUBS[model_dir]


def test_tap_records_exactly_what_the_server_decoded(tiny_chat_dir):
    tap, spy, sent, batch = one_tapped_step(tiny_chat_dir, wire="bf16")
    rec = tap.records[(0, 1)]
    fwd = next(m for m in spy.seen if isinstance(m, ForwardActivations))
    grads = [m for m in spy.seen if isinstance(m, Gradients)]
    assert torch.equal(rec.h1, fwd.hidden) and torch.equal(rec.lengths, fwd.lengths)
    assert torch.equal(rec.grad, grads[0].grad)  # dL/dh2 as the server received it
    assert torch.equal(rec.h2, spy.seen[spy.seen.index(fwd) + 1].hidden)
    assert torch.equal(rec.h1, sent.bfloat16().float())  # the decoded wire value, not the client's fp32
    assert not torch.equal(rec.h1, sent)
    assert torch.equal(rec.lengths, batch["lengths"] - 1)  # the last token (here the label word) is never sent


@pytest.mark.parametrize("privacy,field", [
    (["privacy.h1_noise=0.5"], "h1"), (["privacy.h1_clip=0.05"], "h1"),
    (["privacy.grad_clip=1e-4"], "grad"), (["privacy.grad_clip=1.0", "privacy.grad_noise=1.0"], "grad")])
def test_each_defence_changes_what_the_server_records(tiny_chat_dir, privacy, field):
    clean, *_ = one_tapped_step(tiny_chat_dir, wire="fp32")
    defended, _, _, batch = one_tapped_step(tiny_chat_dir, privacy, wire="fp32")
    a, b = getattr(clean.records[(0, 1)], field), getattr(defended.records[(0, 1)], field)
    assert a.shape == b.shape and not torch.allclose(a, b)
    other = "grad" if field == "h1" else "h1"
    if field == "grad":  # the forward pass is untouched by a gradient defence
        assert torch.equal(getattr(clean.records[(0, 1)], other), getattr(defended.records[(0, 1)], other))
    if "privacy.h1_clip=0.05" in privacy:
        assert float(b.norm(dim=-1).max()) <= 0.05 + 1e-6
    if privacy == ["privacy.grad_clip=1e-4"]:
        assert float(b.flatten(1).norm(dim=1).max()) <= 1e-4 * (1 + 1e-5)


def test_the_audit_trains_exactly_like_simulate(tiny_chat_dir, tmp_path):
    audit = load_audit(audit_file(tmp_path, tiny_chat_dir))
    result = audit_defence(audit, "none", [], progress=False)
    cfg = run_config(audit, [])
    cfg.output = str(tmp_path / "sim")
    plain = run(cfg, progress=False)
    assert result["curve"] == plain["federated"]["curve"]  # the tap and the recorders change nothing
    assert result["utility"] == plain["federated"]["metrics"]
    assert set(result["points"]) == {"start", "middle", "end"}


# ---- the attacks, each on an undefended tiny model ----

@pytest.fixture(scope="module")
def victim(tiny_chat_dir):
    """Private training rows of a tiny a=1 split, the attacker's knowledge, and what the server sees."""
    import tempfile
    from pathlib import Path

    audit = load_audit(audit_file(Path(tempfile.mkdtemp()), tiny_chat_dir))
    cfg = run_config(audit, [])
    tok = load_tokenizer(tiny_chat_dir)
    task, rows, parts = prepare_data(cfg, tok)
    aux_ids, aux_labels = auxiliary(cfg, tok, task, 160)
    knowledge = AttackerKnowledge(tiny_chat_dir, cfg, tok, aux_ids, aux_labels)
    batch = collate([rows[i] for i in range(8)], tok.pad_token_id)
    from silotune.audit.runner import truth_of
    truth = truth_of(tok, task, cfg, batch, list(range(8)))
    with torch.no_grad():
        h1 = knowledge.head()(batch["input_ids"], batch["lengths"])
    return {"cfg": cfg, "tok": tok, "task": task, "knowledge": knowledge, "batch": batch, "truth": truth, "h1": h1}


def test_frequency_baselines_recover_little(victim):
    base = FrequencyBaseline(victim["knowledge"].aux_ids)
    shape = victim["h1"].shape[:2]
    for guess in (base.constant(shape), base.unigram(shape)):
        assert leakage(victim["tok"], victim["truth"], guess)["token_accuracy"] < 0.15


def test_search_inversion_recovers_the_tokens(victim):
    k = victim["knowledge"]
    guess = search_invert(k.head(), victim["h1"], victim["batch"]["lengths"], 16)
    assert leakage(victim["tok"], victim["truth"], guess)["token_accuracy"] > 0.9


def test_learned_inversion_beats_the_frequency_baseline(victim):
    k = victim["knowledge"]
    model = train_inverter(k, LearnedSettings(**FAST_ATTACKS["learned"]), k.head())
    guess = model.topk(victim["h1"], victim["batch"]["lengths"], 1)[0][..., 0]
    learned = leakage(victim["tok"], victim["truth"], guess)
    base = leakage(victim["tok"], victim["truth"], FrequencyBaseline(k.aux_ids).constant(guess.shape))
    assert learned["token_accuracy"] > base["token_accuracy"] + 0.2
    seeded = search_invert(k.head(), victim["h1"], victim["batch"]["lengths"], 1, None, None,
                           model.topk(victim["h1"], victim["batch"]["lengths"], 8)[0])
    assert leakage(victim["tok"], victim["truth"], seeded)["token_accuracy"] >= learned["token_accuracy"]


def test_optimisation_inversion_recovers_tokens(victim):
    k = victim["knowledge"]
    guess = optimise_invert(k.head(), victim["h1"], victim["batch"]["lengths"], k.embedding,
                            OptimisationSettings(steps=100, lr=0.05))
    assert leakage(victim["tok"], victim["truth"], guess)["token_accuracy"] > 0.5


def client_gradient(knowledge, batch):
    """(h2, dL/dh2, sent lengths) exactly as an untrained client computes them (the start of training)."""
    cfg = knowledge.cfg
    sent = drop_last_token(batch)
    trunk = load_stage(knowledge.model_dir, "trunk", cfg.split.head_blocks, cfg.split.tail_blocks)
    with torch.no_grad():
        h2 = trunk(knowledge.head()(sent["input_ids"], sent["lengths"]), sent["lengths"])
    x = h2.requires_grad_(True)
    (grad,) = torch.autograd.grad(lm_loss(knowledge.tail()(x, sent["lengths"]), batch["labels"]), x)
    return x.detach(), grad, sent["lengths"]


def test_gradient_label_inference_recovers_every_label(victim):
    k, tok, task = victim["knowledge"], victim["tok"], victim["task"]
    h2, grad, lengths = client_gradient(k, victim["batch"])
    choices = [tok(c, add_special_tokens=False).input_ids for c in task.spec.choices]
    guess, _ = infer_labels(k.tail(), h2, grad, lengths, choices)
    assert guess == victim["truth"].labels


def test_gradient_target_reconstruction_recovers_summaries(victim, tmp_path):
    tok, k = victim["tok"], victim["knowledge"]
    task = load_task("xsum", max_train=8, max_test=2)
    rows = [encode_example(tok, e, 64, add_eos=True) for e in task.train[:4]]
    batch = collate(rows, tok.pad_token_id)
    h2, grad, lengths = client_gradient(k, batch)
    guess = reconstruct_targets(k.tail(), h2, grad, lengths, GradientSettings())
    hits = total = 0
    for i, (ids, labels) in enumerate(rows):
        where = [t for t, y in enumerate(labels) if y != -100]
        hits += sum(int(guess[i, t]) == ids[t] for t in where)
        total += len(where)
    assert hits / total > 0.8


def test_private_mask_covers_the_record_and_target_not_the_template(victim):
    tok, task = victim["tok"], victim["task"]
    e = task.train[0]
    ids, _ = encode_example(tok, e, 48)
    mask = private_mask(tok, task.spec.template, e, 48)
    assert len(mask) == len(ids)
    public = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert public.replace("\n", " ").split() == ["Review:", "Sentiment:"]
    assert tok.decode([t for t, m in zip(ids, mask) if m]).strip().endswith(e.target.strip())


# ---- whole audits ----

def test_two_part_split_gives_every_token_away(tiny_chat_dir, tmp_path):
    audit = load_audit(audit_file(tmp_path, tiny_chat_dir, attacks=["embedding"], points=["start"]))
    result = audit_defence(audit, "a0", ["split.head_blocks=0"], progress=False)
    assert result["leakage"]["embedding"]["overall"]["token_accuracy"] >= 0.95
    assert result["config"]["split"]["head_blocks"] == 0


def test_nearest_rows_sees_through_noise_only_at_a0(victim):
    k, batch = victim["knowledge"], victim["batch"]
    emb = k.head().embed(batch["input_ids"]).detach()
    assert leakage(victim["tok"], victim["truth"], nearest_rows(k, emb, batch["lengths"]))["token_accuracy"] == 1.0


def test_cli_audit_writes_tables_plot_report_and_resumes(tiny_chat_dir, tmp_path, capsys):
    path = audit_file(tmp_path, tiny_chat_dir, defences={"none": [], "noisy": ["privacy.h1_noise=2.0"]},
                      points=["start", "end"])
    out = tmp_path / "out"
    assert main(["audit", "--config", str(path), "--no-progress", "--attacks", "search,gradient"]) == 0
    for name in ("audit.json", "leakage.md", "utility.md", "leakage_vs_accuracy.png", "report.md"):
        assert (out / name).is_file()
    report = (out / "report.md").read_text()
    assert "Recommendation" in report and "do **not**" in report
    stored = json.loads((out / "audit.json").read_text())
    assert [r["name"] for r in stored["results"]] == ["none", "noisy"]
    none, noisy = stored["results"]
    assert "search (public head)" in none["leakage"] and "gradient label inference (public tail)" in none["labels"]
    assert none["leakage"]["search (public head)"]["overall"]["token_accuracy"] > 0.9
    assert noisy["leakage"]["search (public head)"]["overall"]["token_accuracy"] < \
        none["leakage"]["search (public head)"]["overall"]["token_accuracy"]
    capsys.readouterr()
    assert main(["audit", "--config", str(path), "--no-progress", "--attacks", "search,gradient"]) == 0
    again = json.loads((out / "audit.json").read_text())
    assert again["results"][0]["curve"] == none["curve"]  # reused, not rerun
    assert main(["audit", "--config", str(path), "--defences", "nope"]) == 2
    assert "unknown defence 'nope'" in capsys.readouterr().err


def test_audit_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    text = capsys.readouterr().out
    for option in ("--config", "--set", "--run-set", "--defences", "--attacks", "--points", "--victims", "--out",
                   "--fresh", "--list", "--no-progress"):
        assert option in text


def test_audit_needs_public_text_disjoint_from_the_clients(tiny_chat_dir, tmp_path):
    path = audit_file(tmp_path, tiny_chat_dir, base_extra={"data": {"max_train": None}})
    assert main(["audit", "--config", str(path), "--no-progress"]) == 2


def _result(name, acc, rouge, labels=None, a=2):
    return {"name": name, "config": {"split": {"head_blocks": a}}, "utility": {"accuracy": acc},
            "leakage": {"search": {"overall": {"rougeL_f1": rouge}}},
            "labels": {"gradient": {"accuracy": labels}} if labels is not None else {},
            "train_seconds": 10.0, "attack_seconds": {"search": 5.0}}


def test_recommendation_follows_the_measured_curve():
    from silotune.audit.report import recommend
    from silotune.audit.settings import AuditConfig

    audit = AuditConfig(target_rougeL=0.2, max_accuracy_drop=1.5)
    results = [_result("none", 0.80, 1.0, 1.0), _result("a=0", 0.81, 0.0, 0.5, a=0),
               _result("strong", 0.70, 0.1, 0.5), _result("ok", 0.79, 0.15, 1.0), _result("better", 0.795, 0.18, 1.0)]
    assert recommend(results, audit) == {**recommend(results, audit), "name": "better", "met": True}
    # nothing meets the target within the budget: the least leaky within it (text, then labels)
    results = [_result("none", 0.80, 1.0, 1.0), _result("strong", 0.70, 0.1, 0.5),
               _result("labels", 0.79, 1.0, 0.6), _result("cheap", 0.80, 1.0, 1.0)]
    rec = recommend(results, audit)
    assert (rec["name"], rec["met"]) == ("labels", False)
    results[2]["utility"]["accuracy"] = 0.78  # 2 points down: out of the budget
    assert recommend(results, audit)["name"] in ("none", "cheap")


def test_audit_time_adds_up_the_listed_defences_including_resumed_ones():
    from silotune.audit.runner import audit_seconds

    timed = {**_result("a", 0.8, 1.0), "seconds": 100.0}
    assert audit_seconds([timed, _result("b", 0.8, 1.0)]) == 100.0 + 15.0


def test_label_leakage_is_what_inference_gains_over_the_majority_guess():
    from silotune.audit.report import label_leak

    r = _result("x", 0.8, 1.0, 0.55)
    r["labels"]["gradient"]["majority_baseline"] = 0.7
    assert label_leak(r) == 0.0
    r["labels"]["other"] = {"accuracy": 0.9, "majority_baseline": 0.8}
    assert label_leak(r) == pytest.approx(0.1)
