"""Run the audit: for each defence, a real federated run with the server tapped, then the attacks.

For one defence, ``audit_defence``:

1. resolves the run configuration (base + audit overrides + the defence's overrides);
2. runs the federation exactly as ``simulate`` does (``simulate.run_federated``), with the
   in-process transport delivering every decoded message through a ``ServerTap`` and the
   victims' batch streams recording which private examples made each recorded step;
3. scores the run's held-out utility (the same evaluation as ``simulate``);
4. mounts each attack on the recordings with only the attacker's knowledge, and scores what
   it got back against the private text.

``run_audit`` does this for every defence, saving results after each one (an interrupted
audit resumes where it stopped), then writes the tables, plot and report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, load_config, to_dict
from ..data.settings import load_configured_task
from ..errors import ConfigError
from ..models.loading import load_tokenizer, resolve_model
from ..models.masks import valid_mask
from ..privacy.accounting import release_epsilon
from ..protocol.codec import wire_dtype
from ..simulate import budget, client_stream, prepare_data, run_federated
from ..train.batching import encode_example, encode_target
from ..transport.inprocess import InProcessTransport
from .embedding_inversion import nearest_rows
from .gradient_inversion import infer_labels, reconstruct_targets
from .knowledge import AttackerKnowledge
from .learned_inversion import train_inverter
from .optimisation_inversion import optimise_invert
from .scoring import FrequencyBaseline, Truth, leakage, merge, private_mask
from .search_inversion import search_invert, token_signatures
from .settings import AuditConfig
from .tap import ServerTap

log = logging.getLogger(__name__)


class RecordingStream:
    """A client's batch stream that remembers which examples made the recorded steps."""

    def __init__(self, stream, client: int, shard: list[int], steps: set[tuple[int, int]]):
        self.stream, self.client, self.shard, self.steps = stream, client, shard, steps
        self.n = 0
        self.batches: dict[int, tuple[dict, list[int]]] = {}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.stream)
        self.n += 1  # a client takes one batch per step, so batch n is step n
        if (self.client, self.n) in self.steps:
            self.batches[self.n] = (batch, [self.shard[j] for j in self.stream.last_indices])
        return batch


def point_steps(steps_per_client: int, points: list[str]) -> dict[str, int]:
    """Client step numbers of the requested training points (start, middle, end)."""
    at = {"start": 1, "middle": max(1, (steps_per_client + 1) // 2), "end": steps_per_client}
    return {p: at[p] for p in points}


def run_config(audit: AuditConfig, overrides: list[str]) -> RunConfig:
    return load_config(audit.base_path, [*audit.set, *overrides], two_part=True)


def truth_of(tok, task, cfg: RunConfig, batch: dict, rows: list[int], sent: torch.Tensor | None = None) -> Truth:
    """The private side of a recorded batch. Leakage counts the private tokens that were sent
    (``sent``: the lengths the server received; a sequence's last token never leaves the client)."""
    add_eos = task.spec.kind == "generation"
    private = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for i, g in enumerate(rows):
        mask = private_mask(tok, task.spec.template, task.train[g], cfg.data.max_length, add_eos)
        private[i, :len(mask)] = torch.tensor(mask)
    if sent is not None:
        private &= valid_mask(sent, private.shape[1])
    return Truth(batch["input_ids"], batch["lengths"], private, [task.train[g].label for g in rows],
                 [encode_target(tok, task.train[g].target, cfg.data.max_length, add_eos) for g in rows])


def auxiliary(cfg: RunConfig, tok, task, n: int) -> tuple[list[list[int]], list]:
    """Public text: examples of the same source that no client holds and no test uses."""
    if cfg.data.max_train is None:
        raise ConfigError("audit: data.max_train must be set so that public auxiliary text disjoint from the "
                          "clients' data remains (e.g. --set data.max_train=2000)")
    full = load_configured_task(cfg.data, cfg.train.seed, all_train=True)
    spare = full.train[len(task.train):][:n]
    if not spare:
        raise ConfigError(f"audit: task {task.spec.name} has no examples beyond data.max_train={cfg.data.max_train} "
                          "to serve as public auxiliary text; lower data.max_train")
    add_eos = task.spec.kind == "generation"
    return [encode_example(tok, e, cfg.data.max_length, add_eos)[0] for e in spare], [e.label for e in spare]


def _stats(values: torch.Tensor) -> dict:
    values = values.float()
    return {"median": float(values.median()), "p10": float(values.quantile(0.1)),
            "p90": float(values.quantile(0.9)), "max": float(values.max())}


def _timed(timings: dict, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.t
    return _T()


def mount_attacks(audit: AuditConfig, cfg: RunConfig, knowledge: AttackerKnowledge, tap: ServerTap,
                  observations: list[tuple[str, object, Truth]], task, progress: bool) -> dict:
    """Every selected attack on every recorded observation; leakage per attack and point."""
    tok, attacks, s = knowledge.tok, audit.attacks, audit.attack
    results: dict[str, dict[str, list[dict]]] = {}
    labels: dict[str, dict[str, list]] = {}
    timings: dict[str, float] = {}
    transform = knowledge.deterministic_part
    head = knowledge.head()

    def score(name, point, truth, guess):
        results.setdefault(name, {}).setdefault(point, []).append(leakage(tok, truth, guess))

    baseline = FrequencyBaseline(knowledge.aux_ids, seed=cfg.train.seed)
    inverter = signatures = None
    if {"learned", "optimisation", "search+learned"} & set(attacks):
        with _timed(timings, "learned"):
            inverter = train_inverter(knowledge, s.learned, head, progress, seed=cfg.train.seed)
    if {"search", "search+learned"} & set(attacks):
        with _timed(timings, "search"):
            signatures = token_signatures(head)
    agg_signatures: dict[int, torch.Tensor] = {}
    bar = tqdm(observations, desc="attacks", disable=not progress, leave=False)
    for point, rec, truth in bar:
        h1, lengths = rec.h1, rec.lengths
        score("baseline: most frequent token", point, truth, baseline.constant(h1.shape[:2]))
        score("baseline: unigram sampling", point, truth, baseline.unigram(h1.shape[:2]))
        round_, aggregate = rec.latest_round, tap.averages.get(rec.latest_round)
        if "embedding" in attacks:
            with _timed(timings, "embedding"):
                score("embedding", point, truth, nearest_rows(knowledge, h1, lengths))
        if "search" in attacks:
            with _timed(timings, "search"):
                score("search (public head)", point, truth,
                      search_invert(head, h1, lengths, s.search.shortlist, signatures, transform))
                if aggregate is not None:
                    agg_head = knowledge.head(aggregate, tag=round_)
                    if round_ not in agg_signatures:
                        agg_signatures = {round_: token_signatures(agg_head)}  # keep one round's index
                    score("search (aggregated head)", point, truth,
                          search_invert(agg_head, h1, lengths, s.search.shortlist, agg_signatures[round_], transform))
        learned_top = learned_logp = None
        if inverter is not None:
            with _timed(timings, "learned"):
                learned_top, learned_logp = inverter.topk(h1, lengths, max(1, s.search.learned_shortlist))
            if "learned" in attacks:
                score("learned", point, truth, learned_top[..., 0])
        if "optimisation" in attacks:
            with _timed(timings, "optimisation"):
                init = learned_top[..., 0] if learned_top is not None else None
                score("optimisation", point, truth, optimise_invert(head, h1, lengths, knowledge.embedding,
                                                                    s.optimisation, init, transform))
        if "search+learned" in attacks:
            with _timed(timings, "search+learned"):
                score("search+learned", point, truth,
                      search_invert(head, h1, lengths, s.search.shortlist, signatures, transform, learned_top,
                                    learned_logp, knowledge.noise_model(h1, lengths)))
        if "gradient" in attacks and rec.grad is not None and rec.h2 is not None:
            with _timed(timings, "gradient"):
                tails = [("public tail", knowledge.tail())]
                if aggregate is not None:
                    tails.append(("aggregated tail", knowledge.tail(aggregate, tag=round_)))
                for label, tail in tails:
                    if task.spec.kind == "classification":
                        choices = [tok(c, add_special_tokens=False).input_ids for c in task.spec.choices]
                        guess, _ = infer_labels(tail, rec.h2, rec.grad, lengths, choices)
                        labels.setdefault(f"gradient label inference ({label})", {}).setdefault(point, []).extend(
                            zip(guess, truth.labels))
                    else:
                        guess = reconstruct_targets(tail, rec.h2, rec.grad, lengths, s.gradient)
                        target_only = dataclasses.replace(truth, private=_target_positions(truth))
                        score(f"gradient target reconstruction ({label})", point, target_only, guess)
    leak = {name: {"overall": merge([x for v in per.values() for x in v]), "points": {p: merge(v) for p, v in per.items()}}
            for name, per in results.items()}
    label_scores = {}
    majority = max(set(knowledge.aux_labels), key=knowledge.aux_labels.count) if knowledge.aux_labels[0] is not None \
        else None
    for name, per in labels.items():
        pairs = [x for v in per.values() for x in v]
        label_scores[name] = {
            "accuracy": sum(int(g == y) for g, y in pairs) / len(pairs), "n": len(pairs),
            "majority_baseline": sum(int(y == majority) for _, y in pairs) / len(pairs),
            "points": {p: sum(int(g == y) for g, y in v) / len(v) for p, v in per.items()}}
    return {"leakage": leak, "labels": label_scores, "attack_seconds": timings}


def _target_positions(truth: Truth) -> torch.Tensor:
    mask = torch.zeros_like(truth.private)
    for i, target in enumerate(truth.targets):
        end = int(truth.lengths[i])
        mask[i, end - len(target):end] = True
    return mask


def audit_defence(audit: AuditConfig, name: str, overrides: list[str], progress: bool = True) -> dict:
    """One defence: a tapped federated run, its utility, and every attack's leakage."""
    cfg = run_config(audit, overrides)
    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    task, rows, parts = prepare_data(cfg, tok)
    aux_ids, aux_labels = auxiliary(cfg, tok, task, audit.aux_examples)
    plan = budget(cfg)
    at = point_steps(plan["steps_per_client"], audit.points)
    victims = list(range(min(audit.victims, cfg.federation.clients)))
    steps = {(c, s) for c in victims for s in at.values()}
    taps: list[ServerTap] = []

    def connect(server):
        if not taps:
            taps.append(ServerTap(server, steps))
        return InProcessTransport(taps[0], wire_dtype(cfg.federation.wire_dtype))

    streams = [RecordingStream(client_stream(cfg, tok, rows, idx, k), k, idx, steps) for k, idx in enumerate(parts)]
    fed = run_federated(cfg, model_dir, tok, task, rows, parts, plan, progress, connect, streams)
    tap = taps[0]
    observations = []
    for point, step in at.items():
        for c in victims:
            batch, idx = streams[c].batches[step]
            rec = tap.records[(c, step)]
            observations.append((point, rec, truth_of(tok, task, cfg, batch, idx, rec.lengths)))
    knowledge = AttackerKnowledge(model_dir, cfg, tok, aux_ids, aux_labels)
    attacked = mount_attacks(audit, cfg, knowledge, tap, observations, task, progress)
    records = [r for _, r, _ in observations]
    valid = [valid_mask(r.lengths, r.h1.shape[1]) for r in records]
    h1_norms = torch.cat([r.h1.norm(dim=-1)[v] for r, v in zip(records, valid)])
    grad_norms = torch.cat([r.grad.flatten(1).norm(dim=-1) for r in records if r.grad is not None])
    uses = max(math.ceil(plan["steps_per_client"] * cfg.train.batch_size / len(p)) for p in parts)
    eps = release_epsilon(cfg.privacy, tok_hidden(knowledge), cfg.data.max_length, uses)
    return {"name": name, "overrides": overrides, "config": to_dict(cfg), "plan": plan, "points": at,
            "victims": victims, "utility": fed["metrics"], "train_seconds": fed["train_seconds"],
            "curve": fed["curve"], "received": {"h1_token_norm": _stats(h1_norms),
                                                "grad_sample_norm": _stats(grad_norms)},
            "epsilon": eps, "aux_examples": len(aux_ids), **attacked}


def tok_hidden(knowledge: AttackerKnowledge) -> int:
    return int(knowledge.embedding.shape[1])


def defence_key(audit: AuditConfig, overrides: list[str]) -> dict:
    """What a stored result depends on: the resolved run config and the attack settings."""
    return {"config": to_dict(run_config(audit, overrides)), "attacks": list(audit.attacks),
            "attack": dataclasses.asdict(audit.attack), "points": list(audit.points), "victims": audit.victims,
            "aux_examples": audit.aux_examples}

def audit_seconds(results: list[dict]) -> float:
    """Wall time of the listed defences, each as long as its own run took (resumed ones included)."""
    return sum(r.get("seconds", r["train_seconds"] + sum(r["attack_seconds"].values())) for r in results)


def run_audit(audit: AuditConfig, out: Path, command: str, progress: bool = True, fresh: bool = False) -> dict:
    """Audit every defence (resuming from ``out/audit.json`` unless ``fresh``) and write the outputs."""
    from .report import write_audit

    stored = {}
    path = out / "audit.json"
    if path.is_file() and not fresh:
        try:
            previous = json.loads(path.read_text())
            stored = {r["name"]: r for r in previous["results"]}
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; starting the audit afresh", path)
    results = []
    names = list(audit.defences)
    for i, name in enumerate(names):
        overrides = audit.defences[name]
        key = defence_key(audit, overrides)
        if name in stored and stored[name].get("key") == key:
            log.info("defence %s: reusing the stored result", name)
            results.append(stored[name])
            continue
        if progress:
            tqdm.write(f"[{i + 1}/{len(names)}] defence {name}: {' '.join(overrides) or 'none'}")
        began = time.perf_counter()
        result = audit_defence(audit, name, overrides, progress)
        result["key"] = key
        result["seconds"] = time.perf_counter() - began
        results.append(result)
        write_audit(results, audit, out, command, audit_seconds(results))  # keep what is done
    rec = write_audit(results, audit, out, command, audit_seconds(results))
    return {"results": results, "recommendation": rec}
