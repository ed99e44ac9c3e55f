"""Text generation with a split (or whole) model: KV caches on every party, sampling, stop conditions.

``decoders.py``: how one party layout runs a prefill and the decode steps (a whole local model,
the split model with a cache on every party, or the split model recomputing the prefix);
``sampling.py``: the settings (``generate:`` in a config) and the choice of each next token;
``loop.py``: the decoding loop over a batch of prompts, with its stop conditions and measurements.
"""

from .decoders import Decoder, LocalDecoder, RecomputeDecoder, SplitDecoder, split_decoder
from .loop import Generation, generate_ids, generate_text
from .sampling import GenerateSettings, TokenChooser

__all__ = ["Decoder", "LocalDecoder", "RecomputeDecoder", "SplitDecoder", "split_decoder", "Generation", "generate_ids",
           "generate_text", "GenerateSettings", "TokenChooser"]
