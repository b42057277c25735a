"""Preference tuning against TRL 1.16 + PEFT on a tiny LLaMA with SmolLM2's tokenizer and chat
template: the same batch of pairs gives the same loss, rewards, margin, accuracy and every LoRA
gradient (1e-5 relative) as `DPOTrainer` (sigmoid and ipo losses) and `ORPOTrainer`'s odds-ratio
term, with lorakit's kernels on and off.

TRL's trainers set every dropout to 0 (`disable_dropout=True`, the default); lorakit keeps an
adapter's `lora_dropout` in training, so lorakit's step runs here with the model in eval mode: the
adapters keep lora_dropout=0.05, and the computation compared is the same, dropout aside.

ORPO's NLL: TRL's `ORPOTrainer` averages it over the chosen rows' prompt *and* answer tokens (its
code says so); lorakit follows the ORPO paper and averages over the chosen answers' tokens. The test
takes TRL's odds-ratio term from its own code (`concatenated_forward`, `odds_ratio_loss`) and the
answers' NLL from transformers' own causal-LM loss, and checks that TRL's whole loss is that
odds-ratio term plus its prompt-and-answer NLL.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from datasets import Dataset
from peft import get_peft_model, set_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

import lorakit
from lorakit.data.examples import Example
from lorakit.data.preference import PreferencePair, tokenize_pairs
from lorakit.models import load_tokenizer
from lorakit.state import lora_layers
from lorakit.train.preference_step import preference_step
from tests.conftest import randomize_adapters

BOUND = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": TARGETS}
PAIRS = [
    ("Name a colour.", "Blue.", "I would rather not say which colour I like."),
    ("What is 2 + 2?", "2 + 2 = 4.", "5"),
    ("Say hello in French.", "Bonjour !", "Hello."),
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def _records() -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in PAIRS
    ]


def _dataset(tok):
    pairs = []
    for record in _records():
        examples = [
            Example("", "", messages=tuple(record["prompt"] + record[key]), prompt_messages=1)
            for key in ("chosen", "rejected")
        ]
        pairs.append(PreferencePair(*examples))
    return tokenize_pairs(pairs, tok, 256)


def _models(tok):
    """(lorakit's model, the base): one random tiny LLaMA, LoRA on every linear layer, B ≠ 0."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    base = LlamaForCausalLM(config)
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**LORA))
    randomize_adapters(ours, scale=0.5)
    return ours.eval(), base


def _copy_to_peft(ours, theirs, name: str = "default") -> None:
    """lorakit's adapter `name` into PEFT's adapter of that name."""
    state = {
        f"base_model.model.{path}.{suffix}": t
        for path, layer in lora_layers(ours)
        for suffix, t in layer.peft_tensors(name).items()
    }
    assert not set_peft_model_state_dict(theirs, state, adapter_name=name).unexpected_keys


def _lorakit_grads(model) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{part}": getattr(layer.adapters["default"], part).grad
        for path, layer in lora_layers(model)
        for part in ("lora_A", "lora_B")
    }


def _peft_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.requires_grad:
            path, part = name.removeprefix("base_model.model.").split(".lora_")
            grads[f"{path}.lora_{part.split('.')[0]}"] = p.grad
    return grads


def _close(ours: float | torch.Tensor, theirs: float | torch.Tensor, what: str, scale: float | None = None) -> None:
    """|ours − theirs| ≤ BOUND × scale (default: max |theirs|)."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    diff = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max()) if scale is None else scale
    assert diff <= BOUND * scale, (
        f"{what}: lorakit {ours.flatten()[:4].tolist()} vs TRL {theirs.flatten()[:4].tolist()}"
    )


def _close_rewards(metrics: dict, logged: dict, beta: float, chosen: str, rejected: str) -> None:
    """Rewards are β times differences of sums of tens of log-probabilities, so float32 rounds them
    at the scale of those sums: each is held to BOUND × β × the largest mean sum TRL logged."""
    scale = beta * max(abs(logged[chosen]), abs(logged[rejected]))
    _close(metrics["rewards_chosen"], logged["rewards/chosen"], "rewards_chosen", scale)
    _close(metrics["rewards_rejected"], logged["rewards/rejected"], "rewards_rejected", scale)
    _close(metrics["margin"], logged["rewards/margins"], "margin", scale)


def _assert_same_grads(ours, theirs) -> None:
    a, b = _lorakit_grads(ours), _peft_grads(theirs)
    assert a.keys() == b.keys() and len(a) == 2 * 2 * len(TARGETS)
    for name in a:
        assert b[name].abs().max() > 0, name
        _close(a[name], b[name], name)


@pytest.mark.parametrize(
    ("method", "loss_type", "beta", "start"),
    [("dpo", "sigmoid", 0.5, "fresh"), ("ipo", "ipo", 0.3, "fresh"), ("dpo", "sigmoid", 0.5, "from-adapter")],
)
def test_dpo_and_ipo_match_trl_dpo_trainer(tmp_path, tok, method, loss_type, beta, start):
    """`fresh`: TRL given the base and a `peft_config` (its reference: the adapter disabled), lorakit
    an injected adapter. `from-adapter`: TRL given a `PeftModel` copies its adapter as a frozen "ref"
    (the reference), as lorakit's `--init-adapter` loads it; then both policies move away from it."""
    ds = _dataset(tok)
    ours, base = _models(tok)
    args = DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=3, beta=beta, loss_type=[loss_type],
        report_to=[], use_cpu=True, max_length=None, logging_steps=1,
    )  # fmt: skip
    records = Dataset.from_list(_records())
    if start == "fresh":
        trainer = DPOTrainer(
            model=base, args=args, train_dataset=records, processing_class=tok, peft_config=peft.LoraConfig(**LORA)
        )
        _copy_to_peft(ours, trainer.model)
    else:
        theirs = get_peft_model(base, peft.LoraConfig(**LORA))
        _copy_to_peft(ours, theirs)
        trainer = DPOTrainer(model=theirs, args=args, train_dataset=records, processing_class=tok)
        assert "ref" in trainer.model.peft_config
        lorakit.save_adapter(ours, tmp_path / "initial")
        lorakit.load_adapter(ours, tmp_path / "initial", "ref")
        randomize_adapters(ours, seed=11, scale=0.5)  # both policies leave the initial adapter alike
        _copy_to_peft(ours, trainer.model)
        with torch.no_grad():  # randomize_adapters drew "ref" too: put lorakit's back to the initial values
            lorakit.delete_adapter(ours, "ref")
            lorakit.load_adapter(ours, tmp_path / "initial", "ref")
        ours.eval()
    trainer.model.train()
    batch = ds.collate(range(len(ds)))
    trl_batch = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    trl_loss = trainer._compute_loss(trainer.model, trl_batch, False)
    trl_loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    result = preference_step(ours, [batch], None, method=method, beta=beta)
    _close(result.loss, float(trl_loss.detach()), "loss")
    _close_rewards(result.metrics, logged, beta, "logps/chosen", "logps/rejected")
    assert result.metrics["accuracy"] == pytest.approx(logged["rewards/accuracies"])
    assert abs(result.metrics["margin"]) > 1e-4  # the policy is not the reference: the comparison is not at 0
    _assert_same_grads(ours, trainer.model)


def test_orpo_matches_trl_orpo_trainers_odds_ratio_term_and_the_answers_nll(tmp_path, tok):
    ds = _dataset(tok)
    ours, base = _models(tok)
    lam = 0.25
    strings = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    args = ORPOConfig(output_dir=str(tmp_path), beta=lam, report_to=[], use_cpu=True, max_length=256)
    trainer = ORPOTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_list(strings),
        processing_class=tok,
        peft_config=peft.LoraConfig(**LORA),
    )
    model = trainer.model
    _copy_to_peft(ours, model)
    model.train()
    pairs = len(ds)
    rows = ds.collate(range(pairs))
    trl_batch = {
        "chosen_input_ids": rows["input_ids"][:pairs],
        "chosen_attention_mask": rows["attention_mask"][:pairs],
        "chosen_labels": rows["labels"][:pairs],
        "rejected_input_ids": rows["input_ids"][pairs:],
        "rejected_attention_mask": rows["attention_mask"][pairs:],
        "rejected_labels": rows["labels"][pairs:],
    }
    chosen_logps, rejected_logps, _, _, trl_nll = trainer.concatenated_forward(model, trl_batch)
    losses, chosen_rewards, _, _, _ = trainer.odds_ratio_loss(chosen_logps, rejected_logps)
    odds_term = -losses.mean()
    answers_nll = model(
        input_ids=trl_batch["chosen_input_ids"],
        attention_mask=trl_batch["chosen_attention_mask"],
        labels=trl_batch["chosen_labels"],
    ).loss  # transformers' own causal-LM loss: the mean over the chosen answers' tokens
    (odds_term + answers_nll).backward()
    whole, logged = trainer.get_batch_loss_metrics(model, trl_batch)
    # TRL's own loss is its odds-ratio term plus an NLL over the prompts too, which differs from the answers'.
    _close(float(whole.detach()), float((odds_term + trl_nll).detach()), "TRL's loss = odds term + its NLL")
    assert abs(float(trl_nll.detach()) - float(answers_nll.detach())) > 1e-3

    result = preference_step(ours, [rows], None, method="orpo", beta=lam)
    _close(result.metrics["nll"], float(answers_nll.detach()), "nll of the chosen answers")
    _close(result.loss, float((odds_term + answers_nll).detach()), "loss")
    _close_rewards(result.metrics, logged, lam, "logps/chosen", "logps/rejected")
    _close(
        result.metrics["rewards_chosen"],
        float(chosen_rewards.mean()),
        "rewards_chosen",
        lam * float(chosen_logps.abs().max()),
    )
    assert result.metrics["accuracy"] == pytest.approx(logged["rewards/accuracies"])
    _assert_same_grads(ours, model)
