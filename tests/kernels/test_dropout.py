"""Dropout masks of LoRA branch inputs: their statistics, the forms they are kept in, sharing."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from lorakit import functional as LF
from lorakit.kernels import dropout as D

SPARSE_P, DENSE_P = 0.05, 0.5  # on CPU: below and above SPARSE_MAX_P


def _within(observed: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


def test_sparse_mask_is_bernoulli_with_the_exact_p():
    torch.manual_seed(0)
    mask = D.draw_mask((1000, 1000), SPARSE_P, "cpu")
    assert mask.dropped is not None and mask.p == SPARSE_P
    pos = mask.dropped
    assert pos.dtype == torch.int64 and int(pos[0]) >= 0 and int(pos[-1]) < 10**6
    assert bool((pos[1:] > pos[:-1]).all())  # ascending, no repeats
    dropped = ~mask.to_bool().flatten()
    n = dropped.numel()
    assert _within(dropped.float().mean().item(), SPARSE_P, n)
    # Independent trials: neighbours are both dropped at p², and every tenth of the tensor at p
    # (the first and last tenths would show a wrong start or a tail cut short).
    assert _within((dropped[1:] & dropped[:-1]).float().mean().item(), SPARSE_P**2, n)
    for part in dropped.view(10, -1):
        assert _within(part.float().mean().item(), SPARSE_P, part.numel())


def test_sparse_positions_drawn_in_several_batches_keep_the_statistics():
    """When the first batch of gaps falls short of the end (a 1e-12 chance at the default
    size), more are drawn from where it stopped: forced here with batches of one gap."""
    torch.manual_seed(1)
    pos = D._dropped_positions(20000, 0.1, "cpu", first=1)
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[-1]) < 20000
    assert _within(pos.numel() / 20000, 0.1, 20000)
    keep = torch.ones(20000, dtype=torch.bool).index_fill_(0, pos, False)
    assert _within((~keep[10000:]).float().mean().item(), 0.1, 10000)


def test_dense_mask_rate_and_uniform_lanes():
    mask = D.draw_mask((1000, 1000), DENSE_P + 1e-6, "cpu")
    keep, p_exact = mask.to_bool(), mask.p
    assert p_exact == round((DENSE_P + 1e-6) * 65536) / 65536
    dropped = (~keep).float()
    assert _within(dropped.mean().item(), p_exact, keep.numel())
    # Every 16-bit lane of the 64-bit draws is uniform (a biased lane would show here).
    lanes = dropped.flatten()[: 4 * (keep.numel() // 4)].view(-1, 4).mean(0)
    assert ((lanes - p_exact).abs() < 0.003).all(), lanes


@pytest.mark.parametrize("p", [SPARSE_P, DENSE_P])
def test_a_seed_reproduces_the_mask(p):
    torch.manual_seed(5)
    a = D.draw_mask((37, 53), p, "cpu").to_bool()
    torch.manual_seed(5)
    b = D.draw_mask((37, 53), p, "cpu").to_bool()
    assert torch.equal(a, b) and not bool(a.all())


@pytest.mark.parametrize("p", [SPARSE_P, 0.2, DENSE_P])
def test_mask_applies_and_survives_its_saved_form(p):
    torch.manual_seed(2)
    mask = D.draw_mask((48, 50), p, "cpu")
    keep = mask.to_bool()
    x = torch.randn(48, 50, dtype=torch.float64)
    expected = torch.where(keep, x, 0)
    assert torch.equal(mask.apply(x), expected)
    assert mask.apply(x, torch.float32).dtype == torch.float32
    assert torch.equal(mask.apply(x.t().contiguous().t()), expected)  # a strided input
    t = x.clone()
    assert mask.apply_(t) is t and torch.equal(t, expected)
    assert torch.equal(mask.factor(torch.float64) * x, expected)
    saved = mask.saved()
    if p <= D.SPARSE_MAX_P:  # the dropped positions, as int32
        assert saved.dtype == torch.int32 and saved.numel() == int((~keep).sum())
    else:  # bits
        assert saved.dtype == torch.uint8 and saved.numel() == (48 * 50 + 7) // 8
    back = D.KeepMask.from_saved(saved, (48, 50), mask.p)
    assert torch.equal(back.to_bool(), keep) and torch.equal(back.apply(x), expected)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_masked_input_keeps_only_the_mask_for_backward(p):
    """The masked input's node keeps the mask's positions (sparse) or bits (dense) — nothing of
    x's size — and its gradient is where(keep, g, 0)."""
    x = torch.randn(6, 40, requires_grad=True)
    mask = D.draw_mask(x.shape, p, "cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        xm = D.MaskedInput.apply(x, mask)
    dropped = int((xm == 0).sum())
    assert 0 < dropped < 240 and mask.p == (p if p <= D.SPARSE_MAX_P else round(p * 65536) / 65536)
    expected = [(torch.int32, dropped)] if p <= D.SPARSE_MAX_P else [(torch.uint8, 30)]
    assert [(t.dtype, t.numel()) for t in saved] == expected
    g = torch.randn(6, 40)
    (gx,) = torch.autograd.grad(xm, x, g)
    torch.testing.assert_close(gx, torch.where(xm != 0, g, 0), rtol=0, atol=0)


@pytest.mark.parametrize("p", [SPARSE_P, DENSE_P])
def test_dropped_scales_kept_values_and_both_paths_agree(p):
    """x·keep/(1 − p): the node (masked_input) and the reference (`functional.dropout`, plain
    autograd) give the same values."""
    x = torch.ones(1000, 1000, requires_grad=True)
    draw = D.Draw(D.draw_mask(x.shape, p, "cpu"), shared=False)
    fast = D.dropped(x, draw)
    reference = LF.dropout(x, draw.mask.to_bool(), draw.mask.p)
    assert fast.grad_fn is not None and reference.grad_fn is not None
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
    bound = 5 * math.sqrt(p / (1 - p) / x.numel())  # kept values are 1/(1 − p): mean 1 within 5 s.e.
    assert abs(fast.mean().item() - 1) < bound
    assert not D.dropout_active(1e-7) and D.dropout_active(1e-4)  # below the resolution: off


def test_a_layer_drops_only_in_training_and_above_the_resolution():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"], lora_dropout=SPARSE_P))
    layer, rec = model[0], model[0].adapters["default"]
    x = torch.ones(4, 8)
    model.train()
    assert layer.dropout(rec, x) is not x
    model.eval()
    assert layer.dropout(rec, x) is x and layer.draw_dropout(rec, x) is None
    model.train()
    rec.dropout_p = 1e-7
    assert layer.dropout(rec, x) is x


@pytest.mark.parametrize("p", [SPARSE_P * 4, DENSE_P])
def test_mask_is_shared_only_for_the_very_same_unchanged_tensor(p):
    sharing = D.MaskSharing()
    x = torch.randn(64, 32)
    a = sharing.draw(x, p)
    assert sharing.draw(x, p) is a and a.rebuild is not None
    keep = a.mask.to_bool()
    unshared = sharing.draw(x, p, share=False)
    assert unshared is not a and unshared.rebuild is None
    assert not torch.equal(keep, unshared.mask.to_bool())
    assert sharing.draw(x.clone(), p) is not a
    x2 = torch.randn(64, 32)
    assert sharing.draw(x2, p * 0.9) is not sharing.draw(x2, p)  # another p
    y = torch.randn(64, 32)
    first = sharing.draw(y, p)
    y.mul_(1.0)  # an in-place change bumps the version: a new mask
    assert sharing.draw(y, p) is not first


def test_a_model_shares_one_mask_sharing_and_copies_get_their_own(llama):
    import copy
    import pickle

    lorakit.inject(llama, lorakit.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.1))
    layers = [m for m in llama.modules() if isinstance(m, lorakit.layers.LoraLayer)]
    assert len({id(layer.masks) for layer in layers}) == 1
    for twin in (copy.deepcopy(llama), pickle.loads(pickle.dumps(llama))):
        twins = [m for m in twin.modules() if isinstance(m, lorakit.layers.LoraLayer)]
        assert len({id(layer.masks) for layer in twins}) == 1
        assert twins[0].masks is not layers[0].masks


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_mask_bits_round_trip(n):
    gen = torch.Generator().manual_seed(n)
    keep = torch.rand(n, generator=gen) > 0.4
    packed = D.pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(D.unpack_mask(packed, (n,)), keep)
    assert torch.equal(
        D.unpack_mask(D.pack_mask(keep[: n // 2 * 2].view(-1, 2)), (n // 2, 2)), keep[: n // 2 * 2].view(-1, 2)
    )
    bits = [int(b) >> j & 1 for b in packed.tolist() for j in range(8)][:n]
    assert bits == keep.int().tolist()  # bit j of byte k is element 8k + j


def test_both_samplers_drop_at_p_and_draw_mask_picks_sparse_on_cpu_for_small_p():
    assert D.sparse_applies(SPARSE_P, "cpu") and not D.sparse_applies(DENSE_P, "cpu")
    assert not D.sparse_applies(SPARSE_P, "meta") and not D.sparse_applies(0.0, "cpu")
    torch.manual_seed(3)
    dense = D.dense_mask((400, 500), SPARSE_P, "cpu")
    sparse = D.sparse_mask((400, 500), DENSE_P, "cpu")
    assert dense.dropped is None and dense.saved().dtype == torch.uint8
    assert dense.p == round(SPARSE_P * 65536) / 65536
    assert sparse.dropped is not None and sparse.p == DENSE_P
    for mask in (dense, sparse):
        assert _within((~mask.to_bool()).float().mean().item(), mask.p, 200_000)
