"""Shared fixtures: tiny real transformers models, a small custom model, tolerances, data paths."""

from __future__ import annotations

import os

# Before torch loads (OpenMP reads it once): idle threads sleep instead of spinning, as lorakit sets
# for its own processes (lorakit.threads), so test workers and the processes they start share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
import socket
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorakit
import lorakit.kernels

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# One tolerance table per dtype (absolute, on logits of the tiny models).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(params=["kernels", "reference"])
def both_paths(request):
    """Run a module's tests twice: with lorakit's speed paths, then with `lorakit.kernels.disabled()`.

    Spec tests (PEFT parity, hand computations, properties, mixed batches, compile) use it, so the
    reference and the kernels are each held to the same expectations.
    """
    if request.param == "reference":
        with lorakit.kernels.disabled():
            yield request.param
    else:
        yield request.param


@pytest.fixture
def group():
    """A one-rank gloo process group for the test, destroyed after it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def kernels_allowed():
    """The speed paths may run in the test even under `LORAKIT_KERNELS=0`: for tests that pin a path itself."""
    with lorakit.kernels.forced():
        yield


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer LLaMA with hidden 16: the SmolLM2 architecture in miniature."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with hidden 16: fused c_attn (Conv1D, weight stored in×out)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """Embedding, Conv2d and Linear in one small model (PEFT's custom-model tests use the like)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.lin0 = nn.Linear(8, 8)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.lin0(self.emb(ids))  # (N, 8, 8)
        x = self.relu(self.conv(x.unsqueeze(1)))  # (N, 4, 8, 8)
        return self.head(x.flatten(1))


def conv_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 64, (4, 9))


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def randomize_adapters(model: nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    """Give every LoRA A and B non-zero random values (B = 0 would make parity trivial), and every
    DoRA magnitude a random factor in [0.5, 1.5) of its initial row norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in f".{name}." and name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif ".adapters." in f".{name}." and name.endswith("lora_magnitude_vector"):
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5)


def each_adapter_alone(model: nn.Module, ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Logits of `ids` with each adapter of `names` as the only active one (`"__base__"`: adapters
    disabled), without gradients: what each row of a per-row batch must equal."""
    alone = {}
    with torch.no_grad():
        for name in dict.fromkeys(names):
            if name == "__base__":
                with lorakit.disable_adapters(model):
                    alone[name] = model(ids).logits
            else:
                lorakit.set_adapter(model, name)
                alone[name] = model(ids).logits
    return alone


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(snapshot), "state_dict keys changed"
    for k, v in snapshot.items():
        torch.testing.assert_close(now[k], v, atol=0, rtol=0, equal_nan=True, msg=f"{k} changed")


def nf4_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer LLaMA whose linear layers NF4 can block (every weight a multiple of 64·256 values)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()
