"""A whole `lorakit train` run small enough to repeat dozens of times in one test.

`tiny_model(folder)` writes a transformers LLaMA directory (one block, hidden 16, seeded random
weights) with its own word-level tokenizer over the words of `tiny_data`'s records, so loading it
costs milliseconds where SmolLM2's 49k-token tokenizer costs half a second. `run_settings` are the
settings of a short run that writes every kind of file a run writes: the lock, run_config.json,
metrics.jsonl (a line a step), two checkpoints (one pruned by keep_checkpoints), evaluations, the
adapter, loss.png and summary.json. The fault-injection tests and `benchmarks/reliability.py`
share them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from lorakit.config import LoraConfig
from lorakit.train.config import TrainConfig
from lorakit.train.run import TrainRun

WORDS = ("what", "is", "plus", "times", "minus", "the", "answer", "question", ":", "?", ".")
SPECIAL = ("<unk>", "<pad>", "<|endoftext|>")


def tiny_data(path: Path, rows: int = 24) -> Path:
    """`rows` text records of small sums, as JSONL (plain text: no chat template needed)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            a, b = i % 10, (3 * i) % 10
            record = {"text": f"question : what is {a} plus {b} ? the answer is {a + b} ."}
            f.write(json.dumps(record) + "\n")
    return path


def tiny_model(folder: Path, seed: int = 0) -> Path:
    """A one-block LLaMA (hidden 16, seeded) and a word-level tokenizer, as a transformers directory."""
    if (folder / "config.json").is_file():
        return folder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL, *WORDS, *(str(n) for n in range(19))))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>"
    )
    # Plain text needs no template, but lorakit.data.chat refuses a tokenizer without one even when
    # no record is a conversation.
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<pad>"],
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def run_settings(model: Path, data: Path, out: Path, **train: object) -> tuple[TrainRun, LoraConfig, TrainConfig]:
    """A 4-step run: a metrics line every step, evaluations at steps 2 and 4, checkpoints at 2 and 4
    (the newest one kept), then the adapter, loss.png and summary.json. `train` overrides
    `TrainConfig` fields."""
    run = TrainRun(
        model=str(model),
        data=str(data),
        out=str(out),
        samples=0,
        eval_max_rows=4,
        seq_len=24,
        progress=False,
        threads=1,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    settings = {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "save_every": 2, "eval_every": 2}
    settings.update({"keep_checkpoints": 1, "seed": 0, **train})
    return run, lora, TrainConfig(**settings)


@contextlib.contextmanager
def threads_kept() -> Iterator[None]:
    """Put torch's thread count back afterwards: `train_run` sets it for the process (`threads=1`)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
