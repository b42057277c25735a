"""`lorakit.train.sharding` in one process: a real gloo group of one rank, so FSDP2 runs for real.

The 2-rank behaviour (equality with one process and with DDP, kill and resume) is in
tests/cli/test_fsdp.py; here: what shard does to a model, what it refuses, and the sharded
checkpoint's round trip and its errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

import lorakit
from lorakit.errors import ConfigError, TrainingError
from lorakit.train import TrainConfig, build_optimizer, build_scheduler, gathered, is_sharded, shard
from lorakit.train.checkpoint import load_checkpoint, save_checkpoint
from lorakit.train.distributed import DistInfo
from lorakit.train.sharding import load_shards, save_shards, shard_units
from tests.conftest import clone, nf4_llama, randomize_adapters, tiny_llama

CFG = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _adapted(seed: int = 0, config: lorakit.LoraConfig = CFG) -> torch.nn.Module:
    model = tiny_llama(seed)
    lorakit.inject(model, config)
    randomize_adapters(model)
    return model


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.arange(12).reshape(2, 6) % 64
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_shard_needs_a_process_group():
    model = _adapted()
    with pytest.raises(ConfigError, match="process group"):
        shard(model)
    assert not is_sharded(model)


def test_shard_makes_each_block_a_unit_and_keeps_the_function(group):
    model = _adapted()
    reference = clone(model)
    units = shard_units(model)
    assert [type(u).__name__ for u in units] == ["LlamaDecoderLayer", "LlamaDecoderLayer"]
    shard(model)
    assert is_sharded(model) and all(is_sharded(u) for u in units)
    assert all(isinstance(p, DTensor) for p in model.parameters())  # the frozen base too
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with gathered(model):
        inside = dict(model.named_parameters())
        assert not any(isinstance(inside[n], DTensor) for n in trainable)
        want = dict(reference.named_parameters())
        for name in trainable:
            torch.testing.assert_close(inside[name], want[name], atol=0, rtol=0)
    assert all(isinstance(p, DTensor) for p in model.parameters())  # the shards are back


def test_shard_refusals_leave_the_model_as_it_was(group):
    model = _adapted()
    with pytest.raises(ConfigError, match=r"already on the CPU|on cpu"):
        shard(model, cpu_offload=True)
    assert not is_sharded(model) and not any(isinstance(p, DTensor) for p in model.parameters())
    shard(model)
    with pytest.raises(ConfigError, match="already sharded"):
        shard(model)

    nf4 = lorakit.quantize(nf4_llama(), "nf4")
    lorakit.inject(nf4, CFG)
    with pytest.raises(ConfigError, match=r"NF4.*strategy='ddp'"):
        shard(nf4)
    assert not is_sharded(nf4) and not any(isinstance(p, DTensor) for p in nf4.parameters())


def test_config_refuses_cpu_offload_without_fsdp():
    with pytest.raises(ConfigError, match="cpu_offload needs strategy='fsdp'"):
        TrainConfig(cpu_offload=True)
    with pytest.raises(ConfigError, match="strategy must be"):
        TrainConfig(strategy="zero3")  # type: ignore[arg-type]


def test_a_bf16_base_shards_and_trains(group):
    model = lorakit.quantize(tiny_llama(), "bf16")
    lorakit.inject(model, CFG)
    shard(model)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
    _step(model, optimizer)
    after = {n: p.detach().full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(after[n].dtype == torch.float32 for n in after)  # adapters in fp32 over the bf16 base


def test_sharded_state_round_trip(group, tmp_path: Path):
    model = _adapted()
    shard(model)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    _step(model, optimizer)
    plain = save_shards(tmp_path, model, optimizer)
    assert plain and all(not isinstance(v, torch.Tensor) for v in plain.values())

    fresh = _adapted(seed=1)
    shard(fresh)
    fresh_opt = build_optimizer(fresh, TrainConfig(lr=1e-2))
    load_shards(tmp_path, fresh, fresh_opt, plain)
    want = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.full_tensor(), want[name], atol=0, rtol=0)
    a, b = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            x, y = a[index][key], b[index][key]
            x = x.full_tensor() if isinstance(x, DTensor) else x
            y = y.full_tensor() if isinstance(y, DTensor) else y
            torch.testing.assert_close(y, x, atol=0, rtol=0)

    # Into a model with other trainable parameters: a clear error, nothing copied.
    other = _adapted(config=lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"]))
    shard(other)
    other_opt = build_optimizer(other, TrainConfig(lr=1e-2))
    snapshot = {n: p.full_tensor().clone() for n, p in other.named_parameters() if p.requires_grad}
    with pytest.raises(TrainingError, match=r"other trainable parameters.*k_proj"):
        load_shards(tmp_path, other, other_opt, plain)
    for name, param in other.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.full_tensor(), snapshot[name])


def test_an_unsharded_checkpoint_resumes_sharded(group, tmp_path: Path):
    cfg = TrainConfig(lr=1e-2, max_steps=4)
    plain_model = _adapted()
    optimizer = build_optimizer(plain_model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 4)
    _step(plain_model, optimizer)
    scheduler.step()
    state = {"step": 1, "epoch": 0, "batch": 1, "config": cfg.to_dict()}
    info = DistInfo()
    kwargs = {"adapter_name": "default", "keep": None, "info": info}
    path = save_checkpoint(tmp_path, state, model=plain_model, optimizer=optimizer, scheduler=scheduler, **kwargs)

    model = _adapted()
    randomize_adapters(model, seed=5)  # other adapter values than the checkpoint's, the same base
    shard(model)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 4)
    load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, info=info)
    want = dict(plain_model.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.full_tensor(), want[name].detach(), atol=0, rtol=0)
    assert opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    # One more step from each: the same parameters (the optimizer state came across too).
    _step(plain_model, optimizer)
    _step(model, opt)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.full_tensor(), want[name].detach(), atol=1e-6, rtol=1e-5)
    with pytest.raises(TrainingError, match="no sharded state"):
        load_shards(tmp_path / "nowhere", model, opt, {})


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_sharded_training_step_equals_the_plain_one(group, use_dora):
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora)
    plain = _adapted(config=config)
    sharded = clone(plain)
    shard(sharded)
    cfg = TrainConfig(lr=1e-2)
    for model in (plain, sharded):
        model.train()
        optimizer = build_optimizer(model, cfg)
        for _ in range(2):
            _step(model, optimizer)
    want = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}
    assert any("magnitude" in n for n in want) == use_dora
    for name, param in sharded.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.full_tensor(), want[name], atol=1e-6, rtol=1e-5)
