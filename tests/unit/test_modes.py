"""`lorakit.modes.evaluating`, and the commands' forwards run in eval mode whatever the caller did."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import data as D
from lorakit.evaluate import loss_on
from lorakit.generate import Decoding, generate
from lorakit.models import load_tokenizer
from lorakit.modes import evaluating
from lorakit.quantization import quantize
from tests.conftest import randomize_adapters, tiny_llama


def test_evaluating_restores_each_modules_own_mode_also_on_error():
    model = tiny_llama().train()
    model.model.layers[0].eval()  # a part the user keeps in eval mode
    before = {name: m.training for name, m in model.named_modules()}
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == before
    with pytest.raises(RuntimeError, match="boom"), evaluating(model):
        raise RuntimeError("boom")
    assert {name: m.training for name, m in model.named_modules()} == before


def test_quantize_keeps_each_layers_mode():
    model = tiny_llama().eval()
    quantize(model, "bf16")
    assert not any(m.training for m in model.modules())
    lorakit.quantization.dequantize(model.train())
    assert all(m.training for m in model.modules())


@pytest.fixture(scope="module")
def training_with_dropout():
    """A model in training mode with a random q,v adapter of dropout 0.3 (a user's model
    mid-training), and the packaged tokenizer: a 2-layer LLaMA of hidden 16 over the tokenizer's
    vocabulary, whose adapter (random A and B at scale 0.5) moves the logits enough that any
    dropout in a forward changes the loss."""
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.5)
    return model.train(), tokenizer


def test_generate_and_loss_run_in_eval_mode_from_a_training_model(training_with_dropout):
    model, tokenizer = training_with_dropout
    prompts = ["name[The Eagle], food[French] =>", "Hello"]
    examples = D.load_examples("e2e-dev", tokenizer=tokenizer)[:6]
    dataset = D.tokenize_examples(examples, tokenizer, 64)
    runs = [
        (
            generate(model, tokenizer, prompts, Decoding(max_new_tokens=6, do_sample=True, seed=3)),
            loss_on(model, dataset, 3),
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]  # no dropout: sampling with one seed and the loss repeat exactly
    assert all(m.training for m in model.modules())  # the caller's mode comes back
    with evaluating(model):
        assert loss_on(model, dataset, 3) == runs[0][1]
