"""`lorakit.kernels.disabled()`: one switch that forces the reference, which computes the same training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit import kernels
from tests.conftest import REPO, clone, randomize_adapters, tiny_gpt2, tiny_llama


def _nodes(loss: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `loss`."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _train_step(model, ids, *, seed: int = 11):
    torch.manual_seed(seed)  # the same RNG state: the same dropout masks on both paths
    loss = model(ids).logits.square().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, _nodes(loss)


CASES = {
    "llama all-linear, shared masks": (tiny_llama, dict(target_modules="all-linear", lora_dropout=0.1)),
    "llama q,v, a mask per layer": (tiny_llama, dict(lora_dropout=0.3, share_dropout_mask=False)),
    "gpt2 fused q,v slices": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], lora_dropout=0.1)),
    "llama all-linear DoRA": (tiny_llama, dict(target_modules="all-linear", lora_dropout=0.1, use_dora=True)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_training_step_is_the_same_with_the_kernels_disabled(case):
    """Loss and every A/B gradient of a step with dropout: kernels vs reference, same masks (fp64)."""
    make, kwargs = CASES[case]
    model = lorakit.inject(make().double(), lorakit.LoraConfig(r=4, lora_alpha=8, **kwargs)).train()
    randomize_adapters(model)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    loss_k, grads_k, nodes_k = _train_step(model, ids)
    with kernels.disabled():
        loss_r, grads_r, nodes_r = _train_step(model, ids)
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-12, atol=0)
    assert grads_k.keys() == grads_r.keys() and grads_k
    for name, g in grads_k.items():
        torch.testing.assert_close(g, grads_r[name], rtol=1e-10, atol=1e-14, msg=name)
    if kwargs.get("use_dora"):  # magnitudes train too
        assert any(name.endswith("lora_magnitude_vector") for name in grads_k)
    fast = {"LoraLinearFunctionBackward", "GatedMlpFunctionBackward", "MaskedInputBackward"}
    assert nodes_k & fast and not nodes_r & fast, (nodes_k & fast, nodes_r & fast)


def test_per_row_adapters_and_inference_paths_agree_both_ways(ids):
    """Batched per-row inference (stacked rows) and the on-the-fly merged weight vs the reference."""
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]), "b")
    randomize_adapters(model)
    model.eval()
    names = ["a", "__base__", "b", "a"]
    with torch.no_grad():
        plain = model(ids).logits
        with lorakit.adapter_per_row(model, names):
            rows = model(ids).logits
        with kernels.disabled():
            plain_ref = model(ids).logits
            with lorakit.adapter_per_row(model, names):
                rows_ref = model(ids).logits
    torch.testing.assert_close(plain, plain_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows, rows_ref, atol=1e-5, rtol=0)


def test_one_path_at_a_time_nested_blocks_and_unknown_names():
    assert all(kernels.enabled(p) for p in kernels.PATHS)
    with kernels.disabled("gated_mlp"):
        assert not kernels.enabled("gated_mlp") and kernels.enabled("fused_linear")
        with kernels.disabled():
            assert not any(kernels.enabled(p) for p in kernels.PATHS)
        assert kernels.enabled("fused_linear") and not kernels.enabled("gated_mlp")
    assert all(kernels.enabled(p) for p in kernels.PATHS)
    with pytest.raises(ValueError, match=r"unknown kernel path.*'fused'.*fused_linear"), kernels.disabled("fused"):
        pass
    assert all(kernels.enabled(p) for p in kernels.PATHS)


def test_the_environment_variable_disables_every_path():
    code = "import lorakit.kernels as k; print(sorted(p for p in k.PATHS if k.enabled(p)))"
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_KERNELS"} | {"PYTHONPATH": str(REPO / "src")}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run(
        [sys.executable, "-c", code], env={**env, "LORAKIT_KERNELS": "0"}, capture_output=True, text=True, check=True
    )
    assert on.stdout.strip() == str(sorted(kernels.PATHS))
    assert off.stdout.strip() == "[]"


def test_forced_lets_every_path_run_until_a_disabled_block_inside_it():
    with kernels.disabled():
        assert not any(kernels.enabled(p) for p in kernels.PATHS)
        with kernels.forced():
            assert all(kernels.enabled(p) for p in kernels.PATHS)
            with kernels.disabled("stacked_rows"):
                assert not kernels.enabled("stacked_rows") and kernels.enabled("fused_linear")
            assert kernels.enabled("stacked_rows")
        assert not any(kernels.enabled(p) for p in kernels.PATHS)


def test_disabled_model_keeps_what_plain_autograd_keeps(ids):
    """The reference is the reference: a disabled model's graph has only torch's own nodes."""
    model = lorakit.inject(clone(tiny_llama()), lorakit.LoraConfig(target_modules="all-linear", lora_dropout=0.1))
    model.train()
    with kernels.disabled():
        nodes = _nodes(model(ids).logits.sum())
    assert all(not n.startswith(("LoraLinear", "GatedMlp", "MaskedInput")) for n in nodes), nodes
