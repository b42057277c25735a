"""DDP: `torchrun --nproc_per_node 2` on a tiny LLaMA gives the adapter of one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.integration  # two ranks under torchrun

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")

SCRIPT = r'''
"""Tiny LLaMA + LoRA (no dropout): 9 rows, global batch 4, grad_accum 2, so a step's rows and targets
are split unevenly over ranks and the last batch of an epoch (1 row) leaves rank 1 with no row."""
import random, sys
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
import lorakit
from lorakit.train import TrainConfig, fit

torch.set_num_threads(1)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
gen = torch.Generator().manual_seed(1)
ids = torch.randint(0, 64, (9, 8), generator=gen)
labels = ids.clone()
for row in range(9):
    labels[row, : 1 + 2 * (row % 3)] = -100          # 6, 4 or 2 targets per row

def data(epoch, start):
    order = list(range(9))
    random.Random(f"3:{epoch}").shuffle(order)
    for index in range(start, 3):
        take = order[index * 4 : (index + 1) * 4]
        yield {"input_ids": ids[take], "attention_mask": torch.ones_like(ids[take]), "labels": labels[take]}

cfg = TrainConfig(lr=2e-2, max_steps=5, batch_size=4, grad_accum=2, warmup_steps=1, save_every=2)
result = fit(model, data, cfg, sys.argv[1], batches_per_epoch=3, progress=False)
world = dist.get_world_size() if dist.is_initialized() else 1
rank = dist.get_rank() if dist.is_initialized() else 0
print(f"RANK {rank} WORLD {world} STEPS {result.steps}", flush=True)
if dist.is_initialized():
    dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tensors(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_torchrun_two_ranks_equals_one_process(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    ddp = subprocess.Popen(
        [
            str(TORCHRUN),
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(script),
            str(tmp_path / "ddp"),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out, err = ddp.communicate(timeout=240)
    assert ddp.returncode == 0, err[-4000:]
    assert single.returncode == 0, single.stderr[-4000:]
    assert "RANK 0 WORLD 2 STEPS 5" in out and "RANK 1 WORLD 2 STEPS 5" in out
    assert "RANK 0 WORLD 1 STEPS 5" in single.stdout

    final = "adapter/adapter_model.safetensors"
    a, b = _tensors(tmp_path / "ddp" / final), _tensors(tmp_path / "single" / final)
    assert sorted(a) == sorted(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3  # it trained

    # Rank 0 alone wrote the files: one metrics line per step, not one per rank.
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_lines = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    for d, s in zip(lines, single_lines, strict=True):
        assert abs(d["loss"] - s["loss"]) <= 1e-5
    saved = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert saved == ["step-2", "step-4"]
    state = _tensors(tmp_path / "ddp" / "checkpoints" / "step-4" / "trainer_state.safetensors")
    assert {"rng.torch.0", "rng.torch.1"} <= set(state)  # each rank's RNG, gathered to rank 0
