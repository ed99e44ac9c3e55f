"""The privacy audit: what a curious trunk server (or a peer client) can rebuild from what it sees.

``tap`` records what the server decodes during a real run; ``knowledge`` is what the
attacker knows; one module per attack (``embedding_inversion``, ``search_inversion``,
``learned_inversion``, ``optimisation_inversion``, ``gradient_inversion``, and the peer
client's ``peer_inversion``); ``scoring`` measures leakage; ``runner`` runs a defence
sweep and ``report`` writes its tables, plot and report.
"""

from .peer_inversion import peer_attack
from .search_inversion import invert, search_invert, token_signatures

__all__ = ["invert", "peer_attack", "search_invert", "token_signatures"]
