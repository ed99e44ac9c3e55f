"""(epsilon, delta) of a client's clipped, noised releases, from opacus's RDP accountant.

Every time a training example is used, the client releases its ``h1`` (each token clipped
to ``h1_clip``) and its ``dL/dh2`` (the sample clipped to ``grad_clip``), each with
Gaussian noise. Replacing one example by another moves a release by at most ``2 * clip``
per clipped unit: ``2 * h1_clip * sqrt(T)`` for a sequence of up to ``T`` tokens, and
``2 * grad_clip`` for its gradient. With the per-coordinate noise std of
``noise * clip / sqrt(coordinates)`` (see ``defences``), each release is a Gaussian mechanism
with noise multiplier ``noise / (2 * sqrt(H * T))``; the accountant composes them over
the number of times an example is used. No formula of our own turns that into epsilon:
opacus's ``RDPAccountant`` does. A release that is not both clipped and noised has no
finite epsilon.
"""

from __future__ import annotations

import math
import warnings

from opacus.accountants import RDPAccountant

from .defences import PrivacySettings


def noise_multiplier(noise: float, hidden: int, max_tokens: int) -> float:
    """Noise std over L2 sensitivity (replace-one) for one clipped, noised sequence release."""
    return noise / (2.0 * math.sqrt(hidden * max_tokens))


def release_epsilon(settings: PrivacySettings, hidden: int, max_tokens: int, uses: int) -> dict:
    """epsilon at ``settings.delta`` per example, for h1 alone, dL/dh2 alone and both together."""
    acc = {"h1": RDPAccountant(), "grad": RDPAccountant()}
    finite = {"h1": bool(settings.h1_clip and settings.h1_noise),
              "grad": bool(settings.grad_clip and settings.grad_noise)}
    for name, noise in (("h1", settings.h1_noise), ("grad", settings.grad_noise)):
        if finite[name]:
            acc[name].history = [(noise_multiplier(noise, hidden, max_tokens), 1.0, uses)]
    both = RDPAccountant()
    both.history = acc["h1"].history + acc["grad"].history
    out = {}
    with warnings.catch_warnings():  # tiny noise multipliers: opacus notes its alpha grid's edge
        warnings.simplefilter("ignore", UserWarning)
        for name in ("h1", "grad"):
            out[name] = acc[name].get_epsilon(settings.delta) if finite[name] else math.inf
        out["both"] = both.get_epsilon(settings.delta) if all(finite.values()) else math.inf
    out["delta"] = settings.delta
    out["uses"] = uses
    return out
