"""Client-side defences (clipping and noise on h1 and dL/dh2) and their (epsilon, delta) accounting."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from silotune.config import load_config
from silotune.errors import ConfigError
from silotune.privacy import PrivacySettings, defend_activations, defend_gradients, release_epsilon
from silotune.privacy.accounting import noise_multiplier


def lengths_and_mask(batch=4, width=10):
    lengths = torch.tensor([10, 7, 3, 1])[:batch]
    return lengths, (torch.arange(width)[None] < lengths[:, None])


def test_h1_clip_bounds_every_token_and_leaves_small_ones_alone():
    lengths, mask = lengths_and_mask()
    h = torch.randn(4, 10, 64) * torch.linspace(0.1, 5, 10)[None, :, None]
    out = defend_activations(h, lengths, PrivacySettings(h1_clip=3.0), None)
    norms = out.norm(dim=-1)
    assert float(norms.max()) <= 3.0 + 1e-5
    small = h.norm(dim=-1) < 3.0
    assert torch.allclose(out[small], h[small])


def test_h1_noise_is_relative_to_the_token_scale_and_spares_padding():
    lengths, mask = lengths_and_mask()
    h = torch.randn(4, 10, 512) * 7.0
    gen = torch.Generator().manual_seed(0)
    out = defend_activations(h, lengths, PrivacySettings(h1_noise=0.5), gen)
    noise = out - h
    assert torch.equal(noise[~mask], torch.zeros_like(noise[~mask]))  # padding untouched
    ratio = noise[mask].std(dim=-1) / h[mask].pow(2).mean(-1).sqrt()
    assert abs(float(ratio.mean()) - 0.5) < 0.03
    clipped = defend_activations(h, lengths, PrivacySettings(h1_clip=2.0, h1_noise=0.5), gen)
    per_coord = (clipped - defend_activations(h, lengths, PrivacySettings(h1_clip=2.0), None))[mask].std()
    assert abs(float(per_coord) - 0.5 * 2.0 / 512 ** 0.5) < 0.003  # relative to the clip bound


def test_h1_noise_per_dimension_gives_every_dimension_the_same_relative_error():
    lengths, mask = lengths_and_mask()
    spread = torch.tensor([0.01, 0.1] + [1.0] * 62)
    offset = torch.tensor([50.0] + [0.0] * 63)  # dimension 0: huge and nearly constant; dimension 1: tiny
    h = torch.randn(4, 10, 64) * spread + offset
    gen = torch.Generator().manual_seed(2)
    settings = PrivacySettings(h1_noise=0.5, h1_noise_scale="dimension")
    noise = (defend_activations(h, lengths, settings, gen) - h)[mask]  # (tokens, H)
    std = h[mask].std(0)
    assert torch.allclose(noise.std(0) / std, torch.full((64,), 0.5), atol=0.25)
    token_scaled = defend_activations(h, lengths, PrivacySettings(h1_noise=0.5), gen) - h
    assert float(token_scaled[mask][:, 1].std() / std[1]) > 10  # by token RMS the tiny dimension drowns
    with pytest.raises(ConfigError, match="h1_noise_scale"):
        load_config(None, ["privacy.h1_noise_scale=sometimes"])
    with pytest.raises(ConfigError, match="h1_noise_scale"):
        load_config(None, ["privacy.h1_noise_scale=dimension", "privacy.h1_clip=1.0"])


def test_gradient_clip_is_per_sample_and_noise_scales_with_the_bound():
    lengths, mask = lengths_and_mask()
    g = torch.randn(4, 10, 32) * mask[..., None]
    out = defend_gradients(g, lengths, PrivacySettings(grad_clip=0.5), None)
    assert float(out.flatten(1).norm(dim=1).max()) <= 0.5 + 1e-6
    gen = torch.Generator().manual_seed(1)
    noisy = defend_gradients(g, lengths, PrivacySettings(grad_clip=0.5, grad_noise=1.0), gen)
    assert torch.equal(noisy[~mask], torch.zeros_like(noisy[~mask]))
    diff = (noisy - out)[0]  # sample 0 has 10 real positions
    assert abs(float(diff.std()) - 0.5 / (10 * 32) ** 0.5) < 0.006


def test_no_defence_returns_the_same_tensor():
    h = torch.randn(2, 3, 4)
    assert defend_activations(h, torch.tensor([3, 2]), PrivacySettings(), None) is h
    assert defend_gradients(h, torch.tensor([3, 2]), PrivacySettings(), None) is h


def test_epsilon_comes_from_opacus_and_is_finite_only_for_clipped_noised_releases():
    s = PrivacySettings(h1_clip=50.0, h1_noise=800.0, grad_clip=0.01, grad_noise=800.0, delta=1e-5)
    eps = release_epsilon(s, hidden=64, max_tokens=32, uses=3)
    acc = RDPAccountant()
    acc.history = [(noise_multiplier(800.0, 64, 32), 1.0, 3)]
    assert eps["h1"] == pytest.approx(acc.get_epsilon(1e-5))
    assert eps["both"] > eps["h1"]
    more = release_epsilon(PrivacySettings(h1_clip=50.0, h1_noise=1600.0, grad_clip=0.01, grad_noise=1600.0),
                           64, 32, 3)
    assert more["both"] < eps["both"]
    assert math.isinf(release_epsilon(PrivacySettings(h1_noise=5.0), 64, 32, 1)["h1"])  # noise without a clip
    assert math.isinf(release_epsilon(PrivacySettings(h1_clip=1.0), 64, 32, 1)["both"])  # clip without noise


@pytest.mark.parametrize("override,key", [("privacy.h1_clip=0", "h1_clip"), ("privacy.h1_noise=-1", "h1_noise"),
                                          ("privacy.grad_clip=-2", "grad_clip"), ("privacy.delta=2", "delta")])
def test_bad_privacy_settings_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_two_part_split_is_refused_outside_the_audit():
    with pytest.raises(ConfigError, match="head_blocks.*raw token embeddings"):
        load_config(None, ["split.head_blocks=0"])
    assert load_config(None, ["split.head_blocks=0"], two_part=True).split.head_blocks == 0
