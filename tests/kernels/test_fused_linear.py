"""The fused LoRA linear node: same values and gradients as plain autograd, less saved for backward."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit import functional as LF
from lorakit.kernels import dropout as D
from lorakit.kernels import merged_weight
from lorakit.kernels.linear import lora_linear
from tests.conftest import clone, randomize_adapters, tiny_llama


def _inputs(dtype=torch.float32, shape=(3, 5, 12), r=4, out=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)
    A = torch.randn(r, shape[-1], generator=gen, dtype=dtype, requires_grad=True)
    B = torch.randn(out, r, generator=gen, dtype=dtype, requires_grad=True)
    result = torch.randn(*shape[:-1], out, generator=gen, dtype=dtype, requires_grad=True)
    return result, x, A, B


def _grads(y, *leaves, seed=1):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return torch.autograd.grad(y, leaves, g)


def _draw(x: torch.Tensor, p: float, seed: int) -> D.Draw:
    """An unshared dropout mask over x, drawn after seeding."""
    torch.manual_seed(seed)
    return D.Draw(D.draw_mask(x.shape, p, x.device), shared=False)


def _plain_dropout(x: torch.Tensor, draw: D.Draw) -> torch.Tensor:
    return torch.where(draw.mask.to_bool(), x, 0) / (1 - draw.mask.p)


def _assert_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a - b).abs().max() / scale).item() <= rel, f"relative error {((a - b).abs().max() / scale).item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 12), (12,), (2, 3, 4, 12)])
def test_no_dropout_matches_plain_autograd(dtype, shape):
    result, x, A, B = _inputs(dtype, shape)
    s = 0.75
    ours = lora_linear(result, x, A, B, s)
    plain = result + LF.linear_delta(x, A, B, s)
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    _assert_rel(ours, plain, rel)
    for g_ours, g_plain in zip(_grads(ours, result, x, A, B), _grads(plain, result, x, A, B), strict=True):
        _assert_rel(g_ours, g_plain, rel)


@pytest.mark.parametrize("p", [0.1, 0.3])  # a sparse and a dense mask
def test_dropout_matches_plain_autograd_with_the_same_mask(p):
    result, x, A, B = _inputs()
    s = 2.0
    draw = _draw(x, p, 7)
    ours = lora_linear(result, x, A, B, s, draw=draw)
    assert p - 0.05 < (~draw.mask.to_bool()).float().mean().item() < p + 0.05
    plain = result + LF.linear_delta(_plain_dropout(x, draw), A, B, s)
    _assert_rel(ours, plain, 1e-6)
    for g_ours, g_plain in zip(_grads(ours, result, x, A, B), _grads(plain, result, x, A, B), strict=True):
        _assert_rel(g_ours, g_plain, 1e-6)


@pytest.mark.parametrize("p", [0.1, 0.3])  # a sparse and a dense mask
def test_branches_sharing_an_input_keep_it_and_one_mask_and_match_plain_autograd(p):
    """q and v reading the very same x: one mask; their nodes keep x itself (no float copy of
    x·keep), one int32 positions or uint8 bits tensor between them and the (N, r) products; the
    gradients equal plain autograd with that mask."""
    result, x, A, B = _inputs(shape=(6, 8, 40))
    result2, _, A2, B2 = _inputs(shape=(6, 8, 40), out=5, seed=3)
    storages: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    sharing = D.MaskSharing()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q = lora_linear(result.clone(), x, A, B, 2.0, draw=sharing.draw(x, p))
        v = lora_linear(result2.clone(), x, A2, B2, 0.5, draw=sharing.draw(x, p))
    x_bytes = x.untyped_storage().nbytes()
    assert storages.pop(x.untyped_storage().data_ptr()) == (torch.float32, x_bytes)  # x itself
    for t in (A, B, A2, B2):
        storages.pop(t.untyped_storage().data_ptr())
    kinds = sorted(storages.values(), key=lambda k: k[1])
    assert [k for k in kinds if k[1] >= x_bytes] == []  # nothing else of x's size
    mask_kinds = [k for k in kinds if k[0] in (torch.int32, torch.uint8)]
    assert len(mask_kinds) == 1 and mask_kinds[0][0] == (torch.int32 if p <= 0.2 else torch.uint8)
    assert sum(k[0] == torch.float32 for k in kinds) == 2  # the two (N, r) products

    draw = sharing.draw(x, p)
    keep = draw.mask.to_bool()
    xm = _plain_dropout(x, draw)
    plain_q = result + LF.linear_delta(xm, A, B, 2.0)
    plain_v = result2 + LF.linear_delta(xm, A2, B2, 0.5)
    _assert_rel(q, plain_q, 1e-6)
    _assert_rel(v, plain_v, 1e-6)
    leaves = (x, A, B, A2, B2)
    ours = torch.autograd.grad((q * 1.5).sum() + (v * -0.7).sum(), leaves)
    theirs = torch.autograd.grad((plain_q * 1.5).sum() + (plain_v * -0.7).sum(), leaves)
    for g_ours, g_plain in zip(ours, theirs, strict=True):
        _assert_rel(g_ours, g_plain, 1e-6)
    assert torch.equal(ours[0] == 0, ~keep)  # dropped inputs get no gradient from the branches


def test_branches_sharing_a_mask_rebuild_the_masked_input_once_per_backward(monkeypatch):
    """q, k and v over one x with one mask: the first backward rebuilds x·keep once for all three
    A gradients; a second backward over the retained graph rebuilds it again and agrees."""
    x = torch.randn(4, 9, 24, requires_grad=True)
    branches = [_inputs(shape=(4, 9, 24), out=o, seed=o)[::2] for o in (5, 6, 7)]  # (result, A)
    Bs = [torch.randn(o, 4, requires_grad=True) for o in (5, 6, 7)]
    sharing = D.MaskSharing()
    outs = [
        lora_linear(res.detach().clone(), x, A, B, 1.5, draw=sharing.draw(x, 0.1))
        for (res, A), B in zip(branches, Bs, strict=True)
    ]
    loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
    calls = []
    apply = D.KeepMask.apply
    monkeypatch.setattr(D.KeepMask, "apply", lambda self, t, dtype=None: calls.append(1) or apply(self, t, dtype))
    leaves = (x, *(A for _, A in branches), *Bs)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    assert len(calls) == 1
    second = torch.autograd.grad(loss, leaves)
    assert len(calls) == 4  # nothing was left expecting the shared copy: each node rebuilt its own
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_half_precision_input_with_float32_adapter():
    result, x, A, B = _inputs(torch.float32)
    rb, xb = result.detach().bfloat16().requires_grad_(), x.detach().bfloat16().requires_grad_()
    ours = lora_linear(rb, xb, A, B, 0.5)
    plain = rb + LF.linear_delta(xb.float(), A, B, 0.5).bfloat16()
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, plain, atol=2e-2, rtol=2e-2)
    gr, gx, gA, gB = _grads(ours, rb, xb, A, B)
    pr, px, pA, pB = _grads(plain, rb, xb, A, B)
    assert gx.dtype == torch.bfloat16 and gA.dtype == torch.float32
    torch.testing.assert_close(gr, pr)
    torch.testing.assert_close(gx, px, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gA, pA, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gB, pB, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("p", [0.1, 0.3])  # sparse and dense masks
def test_half_precision_input_with_dropout_casts_once_and_keeps_gradients(p):
    """bf16 input, fp32 adapter, dropout: the masked input is made in fp32 in one pass and x's
    gradient comes back in bf16, equal to plain autograd with the same mask."""
    result, x, A, B = _inputs(torch.float32)
    rb, xb = result.detach().bfloat16().requires_grad_(), x.detach().bfloat16().requires_grad_()
    draw = _draw(xb, p, 11)
    keep = draw.mask.to_bool()
    ours = lora_linear(rb, xb, A, B, 0.5, draw=draw)
    plain = rb + LF.linear_delta(_plain_dropout(xb.float(), draw), A, B, 0.5).bfloat16()
    torch.testing.assert_close(ours, plain, atol=2e-2, rtol=2e-2)
    gx, gA = _grads(ours, xb, A)
    px, pA = _grads(plain, xb, A)
    assert gx.dtype == torch.bfloat16 and gA.dtype == torch.float32
    assert torch.equal(gx == 0, ~keep)  # dropped inputs get no gradient
    torch.testing.assert_close(gx, px, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gA, pA, atol=1e-2, rtol=1e-2)


def _lora_grads(model, ids):
    out = model(ids).logits
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_model_gradients_equal_peft_without_dropout(both_paths):
    """A and B gradients of a whole model, the kernels' and the reference's, against PEFT's."""
    base = tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear")
    model = lorakit.inject(clone(base), lorakit.LoraConfig(**kwargs))
    randomize_adapters(model)
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    with torch.no_grad():
        theirs = dict(pm.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                path, kind = name.rsplit(".adapters.default.", 1)
                theirs[f"base_model.model.{path}.{kind}.default.weight"].copy_(p)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = _lora_grads(model.train(), ids)
    ref = _lora_grads(pm.train(), ids)
    assert len(ours) == len(ref) == 2 * 7 * 2
    for name, g in ours.items():
        path, kind = name.rsplit(".adapters.default.", 1)
        _assert_rel(g, ref[f"base_model.model.{path}.{kind}.default.weight"], 1e-6)


def _saved_bytes(model, ids) -> int:
    """Bytes of distinct storages autograd keeps for the backward of one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).logits.sum()
    return sum(storages.values())


def test_saves_far_less_for_backward_than_peft_with_dropout():
    """The design rule: the input once per shared input and a 1-byte mask, not a float copy per layer.
    The reference path (kernels disabled) keeps about what PEFT keeps."""
    torch.manual_seed(0)
    base = tiny_llama()
    for p in base.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 64, (4, 32))
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    floor_model = clone(base).train()
    floor_model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
    floor = _saved_bytes(floor_model, ids)
    model = lorakit.inject(clone(base), lorakit.LoraConfig(**kwargs)).train()
    ours = _saved_bytes(model, ids)
    with lorakit.kernels.disabled():
        reference = _saved_bytes(model, ids)
    theirs = _saved_bytes(peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs)).train(), ids)
    assert floor < ours < theirs
    assert ours - floor < 0.5 * (theirs - floor), (floor, ours, theirs)
    assert ours - floor < 0.5 * (reference - floor), (floor, ours, reference)


def test_inference_path_matches_and_leaves_inputs_alone():
    result, x, A, B = (t.detach() for t in _inputs())
    x_before = x.clone()
    expected = result + LF.linear_delta(x, A, B, 0.5)
    with torch.no_grad():
        out = lora_linear(result.clone(), x, A, B, 0.5)
    _assert_rel(out, expected, 1e-6)
    assert torch.equal(x, x_before)
    half = lora_linear(result.bfloat16(), x.bfloat16(), A, B, 0.5)  # mixed dtypes, no grad needed
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=5e-2, rtol=2e-2)


def _compiled_step(dropout: float):
    torch.manual_seed(0)
    model = lorakit.inject(
        tiny_llama(), lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    )
    randomize_adapters(model)
    twin = clone(model)
    ids = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(ids).logits.square().mean().backward()
    twin.train()(ids).logits.square().mean().backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    eager = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    return model, twin, compiled, ids, ours, eager


@pytest.mark.integration  # torch.compile
def test_torch_compile_full_graph_in_training_and_inference():
    """Dynamo traces the injected model without a graph break (fullgraph=True fails on one).

    Run once, with the kernels on: then Dynamo must trace lorakit's own autograd node (the LoRA
    branch's `LoraLinearFunction`, which applies under compile) and the in-graph dropout draws,
    while with `kernels.disabled()` it sees only plain tensor ops, a subset of the same model.
    The aot_eager backend runs the traced graphs without inductor's C++ build, which takes
    minutes on 2 cores; the benchmarks compile with inductor.
    """
    model, twin, compiled, ids, ours, eager = _compiled_step(0.0)
    assert len(ours) == 28
    for name, g in ours.items():
        _assert_rel(g, eager[name], 1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, twin.eval()(ids).logits, atol=1e-5, rtol=0)
    # With dropout the compiled graph draws its masks inside the graph: still no break.
    _, _, _, _, ours, _ = _compiled_step(0.1)
    assert all(torch.isfinite(g).all() for g in ours.values()) and sum(g.abs().sum() for g in ours.values()) > 0


@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.3])
def test_branch_added_in_place_into_a_fresh_base_output_keeps_gradients(dropout):
    """The base output made inside the graph (not a leaf) takes the branch in place; values and
    gradients still equal plain autograd, the base weight's gradient included."""
    _, x, A, B = _inputs()
    W = torch.randn(7, 12, dtype=torch.float32, requires_grad=True)
    s = 1.5
    draw = _draw(x, dropout, 3) if dropout else None
    result = torch.nn.functional.linear(x, W)
    ours = lora_linear(result, x, A, B, s, draw=draw)
    assert ours.data_ptr() == result.data_ptr()  # the base output's own memory
    xd = _plain_dropout(x, draw) if dropout else x
    plain = torch.nn.functional.linear(x, W) + LF.linear_delta(xd, A, B, s)
    _assert_rel(ours, plain, 1e-6)
    for g_ours, g_plain in zip(_grads(ours, x, W, A, B), _grads(plain, x, W, A, B), strict=True):
        _assert_rel(g_ours, g_plain, 1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_output_seen_by_a_forward_hook_is_left_alone(training):
    """A forward hook on the base layer keeps the base output it saw: the branch is not added
    into that tensor in place."""
    model = torch.nn.Sequential(torch.nn.Linear(12, 7))
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["0"], lora_dropout=0.0))
    layer = model[0]
    torch.nn.init.normal_(layer.adapters["default"].lora_B)
    seen = []
    layer.base_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(3, 12)
    model.train(training)
    with torch.set_grad_enabled(training):
        out = model(x)
    base = layer.base_layer.weight @ x.T
    torch.testing.assert_close(seen[0], (base.T + layer.base_layer.bias).detach())
    assert not torch.allclose(out, seen[0])


def test_many_token_no_grad_forward_uses_the_summed_weight_and_matches_the_branch():
    """Without gradients, a forward over many tokens runs x·(W0 + s·B·A)ᵀ (cheaper than the
    branch there), a few tokens keep the branch; both equal W0·x + b + s·B·A·x."""
    model = torch.nn.Sequential(torch.nn.Linear(12, 7)).double()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=6, target_modules=["0"], lora_dropout=0.1))
    layer = model[0]
    rec = layer.adapters["default"]
    torch.nn.init.normal_(rec.lora_B)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    model.eval()
    for rows, summed in ((64, True), (1, False)):
        x = torch.randn(rows, 12, dtype=torch.float64)
        expected = x @ W.T + b + rec.scaling * (x @ rec.lora_A.T) @ rec.lora_B.T
        with torch.no_grad():
            assert (merged_weight.weight(layer.base_layer, x, layer.pending()) is not None) is summed
            torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(64, 12, dtype=torch.float64)
    assert (
        merged_weight.weight(layer.base_layer, x, layer.pending()) is None
    )  # grad mode and trainable A/B: the branch's node
    model.train()  # dropout in effect: the branch
    with torch.no_grad():
        assert merged_weight.weight(layer.base_layer, x, layer.pending()) is None
    with torch.no_grad(), lorakit.kernels.disabled():
        model.eval()
        assert merged_weight.weight(layer.base_layer, x, layer.pending()) is None  # the switch
    assert W.grad is None and torch.equal(layer.base_layer.weight, W)
