"""``silotune generate``: read prompts, decode them with a trained split model, write JSON lines.

Prompts come from ``--prompt`` or a ``.jsonl`` file (a JSON string per line, or an object with a
``prompt`` key; errors name the file and line). Results go to stdout or ``--output`` (written
atomically), one ``{"prompt", "text", "tokens"}`` object per prompt; the speed and the wire bytes
per generated token are logged at the end.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_write
from ..config import RunConfig
from ..errors import ConfigError
from . import session as sessions
from .loop import generate_text

log = logging.getLogger(__name__)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a JSONL file: one object with a ``prompt`` string per line (errors name the file and line)."""
    from ..data.records import iter_jsonl

    if not Path(path).is_file():
        raise ConfigError(f"--input {path}: file not found")
    prompts = []
    for line, item in iter_jsonl(path):
        if not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise ConfigError(f"{path} line {line}: expected a non-empty 'prompt' string")
        prompts.append(item["prompt"])
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts

def _run_dir(cfg: RunConfig, run: str | None) -> Path | None:
    if run is not None:
        return Path(run)
    default = Path(cfg.output)
    return default if (default / "adapters").is_dir() else None


def run_generate(cfg: RunConfig, prompts: list[str] | None, input_file: str | None, run: str | None,
                 which: str, server: str | None, client_id: int | None, output: str | None,
                 progress: bool = True) -> int:
    prompts = prompts or read_prompts(input_file)
    if client_id is not None:
        session = sessions.deployed(cfg, client_id, server)
    else:
        session = sessions.simulated(cfg, _run_dir(cfg, run), which)
    try:
        with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress) as bar:
            result = generate_text(session.decoder, session.tok, prompts, cfg.generate, session.max_length,
                                   session.wire, progress=bar.update)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        if session.close is not None:
            session.close()
    lines = [json.dumps({"prompt": p, "text": t, "tokens": len(n)}, ensure_ascii=False)
             for p, t, n in zip(prompts, result.texts, result.tokens)]
    if output:
        atomic_write(Path(output), "\n".join(lines) + "\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")
    s = result.summary()
    log.info("generated %d tokens for %d prompts in %.2f s (%.1f tokens/s, %s wire bytes per token)",
             s["new_tokens"], s["prompts"], s["seconds"], s["tokens_per_second"],
             f"{s['bytes_per_token']:,.0f}" if session.wire is not None else "no")
    return 0
