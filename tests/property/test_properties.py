"""Properties of LoRA that hold for any shape, rank, alpha and dtype (hypothesis)."""

from __future__ import annotations

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from tests.conftest import randomize_adapters

# The function-scoped fixture is `both_paths` (tests/property/conftest.py): the kernel switch it sets
# holds for every example of a test alike, so there is nothing to reset between examples.
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.act = nn.Tanh()
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


cases = st.fixed_dictionaries(
    {
        "d_in": st.integers(1, 12),
        "d_hidden": st.integers(1, 12),
        "d_out": st.integers(1, 12),
        "r": st.integers(1, 6),
        "alpha": st.floats(0.25, 32, allow_nan=False),
        "rslora": st.booleans(),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "seed": st.integers(0, 2**16),
    }
)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _build(c, init=True):
    torch.manual_seed(c["seed"])
    model = MLP(c["d_in"], c["d_hidden"], c["d_out"]).to(c["dtype"])
    cfg = lorakit.LoraConfig(
        r=c["r"],
        lora_alpha=c["alpha"],
        use_rslora=c["rslora"],
        target_modules=["up", "down"],
        init_lora_weights=init,
    )
    lora = lorakit.inject(MLP(c["d_in"], c["d_hidden"], c["d_out"]).to(c["dtype"]), cfg)
    with torch.no_grad():
        lora.up.base_layer.load_state_dict(model.up.state_dict())
        lora.down.base_layer.load_state_dict(model.down.state_dict())
    x = torch.randn(3, c["d_in"], dtype=c["dtype"])
    return model, lora, x


@SETTINGS
@given(cases, st.sampled_from([True, "gaussian"]))
def test_fresh_adapter_is_a_no_op(c, init):
    model, lora, x = _build(c, init)
    assert torch.equal(lora(x), model(x))


@SETTINGS
@given(cases)
def test_merge_properties(c):
    _, lora, x = _build(c)
    randomize_adapters(lora, seed=c["seed"])
    tol = TOL[c["dtype"]]
    W0 = lora.up.base_layer.weight.detach().clone()
    unmerged = lora(x)
    lorakit.merge(lora)
    once = lora.up.base_layer.weight.detach().clone()
    torch.testing.assert_close(lora(x), unmerged, atol=tol * 10, rtol=tol * 10)  # merged = unmerged forward
    lorakit.merge(lora)
    assert torch.equal(lora.up.base_layer.weight, once)  # merging twice = once
    lorakit.unmerge(lora)
    torch.testing.assert_close(lora.up.base_layer.weight, W0, atol=tol, rtol=tol)  # unmerge∘merge = id
    torch.testing.assert_close(lora(x), unmerged, atol=tol * 10, rtol=tol * 10)


@SETTINGS
@given(cases)
def test_disabled_equals_base_and_rank_bounded(c):
    model, lora, x = _build(c)
    randomize_adapters(lora, seed=c["seed"])
    with lorakit.disable_adapters(lora):
        assert torch.equal(lora(x), model(x))
    delta = lora.up.delta_weight("default")
    rtol = 1e-4 if c["dtype"] == torch.float32 else 1e-10
    assert torch.linalg.matrix_rank(delta.double(), rtol=rtol).item() <= c["r"]


@SETTINGS
@given(cases)
def test_only_lora_parameters_get_gradients(c):
    _, lora, x = _build(c)
    randomize_adapters(lora, seed=c["seed"])
    lora(x).square().sum().backward()
    for name, p in lora.named_parameters():
        is_lora = name.endswith(("lora_A", "lora_B"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
    # A of `up` gets a non-zero gradient unless tanh saturated at every hidden unit (with
    # scalings up to 32 in float32, tanh'(z) = 1 − tanh(z)² rounds to exactly 0 for |z| > 9).
    with torch.no_grad():
        saturated = bool((1 - torch.tanh(lora.up(x)) ** 2 == 0).all())
    assert lora.up.adapters["default"].lora_A.grad.abs().sum() > 0 or saturated


@SETTINGS
@given(cases)
def test_save_load_is_bit_exact(c):
    _, lora, x = _build(c)
    randomize_adapters(lora, seed=c["seed"])
    with tempfile.TemporaryDirectory() as d:
        lorakit.save_adapter(lora, d)
        torch.manual_seed(c["seed"])
        fresh = MLP(c["d_in"], c["d_hidden"], c["d_out"]).to(c["dtype"])
        fresh.up.load_state_dict(lora.up.base_layer.state_dict())
        fresh.down.load_state_dict(lora.down.base_layer.state_dict())
        lorakit.load_adapter(fresh, d)
    for layer in ("up", "down"):
        a, b = getattr(lora, layer).adapters["default"], getattr(fresh, layer).adapters["default"]
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        assert a.scaling == b.scaling
    with torch.no_grad():  # the same conditions, so the same computation path (see LoraLinear.forward)
        assert torch.equal(fresh(x), lora(x))
