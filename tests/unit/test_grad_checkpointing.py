"""`lorakit.train.checkpointing`: per-block gradient checkpointing that LoRA survives.

The gradients with checkpointing equal those without (dropout on, every adapted layer, fp32, bf16
and NF4 bases, kernels on and off); the blocks really are recomputed and keep less; the masks of
the recomputation are the forward's; generation pays nothing; a model without blocks is refused
before anything is written; one-rank FSDP in either order of wrapping, and two-rank DDP and FSDP
runs, train the same adapter with and without it.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from lorakit.errors import ConfigError
from lorakit.kernels import dropout as kernel_dropout
from lorakit.kernels import gated_mlp as kernel_gated_mlp
from lorakit.state import lora_layers
from lorakit.train import TrainConfig, fit, shard
from lorakit.train.checkpointing import (
    checkpointable_blocks,
    disable_grad_checkpointing,
    enable_grad_checkpointing,
    is_grad_checkpointing,
)
from tests.conftest import assert_same_state, clone, nf4_llama, randomize_adapters, state_snapshot, tiny_llama

TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
# Rows of different lengths: the padding makes the causal mask explicit, so a KV cache written a
# second time by the recomputation would not fit it (the model's config has use_cache=True).
ATTENTION = torch.tensor([[1] * 12, [0] * 4 + [1] * 8, [0] * 2 + [1] * 10])
# Relative gradient error allowed, per tensor (max |a − b| / max |a|): the recomputation runs the
# same operations on the same values, so fp32 and NF4 are held to 1e-6; a bf16 model is given
# bf16's rounding (2⁻⁸) in case a recomputed kernel rounds differently, though none did here.
REL = {"fp32": 1e-6, "nf4": 1e-6, "bf16": 4e-3}


def _ids(vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, ATTENTION.shape, generator=torch.Generator().manual_seed(0))


def _adapted(base: str, targets: str | list[str], dropout: float, *, share: bool = True) -> nn.Module:
    """A tiny LLaMA (fp32, all bf16, or NF4-quantized linear layers) with a random LoRA adapter."""
    if base == "nf4":
        model = lorakit.quantize(nf4_llama(), "nf4")  # hidden 128, intermediate 256: NF4 blocks fit
    else:
        model = tiny_llama()
        if base == "bf16":
            model = model.to(torch.bfloat16)
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, share_dropout_mask=share
    )
    torch.manual_seed(1)
    lorakit.inject(model, config)
    randomize_adapters(model)  # B ≠ 0, so every A gets a gradient
    return model


def _grads(model: nn.Module, seed: int = 7) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one training forward and backward from RNG state `seed`."""
    model.train()
    model.zero_grad(set_to_none=True)
    ids = _ids()
    torch.manual_seed(seed)
    model(input_ids=ids, attention_mask=ATTENTION, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close_relative(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    assert sorted(got) == sorted(want)
    for name, reference in want.items():
        error = float((got[name].float() - reference.float()).abs().max())
        assert error <= rel * float(reference.float().abs().max()), (name, error)


def _counted_blocks(blocks: list[nn.Module]) -> list[int]:
    """How many times each block's body runs: a pre-hook on its first submodule (the block's own
    hooks run once, around the checkpoint; its body runs again in the recomputation)."""
    counts = [0] * len(blocks)
    for index, block in enumerate(blocks):
        first = next(block.children())

        def hook(module, args, index=index):
            counts[index] += 1

        first.register_forward_pre_hook(hook)
    return counts


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dropout", [0.05, 0.3], ids=["p0.05-sparse", "p0.3-dense"])
@pytest.mark.parametrize("targets", ["qv", "all-linear"])
@pytest.mark.parametrize("base", ["fp32", "bf16", "nf4"])
def test_lora_gradients_equal_without_checkpointing(both_paths, base, targets, dropout):
    plain = _adapted(base, TARGETS[targets], dropout)
    checkpointed = clone(plain)
    blocks = enable_grad_checkpointing(checkpointed)
    counts = _counted_blocks(blocks)
    want, got = _grads(plain), _grads(checkpointed)
    assert counts == [2] * len(blocks)  # each block ran again in the backward
    # Every adapted layer has a gradient, the first block's (whose input is the frozen embedding's
    # output, which requires no grad) included: "no gradient" cannot pass as "equal".
    layers = [name for name, _ in lora_layers(plain)]
    assert any(name.startswith("model.layers.0.") for name in layers)
    for name, grad in {**want, **got}.items():
        assert float(grad.abs().max()) > 0, f"{name} got no gradient"
    assert len(want) == 2 * len(layers)
    _assert_close_relative(got, want, REL[base])


class _DownProducts(TorchDispatchMode):
    """Counts the products h·W_downᵀ (the down projections' base products; not the backward's g·W_down)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.weights = {m.down_proj.base_layer.weight.data_ptr() for m in model.modules() if hasattr(m, "down_proj")}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            weight = args[1] if func is torch.ops.aten.mm.default else args[2]
            # F.linear passes W_downᵀ, (intermediate, hidden); the backward's g·W_down passes W_down.
            self.count += weight.data_ptr() in self.weights and weight.stride(0) == 1
        return func(*args, **(kwargs or {}))


def _down_products(model: nn.Module) -> int:
    with _DownProducts(model) as counter:
        _grads(model)
    return counter.count


def test_the_recomputation_skips_the_down_projection_it_throws_away():
    """A LLaMA block ends in residual + mlp(...): its recomputation rebuilds what the gated-MLP node
    keeps but not the down projection's base product, whose result nothing reads; the gradients are
    still those without checkpointing (0 apart)."""
    with lorakit.kernels.forced():
        plain = _adapted("fp32", "all-linear", 0.05)
        checkpointed = clone(plain)
        blocks = enable_grad_checkpointing(checkpointed)
        counts = _counted_blocks(blocks)
        assert _down_products(plain) == len(blocks)
        assert _down_products(checkpointed) == len(blocks)  # once each, in the forward
        assert counts == [2] * len(blocks)  # the blocks did run again
        _assert_close_relative(_grads(checkpointed), _grads(plain), 0.0)


def test_a_block_that_reads_the_mlp_output_otherwise_recomputes_it_all():
    """When something between the MLP and the residual add uses the MLP's output (here a tanh, which
    keeps its result for the backward), the recomputation computes the real output."""
    with lorakit.kernels.forced():
        plain = _adapted("fp32", "all-linear", 0.05)
        for module in plain.modules():
            if hasattr(module, "down_proj"):
                module.register_forward_hook(lambda module, args, out: out.tanh())
        checkpointed = clone(plain)
        blocks = enable_grad_checkpointing(checkpointed)
        assert _down_products(plain) == len(blocks)
        assert _down_products(checkpointed) == 2 * len(blocks)
        _assert_close_relative(_grads(checkpointed), _grads(plain), 0.0)


def test_a_training_run_is_the_same_and_the_model_keeps_working(tmp_path):
    ids = _ids()
    data = {"input_ids": ids, "attention_mask": ATTENTION, "labels": ids}
    cfg = TrainConfig(lr=1e-2, max_steps=3, save_every=None, seed=3)
    plain = _adapted("fp32", "all-linear", 0.05)
    checkpointed = clone(plain)
    fit(plain, lambda e, s: iter([data][s:]), cfg, tmp_path / "a", batches_per_epoch=1, progress=False)
    cfg = TrainConfig(lr=1e-2, max_steps=3, save_every=None, seed=3, grad_checkpointing=True)
    fit(checkpointed, lambda e, s: iter([data][s:]), cfg, tmp_path / "b", batches_per_epoch=1, progress=False)
    assert is_grad_checkpointing(checkpointed) and not is_grad_checkpointing(plain)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b, a, atol=0, rtol=1e-6, msg=name)
    # The names, and so the saved adapter, are unchanged; disabling restores the class's forward.
    assert list(dict(plain.named_modules())) == list(dict(checkpointed.named_modules()))
    assert disable_grad_checkpointing(checkpointed) == 2 and not is_grad_checkpointing(checkpointed)
    assert all("forward" not in block.__dict__ for block in checkpointable_blocks(checkpointed))


# ------------------------------------------------------------------------------- what it saves
def _saved_bytes(model: nn.Module) -> int:
    """Bytes of the distinct non-parameter storages autograd saved during one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if type(p.data) is torch.Tensor}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if type(tensor) is torch.Tensor:  # NF4 weights are parameters, and tensor subclasses
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_checkpointing_keeps_less_for_the_backward(base):
    plain = _adapted(base, "all-linear", 0.05)
    checkpointed = clone(plain)
    enable_grad_checkpointing(checkpointed)
    without, with_ = _saved_bytes(plain), _saved_bytes(checkpointed)
    # Measured: 0.23 (fp32, hidden 16) and 0.10 (NF4, hidden 128) of the bytes kept without it.
    assert with_ < 0.5 * without, (with_, without)


def test_without_gradients_nothing_is_checkpointed(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):  # the real checkpoint, counted
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    plain = _adapted("fp32", "all-linear", 0.05)
    checkpointed = clone(plain)
    blocks = enable_grad_checkpointing(checkpointed)
    counts = _counted_blocks(blocks)
    prompt = _ids()[:1]
    for model in (plain, checkpointed):
        model.train()  # even in training mode: generate records no gradients
    torch.manual_seed(0)
    want = plain.generate(prompt, max_new_tokens=5, do_sample=False)
    torch.manual_seed(0)
    got = checkpointed.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)  # with its KV cache: a prefill, then one token per step
    assert calls == [] and counts == [5, 5]
    _grads(checkpointed)
    assert len(calls) == len(blocks)


# ------------------------------------------------------------------------------- the masks
def _recorded_draws(monkeypatch, blocks: list[nn.Module]) -> list[tuple[int, torch.Tensor]]:
    """Every dropout mask drawn, as (index of the block drawing it, the mask), in order."""
    draws: list[tuple[int, torch.Tensor]] = []
    where = [-1]
    for index, block in enumerate(blocks):
        next(block.children()).register_forward_pre_hook(lambda m, a, index=index: where.__setitem__(0, index))
    real = kernel_dropout.draw_mask

    def recording(shape, p, device):  # the real sampler, its masks recorded
        mask = real(shape, p, device)
        draws.append((where[0], mask.to_bool().clone()))
        return mask

    monkeypatch.setattr(kernel_dropout, "draw_mask", recording)
    monkeypatch.setattr(kernel_gated_mlp, "draw_mask", recording)
    return draws


@pytest.mark.parametrize("share", [True, False], ids=["shared", "per-layer"])
def test_the_recomputation_draws_the_forwards_masks(both_paths, monkeypatch, share):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = _adapted("fp32", targets, 0.3, share=share)
    blocks = enable_grad_checkpointing(model)
    draws = _recorded_draws(monkeypatch, blocks)
    model.train()
    ids = _ids()
    out = model(input_ids=ids, attention_mask=ATTENTION, labels=ids)
    forward = list(draws)
    out.loss.backward()
    again = draws[len(forward) :]
    for index in range(len(blocks)):
        first = [mask for block, mask in forward if block == index]
        second = [mask for block, mask in again if block == index]
        assert len(first) == len(second) > 0
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), index
        # Shared: q, k, v draw one mask, o one, gate and up one, down one (the reference's layers
        # and the gated-MLP node alike); per layer, each of the seven draws its own.
        assert len(first) == (4 if share else len(targets))
    # The backward dropped every mask: nothing the sharing kept outlives the step.
    del out
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is kernel_dropout.Draw]


# ------------------------------------------------------------------------------- refusals
class _Flat(nn.Module):
    """No decoder blocks: no `_no_split_modules`, no nn.ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 64))

    def forward(self, input_ids, attention_mask=None):
        return self.body(self.emb(input_ids))


def test_a_model_without_blocks_is_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    model = _Flat().eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["body.0"], lora_dropout=0.05))
    snapshot = state_snapshot(model)
    with pytest.raises(ConfigError, match=r"no decoder blocks in _Flat"):
        enable_grad_checkpointing(model)
    ids = _ids()
    batch = {"input_ids": ids, "attention_mask": ATTENTION, "labels": ids}
    cfg = TrainConfig(max_steps=1, grad_checkpointing=True)
    with pytest.raises(ConfigError, match=r"no decoder blocks in _Flat"):
        fit(model, lambda e, s: iter([batch]), cfg, tmp_path / "run", batches_per_epoch=1, progress=False)
    assert not (tmp_path / "run").exists()
    assert not is_grad_checkpointing(model) and model.training is False
    assert_same_state(model, snapshot)


# ------------------------------------------------------------------------------- FSDP, one rank
@pytest.mark.parametrize("order", ["checkpoint-then-shard", "shard-then-checkpoint"])
def test_fsdp_in_either_order_gives_the_plain_gradients(group, order):
    plain = _adapted("fp32", "all-linear", 0.05)
    sharded = clone(plain)
    if order == "checkpoint-then-shard":  # fit's order (torchtune's: checkpointing before fully_shard)
        blocks = enable_grad_checkpointing(sharded)
        shard(sharded)
    else:
        shard(sharded)
        blocks = enable_grad_checkpointing(sharded)
    assert len(blocks) == 2 and all(type(b).__name__ == "FSDPLlamaDecoderLayer" for b in blocks)
    counts = _counted_blocks(blocks)
    want = _grads(plain)
    got = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in _grads(sharded).items()}
    assert counts == [2, 2]
    _assert_close_relative(got, want, 1e-6)


# ------------------------------------------------------------------------------- two ranks
SCRIPT = r'''
"""Tiny LLaMA + LoRA (all-linear, dropout 0.05) trained four ways on two ranks: DDP and FSDP, each
with and without gradient checkpointing; every rank draws its own masks (seed + rank)."""
import sys
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
import lorakit
from lorakit.train import TrainConfig, fit

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(1)
ids = torch.randint(0, 64, (8, 10), generator=gen)
mask = torch.ones_like(ids)
mask[1::2, :3] = 0

def data(epoch, start):
    for index in range(start, 2):
        rows = slice(4 * index, 4 * index + 4)
        yield {"input_ids": ids[rows], "attention_mask": mask[rows], "labels": ids[rows]}

for strategy in ("ddp", "fsdp"):
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.05))
        cfg = TrainConfig(lr=2e-2, max_steps=3, batch_size=4, save_every=None, strategy=strategy,
                          grad_checkpointing=checkpointing)
        fit(model, data, cfg, f"{sys.argv[1]}/{strategy}-{int(checkpointing)}", batches_per_epoch=2, progress=False)
print(f"RANK {dist.get_rank()} DONE", flush=True)
dist.destroy_process_group()
'''


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.integration  # two ranks under torchrun
def test_two_rank_ddp_and_fsdp_train_the_same_adapter_with_checkpointing(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(port), str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "RANK 0 DONE" in done.stdout and "RANK 1 DONE" in done.stdout
    for strategy in ("ddp", "fsdp"):
        plain = _tensors(tmp_path / f"{strategy}-0" / "adapter" / "adapter_model.safetensors")
        checkpointed = _tensors(tmp_path / f"{strategy}-1" / "adapter" / "adapter_model.safetensors")
        assert sorted(plain) == sorted(checkpointed) and len(plain) == 28
        for key, value in plain.items():
            torch.testing.assert_close(checkpointed[key], value, atol=1e-7, rtol=1e-6, msg=f"{strategy} {key}")
        assert max(float(t.abs().max()) for k, t in plain.items() if "lora_B" in k) > 1e-3  # it trained
