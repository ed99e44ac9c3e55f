"""Split generation with KV caches on every party equals the unsplit model's ``generate``; the server's
caches are bounded, checked and released.

The reference is transformers' own ``generate`` on the unsplit model carrying the same LoRA weights
(greedy, one prompt at a time so that no padding scheme is involved), never tokens from a run.
"""

import threading

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM

from silotune.adapters import AdapterSettings, LoraSettings
from silotune.errors import ProtocolError
from silotune.federation import SplitSettings, build_parties
from silotune.generation import GenerateSettings, LocalDecoder, RecomputeDecoder, SplitDecoder, generate_ids
from silotune.generation.loop import generate_text
from silotune.models.arch import arch_for
from silotune.models.partition import stage_from_model
from silotune.protocol.messages import Control, ForwardActivations
from silotune.server.boundary import Limits
from silotune.train.optim import OptimSettings

from .conftest import ARCHS, FAMILIES

NEW = 12


def parties(model_dir, n_clients=1, a=1, c=1, limits=None):
    """Split parties with non-trivial LoRA (random B) and the unsplit HF model carrying the same weights."""
    adapters = AdapterSettings(method="lora", lora=LoraSettings(r=4, alpha=8))
    server, clients = build_parties(model_dir, SplitSettings(a, c), adapters, OptimSettings(lr=0.0), n_clients,
                                    seed=3, limits=limits)
    named = {}
    for stage in (clients[0].head, server.trunk, clients[0].tail):
        for name, p in stage.named_parameters():
            if "lora_B" in name:
                g = torch.Generator().manual_seed(hash(stage.full_name(name)) % 2**31)
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if p.requires_grad:
                named[stage.full_name(name)] = p
    for other in clients[1:]:
        for mine, theirs in ((clients[0].head, other.head), (clients[0].tail, other.tail)):
            theirs.load_state_dict(mine.state_dict())
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # the family's own attention
    spec = arch_for(ref.config)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.lora_targets),
                                       fan_in_fan_out=spec.fan_in_fan_out), ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(named[name])
    return server, clients, ref.eval()


def prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5])
    ids = torch.randint(3, vocab, (3, 7), generator=g)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    return ids, lengths


def hf_greedy(ref, ids, lengths, new=NEW, eos=None):
    """transformers' generate, one prompt at a time: the new tokens of each."""
    out = []
    for i, n in enumerate(lengths):
        prompt = ids[i : i + 1, : int(n)]
        gen = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=eos, min_new_tokens=0)
        out.append(gen[0, int(n):].tolist())
    return out


@pytest.mark.parametrize("arch", ARCHS + list(FAMILIES))
def test_cached_split_generation_equals_unsplit_greedy(tiny_dirs, family_dirs, arch):
    """Prompts of 7, 3 and 5 tokens and 12 new ones: past every sliding window of the tiny families (4)."""
    server, (client,), ref = parties({**tiny_dirs, **family_dirs}[arch], a=2, c=1)
    ids, lengths = prompts(ref.config.vocab_size)
    want = hf_greedy(ref, ids, lengths)
    got = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=NEW),
                       wire=client.transport.stats)
    assert got.tokens == want
    # without caches (the whole sequence re-run every step) the tokens are the same, the bytes many more
    slow = generate_ids(RecomputeDecoder(client.logits), ids, lengths, GenerateSettings(max_new_tokens=NEW),
                        wire=client.transport.stats)
    assert slow.tokens == want
    assert slow.bytes_up > 3 * got.bytes_up
    assert server.caches.entries == {}  # the request's trunk cache is released at its end


def test_decode_step_sends_one_vector_per_sequence(tiny_dirs):
    server, (client,), ref = parties(tiny_dirs["llama"])
    ids, lengths = prompts(ref.config.vocab_size)
    seen = []
    handle = server.handle

    def spy(msg):
        if isinstance(msg, ForwardActivations):
            seen.append((tuple(msg.hidden.shape), msg.past))
        return handle(msg)

    server.handle = spy
    generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=4))
    hidden = ref.config.hidden_size
    assert seen[0] == ((3, 7, hidden), 0)  # the prompts' activations, once
    assert seen[1:] == [((3, 1, hidden), 7 + k) for k in range(3)]  # then one vector per sequence and step


def test_eos_and_stop_conditions(tiny_dirs):
    server, (client,), ref = parties(tiny_dirs["llama"])
    ids, lengths = prompts(ref.config.vocab_size)
    free = hf_greedy(ref, ids, lengths)
    eos = free[0][3]  # a token the first prompt produces at step 4
    want = hf_greedy(ref, ids, lengths, eos=eos)
    got = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=NEW), eos_ids={eos})
    assert got.tokens == want and got.tokens[0][-1] == eos and len(got.tokens[0]) <= 4
    short = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=3))
    assert [len(t) for t in short.tokens] == [3, 3, 3] and short.tokens == [t[:3] for t in free]


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny_dirs):
    server, (client,), ref = parties(tiny_dirs["llama"])
    ids, lengths = prompts(ref.config.vocab_size)
    greedy = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=8)).tokens
    sample = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95)
    a = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(**sample, seed=1)).tokens
    b = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(**sample, seed=1)).tokens
    c = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(**sample, seed=2)).tokens
    assert a == b and a != c and a != greedy
    k1 = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=8, do_sample=True,
                                                                           top_k=1, seed=5)).tokens
    assert k1 == greedy


def test_local_decoder_equals_split(tiny_dirs):
    server, (client,), ref = parties(tiny_dirs["gpt2"])
    ids, lengths = prompts(ref.config.vocab_size)
    local = generate_ids(LocalDecoder(stage_from_model(ref, "full")), ids, lengths, GenerateSettings(max_new_tokens=NEW))
    split = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=NEW))
    assert local.tokens == split.tokens == hf_greedy(ref, ids, lengths)


def test_clients_generate_at_once_against_one_server(tiny_dirs):
    server, clients, ref = parties(tiny_dirs["llama"], n_clients=3)
    ids, lengths = prompts(ref.config.vocab_size)
    want = hf_greedy(ref, ids, lengths)
    results, errors = {}, []

    def run(client):
        try:
            for _ in range(2):
                results.setdefault(client.id, []).append(
                    generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=NEW)).tokens)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == [want, want] for r in results.values()) and len(results) == 3
    assert server.caches.entries == {}


def forward(client, cache, past, rows=2, tokens=3, train=False):
    h = torch.randn(rows, tokens, client.head.config.hidden_size)
    return ForwardActivations(client.id, client.step, hidden=h, lengths=torch.full((rows,), tokens), train=train,
                              cache=cache, past=past)


def test_server_caches_are_checked_bounded_and_released(tiny_dirs):
    def limits(config):
        return Limits(max_batch=4, max_length=16, hidden=config.hidden_size, max_generations=2,
                      cache_bytes=10 << 20, cache_idle_seconds=60.0)

    server, (client,), ref = parties(tiny_dirs["llama"], limits=limits)
    now = [0.0]
    server.caches.clock = lambda: now[0]
    handle, rejected = server.handle, server.boundary.rejected
    handle(forward(client, 7, 0))
    with pytest.raises(ProtocolError, match="continues 5 slots"):
        handle(forward(client, 7, 5))  # not where the cache is: refused, and the cache dropped
    with pytest.raises(ProtocolError, match="no such generation cache"):
        handle(forward(client, 7, 3))
    with pytest.raises(ProtocolError, match="boundary.max_length"):
        handle(forward(client, 8, 0, tokens=17))
    handle(forward(client, 1, 0))
    handle(forward(client, 2, 0))
    with pytest.raises(ProtocolError, match="max_generations"):
        handle(forward(client, 3, 0))
    with pytest.raises(ProtocolError, match="training forward"):
        handle(forward(client, 4, 0, train=True))
    with pytest.raises(ProtocolError, match="past > 0"):
        handle(forward(client, 0, 3))
    with pytest.raises(ProtocolError, match="boundary.max_length"):
        handle(forward(client, 1, 3, tokens=14))  # 3 cached + 14 new > 16
    assert rejected["cache"] == 2 and rejected["cache_limit"] == 1 and rejected["limit"] == 2
    handle(Control(client.id, 0, command="release", payload={"cache": 2}))
    assert set(server.caches.entries) == {(0, 1)} or set(server.caches.entries) == set()
    now[0] = 61.0  # idle past the limit: gone at the next request
    handle(forward(client, 5, 0))
    assert set(server.caches.entries) == {(0, 5)}
    handle(Control(client.id, 0, command="bye"))
    assert server.caches.entries == {}
    # the refusals harmed nothing: an honest request still equals the unsplit model
    ids, lengths = prompts(ref.config.vocab_size)
    got = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=4))
    assert got.tokens == hf_greedy(ref, ids, lengths, new=4)


def test_cache_memory_budget(tiny_dirs):
    def limits(config):
        return Limits(max_batch=64, max_length=256, hidden=config.hidden_size, max_generations=4,
                      cache_bytes=100_000, cache_idle_seconds=60.0)

    server, (client,), _ = parties(tiny_dirs["llama"], limits=limits)
    per_token = server.caches.bytes_per_slot  # 3 trunk blocks x keys and values x kv heads x head_dim x fp32
    assert per_token == 3 * 2 * 2 * 8 * 4
    tokens = 100_000 // per_token // 2 - 3  # one cache of 2 rows that nearly fills the budget
    server.handle(forward(client, 1, 0, rows=2, tokens=tokens))
    assert server.caches.reserved == 2 * tokens * per_token
    with pytest.raises(ProtocolError, match="boundary.cache_mb"):
        server.handle(forward(client, 2, 0, rows=2, tokens=4))
    with pytest.raises(ProtocolError, match="boundary.cache_mb"):
        server.handle(forward(client, 1, tokens, rows=2, tokens=4))  # growing past the budget: refused, dropped
    assert server.boundary.rejected["cache_memory"] == 2 and server.caches.entries == {}
    server.handle(forward(client, 2, 0, rows=2, tokens=4))


def test_generate_text_cuts_prompts_and_stops_at_strings(tiny_chat_dir):
    from silotune.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_chat_dir)
    server, (client,), ref = parties(tiny_chat_dir)
    texts = ["The quick brown fox " * 20, "Hello"]
    free = generate_text(SplitDecoder(client), tok, texts, GenerateSettings(max_new_tokens=10), max_length=32)
    assert len(free.texts) == 2 and free.new_tokens == 20
    stop = free.texts[0][2:5]
    cut = generate_text(SplitDecoder(client), tok, texts, GenerateSettings(max_new_tokens=10, stop=[stop]),
                        max_length=32)
    assert stop not in cut.texts[0] and free.texts[0].startswith(cut.texts[0])
    with pytest.raises(ValueError, match="leaves no room"):
        generate_text(SplitDecoder(client), tok, texts, GenerateSettings(max_new_tokens=40), max_length=32)


@pytest.mark.slow
def test_smollm2_split_generation_equals_unsplit(smollm2_dir):
    from silotune.models.loading import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    server, (client,), ref = parties(smollm2_dir, a=2, c=2)
    enc = [tok(p).input_ids for p in ("The capital of France is", "Once upon a time, there")]
    lengths = torch.tensor([len(e) for e in enc])
    ids = torch.full((2, int(lengths.max())), tok.pad_token_id)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
    got = generate_ids(SplitDecoder(client), ids, lengths, GenerateSettings(max_new_tokens=10))
    assert got.tokens == hf_greedy(ref, ids, lengths, new=10)


def test_cli_generates_with_the_runs_adapters_as_the_exported_model_does(tiny_chat_dir, tmp_path, capsys):
    """``silotune generate`` (split, caches, a run folder's trained adapters) writes the tokens that transformers'
    generate gives on the same run exported as a merged model: the adapters were loaded into every party."""
    import json

    import yaml

    from silotune.cli import main
    from silotune.config import to_dict
    from silotune.models.loading import load_tokenizer

    from .test_export import run_config, split_run, write_run

    cfg = run_config(tiny_chat_dir, "lora")
    server, client, _, _ = split_run(cfg)
    run = write_run(tmp_path, cfg, server, client)
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump({**to_dict(cfg), "output": str(tmp_path / "none")}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The quick brown fox"}\n\n{"prompt": "Hello there", "id": 7}\n')
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--config", str(config), "--run", str(run), "--input", str(prompts), "--output", str(out),
            "--max-new-tokens", "6", "--no-progress", "--set", "generate.stop_at_eos=false"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The quick brown fox", "Hello there"] and all(r["tokens"] == 6 for r in rows)
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tok = load_tokenizer(tiny_chat_dir)
    for row in rows:
        ids = torch.tensor([tok(row["prompt"]).input_ids])
        gen = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert row["text"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
    capsys.readouterr()
    for bad, expected in [(["--input", str(tmp_path / "nope.jsonl")], "file not found"),
                          (["--prompt", "x", "--server", "127.0.0.1:1"], "--server needs --id")]:
        assert main(["generate", "--config", str(config), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0]
    prompts.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    assert main(["generate", "--config", str(config), "--input", str(prompts)]) == 2
    assert f"{prompts} line 2" in capsys.readouterr().err
