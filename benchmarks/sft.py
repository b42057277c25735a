"""Chat SFT on Alpaca: lorakit against TRL's `SFTTrainer` + PEFT, trained on the same tokens (issue 27).

The question: on a real chat fine-tuning job, how many trained tokens a second does each side
reach, how much memory does it hold, and does it learn as much? Every row trains SmolLM2-135M-Instruct
(the packaged `smollm2-135m`, fp32 weights) with LoRA on every linear layer but the head (q, k, v,
o, gate, up, down; r=16, α=32, dropout 0.05), AdamW at lr 2e-4 with TRL's (transformers') defaults
for the rest — linear decay to 0, no warmup, no weight decay, betas (0.9, 0.999), eps 1e-8,
gradient norm clipped to 1.0 — seed 0, one epoch over the same examples in the same order.

Data (written once into `<workdir>/data/`; Alpaca is CC BY-NC, never bundled):

- `/work/shared/data/alpaca/alpaca_5000.json` as chat `messages` (user = instruction, plus a blank
  line and the input when there is one; assistant = output), rendered with SmolLM2's own chat
  template (which adds its default system prompt). 200 records are held out (a sample fixed by
  `--seed`), the other 4,800 kept in file order: `train.jsonl`, `heldout.jsonl`.
- The training examples are the first `--steps × --batch` records of `train.jsonl` that fit in
  `--seq-len` tokens (`subset.jsonl`; how many longer ones were passed over is printed), so no row
  truncates anything and every row trains exactly the same tokens.
- What trains: every assistant reply and its end-of-turn token `<|im_end|>`, not the newline the
  template writes after it. lorakit: `lorakit.data` reads `subset.jsonl` (its `messages` format,
  `train_on="assistant"`, `train_on_eos=True`). TRL: `datasets.Dataset.from_list` of the same
  records (its conversational format) with `assistant_only_loss=True`. SmolLM2's template has no
  `{% generation %}` markers and TRL 1.16 refuses to patch it (the refusal is printed and saved), so
  TRL gets the template with the markers put around each reply and its `<|im_end|>` through
  `chat_template_path` (`smollm2_generation.jinja`) — the same text, checked record by record. (TRL's
  other route, prompt/completion records with `completion_only_loss`, would also train the newline
  after `<|im_end|>`: one token more per example; its count is printed beside the others.) The
  benchmark checks that TRL's prepared dataset holds the same token ids and labels as lorakit's
  tokenisation, example by example (packed: the same examples in its rows), and prints the trained
  tokens of the first three examples on both sides.

Order and steps. Unpacked rows read batches of `--batch` examples in file order (TRL:
`train_sampling_strategy="sequential"`, `shuffle_dataset=False`; lorakit: `iterate_batches(...,
shuffle=False)`), so both take the very same batches, `--steps` optimizer steps (by default 40 steps
of 8: 320 examples, about 34k tokens of which 19k train, 66k padded places). Packed rows pack the
same examples into rows of `--seq-len` tokens by best-fit decreasing (both sides; TRL's `bfd`
strategy, lorakit's `packed_rows(shuffle=False)`), R rows in all, and read them in order,
`ceil(R / steps)` rows a step — so they consume the same examples in about the same number of
steps (the table gives each row's count). Throughput is therefore compared as trained tokens (the
positions with a target, the same for every row) per second of training, which packing does not
change.

Rows, each in its own process (a fresh interpreter, `--threads` torch threads, `OMP_NUM_THREADS`,
`OMP_WAIT_POLICY=PASSIVE` for every row alike, glibc's mmap threshold fixed at 128 kB so freed
blocks go back to the system):

- `trl-default`: `SFTTrainer(model=<path>, peft_config=LoraConfig(...))` with TRL's defaults:
  padded batches (to the longest in the batch), gradient checkpointing on, bf16 autocast
  (`bf16=None` resolves to True, on CPU too), its fused LM-head loss (log-probabilities in chunks,
  no full logits).
- `trl-packing`: the same with `packing=True` (TRL's default strategy `bfd`, which turns on
  padding-free: a batch's rows are flattened into one sequence with position ids, from which SDPA
  builds a block-diagonal mask).
- `trl-padding-free`: `padding_free=True` without packing: each batch of `--batch` examples
  flattened into one sequence (TRL refuses it with a `max_length`, so `max_length=None`; nothing is
  longer than `--seq-len` anyway).
- `lorakit-padded`: `lorakit.models.load_model`, `lorakit.inject`, `lorakit.train.fit` on
  right-padded batches: fp32, chunked loss, lorakit's kernels, no checkpointing (lorakit's defaults).
- `lorakit-packed`: the same with `packing=True`: the packed rows, position ids restarting per
  example, a block-diagonal mask per row through SDPA.
- `lorakit-packed-ckpt`: `lorakit-packed` with lorakit's gradient checkpointing (TRL's default
  checkpoints too).

`--precision` chooses the arithmetic: `defaults` (each tool's own: TRL bf16 autocast, lorakit
fp32), `fp32` (TRL `bf16=False`) or `bf16` (lorakit `autocast="bf16"` too).

Measured in each training child:

- training seconds: from just before `trainer.train()` / `fit()` to the end of the last optimizer
  step (a `TrainerCallback.on_step_end` / fit's `on_step`): optimizer and dataloader set-up, every
  step and each tool's own logging; not the model load, the data preparation (tokenising, packing)
  or saving the adapter. Trained tokens per second = trained tokens / training seconds.
- peak RSS above the post-import baseline: VmHWM at the end of training minus VmRSS right after
  the child's imports (torch, transformers and the tool), with VmHWM reset just before training
  starts (after the model load and the data preparation, which are not counted as peaks but whose
  result — weights, dataset — is resident and counted). The RSS at the start of training is in
  the JSON (`ready_mib`) but not a measure of the training's own memory: transformers 5 maps an
  fp32 safetensors checkpoint loaded as fp32 without copying, so TRL's frozen weights are file pages
  that enter the resident set during the first step (lorakit's loader reads them into memory).

Then, in a fresh process per row (and once for the base model alone), the same code for every row:
transformers' `from_pretrained` (fp32) + PEFT's `PeftModel.from_pretrained` of the row's saved adapter
(lorakit saves PEFT's format), eval mode, and

- held-out loss: the mean cross entropy per trained token over the 200 held-out examples (cut at
  `--seq-len`), labels as above, batches of 8, full logits in fp32;
- three held-out instructions answered greedily, 64 new tokens.

Goals (issue 27): lorakit packed ≥ 2× the trained tokens/s of `trl-default` and ≥ 1.3× the best
TRL row; peak RSS ≤ 0.6× `trl-default`'s; held-out loss within 2% of TRL's (lorakit-padded against
trl-default, lorakit-packed against trl-packing: the same batches).

Usage:
    .venv/bin/python benchmarks/sft.py --quick                    # ~3 steps, small: checks every row runs
    .venv/bin/python benchmarks/sft.py --out benchmarks/results/sft.json   # about 1-1.5 h on 2 quiet cores
    .venv/bin/python benchmarks/sft.py --rows lorakit-packed,lorakit-packed-ckpt,trl-default

Nothing here runs in CI. The numbers are only as quiet as the machine is.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _report

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
MIB = 1024  # kB per MiB (/proc/self/status counts kB)

ROWS: dict[str, dict[str, Any]] = {
    "trl-default": {"tool": "trl"},
    "trl-packing": {"tool": "trl", "packing": True},
    "trl-padding-free": {"tool": "trl", "padding_free": True},
    "lorakit-padded": {"tool": "lorakit"},
    "lorakit-packed": {"tool": "lorakit", "packing": True},
    "lorakit-packed-ckpt": {"tool": "lorakit", "packing": True, "grad_checkpointing": True},
}
DEFAULT_ROWS = tuple(ROWS)
# The row each lorakit row's held-out loss is held to: the TRL row that reads the same batches.
SAME_BATCHES = {"lorakit-padded": "trl-default", "lorakit-packed": "trl-packing", "lorakit-packed-ckpt": "trl-packing"}

# SmolLM2-135M-Instruct's chat template with `{% generation %}` around each assistant reply and its
# `<|im_end|>` (not the newline after it): what TRL's `assistant_only_loss` needs. It renders the same
# text as the original (`prepare` checks every record).
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- memory and files


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> None:
    """Reset this process's VmHWM to its current resident set (Linux: clear_refs 5)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _trained(labels: list[int]) -> int:
    """Positions with a target: labelled tokens after an example's first (never a target)."""
    return sum(1 for label in labels[1:] if label != -100)


# ----------------------------------------------------------------------------- the data, once


def _chat(record: dict[str, str]) -> list[dict[str, str]]:
    user = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write the data files, tokenise with lorakit, check TRL's masks against it; the children's spec."""
    from lorakit import data as D
    from lorakit.data.packing import num_rows
    from lorakit.models import ensure_cached, load_tokenizer

    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    held = set(random.Random(f"sft-heldout:{args.seed}").sample(range(len(records)), args.heldout))
    train = [{"messages": _chat(r)} for i, r in enumerate(records) if i not in held]
    heldout = [{"messages": _chat(r)} for i, r in enumerate(records) if i in held]
    _write_jsonl(data_dir / "train.jsonl", train)
    _write_jsonl(data_dir / "heldout.jsonl", heldout)

    tokenizer = load_tokenizer(args.model)
    wanted = args.steps * args.batch
    # Tokenise (without a length limit) only as far as needed to find `wanted` records that fit.
    subset: list[dict[str, Any]] = []
    passed_over, looked = 0, 0
    chunk = max(64, wanted)
    while len(subset) < wanted and looked < len(train):
        part = train[looked : looked + chunk]
        path = data_dir / "probe.jsonl"
        _write_jsonl(path, part)
        ds = D.tokenize_examples(D.load_examples(str(path), tokenizer=tokenizer), tokenizer, 10**6)
        for record, ids in zip(part, ds.input_ids, strict=True):
            if len(subset) == wanted:
                break
            if len(ids) <= args.seq_len:
                subset.append(record)
            else:
                passed_over += 1
        looked += len(part)
    (data_dir / "probe.jsonl").unlink(missing_ok=True)
    if len(subset) < wanted:
        raise SystemExit(f"only {len(subset)} of the {len(train)} training records fit in {args.seq_len} tokens")
    _write_jsonl(data_dir / "subset.jsonl", subset)

    # lorakit's tokenisation of what the children read: every row is checked against it.
    train_ds = D.tokenize_examples(
        D.load_examples(str(data_dir / "subset.jsonl"), tokenizer=tokenizer), tokenizer, args.seq_len
    )
    with warnings.catch_warnings():  # the held-out examples cut at seq_len are counted in the summary line
        warnings.simplefilter("ignore")
        held_ds = D.tokenize_examples(
            D.load_examples(str(data_dir / "heldout.jsonl"), tokenizer=tokenizer), tokenizer, args.seq_len
        )
    if held_ds.dropped:
        print(f"  note: {held_ds.dropped} held-out examples kept no trained token within {args.seq_len} tokens")
    template = data_dir / "smollm2_generation.jinja"
    template.write_text(GENERATION_TEMPLATE, encoding="utf-8")
    check = _check_masks(tokenizer, subset, train_ds)
    rows = num_rows(train_ds)
    rows_per_step = math.ceil(rows / args.steps)
    tokens = {
        "train": [[ids, labels] for ids, labels in zip(train_ds.input_ids, train_ds.labels, strict=True)],
        "heldout": [[ids, labels] for ids, labels in zip(held_ds.input_ids, held_ds.labels, strict=True)],
    }
    (data_dir / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
    prompts = [r["messages"][0]["content"] for r in heldout[: args.answers]]
    return {
        "model_dir": str(ensure_cached(args.model)),
        "subset": str(data_dir / "subset.jsonl"),
        "tokens": str(data_dir / "tokens.json"),
        "template": str(template),
        "examples": len(subset),
        "passed_over": passed_over,
        "train_tokens": sum(len(ids) for ids in train_ds.input_ids),
        "trained_tokens": sum(_trained(labels) for labels in train_ds.labels),
        "heldout_examples": len(held_ds.input_ids),
        "heldout_truncated": held_ds.truncated,
        "packed_rows": rows,
        "rows_per_step": rows_per_step,
        "prompts": prompts,
        "mask_check": check,
        **{k: getattr(args, k) for k in ("seq_len", "batch", "steps", "lr", "seed", "threads", "precision")},
        **{k: getattr(args, k) for k in ("eval_examples", "max_new_tokens", "eval_batch")},
    }


def _check_masks(tokenizer: Any, subset: list[dict[str, Any]], train_ds: Any) -> dict[str, Any]:
    """TRL's masks beside lorakit's: the generation template renders the same text and, through
    transformers' `return_assistant_tokens_mask`, labels the same tokens; what TRL 1.16 says of
    SmolLM2's own template; what its prompt/completion route would train."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
        refusal = None
    except ValueError as err:
        refusal = str(err)
    same_text = same_tokens = 0
    first: list[dict[str, Any]] = []
    for index, record in enumerate(subset):
        messages = record["messages"]
        if tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=GENERATION_TEMPLATE
        ):
            same_text += 1
        out = tokenizer.apply_chat_template(
            messages, chat_template=GENERATION_TEMPLATE, return_dict=True, return_assistant_tokens_mask=True
        )
        labels = [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True)]
        if out["input_ids"] == train_ds.input_ids[index] and labels == train_ds.labels[index]:
            same_tokens += 1
        if index < 3:
            prompt_ids = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)
            whole = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
            first.append(
                {
                    "lorakit": _trained(train_ds.labels[index]),
                    "trl_assistant_only": _trained(labels),
                    "trl_prompt_completion": len(whole) - len(prompt_ids["input_ids"]),
                    "lorakit_trained_text_end": tokenizer.decode([t for t in train_ds.labels[index] if t != -100][-4:]),
                    "prompt_completion_text_end": tokenizer.decode(whole[-4:]),
                }
            )
    return {
        "records": len(subset),
        "same_text": same_text,
        "same_ids_and_labels": same_tokens,
        "first_examples": first,
        "smollm2_template_refusal": refusal,
    }


# ----------------------------------------------------------------------------- training children


def _timer_callback(times: list[float]):
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    return StepTimes()


def child_trl(spec: dict[str, Any], row: dict[str, Any], out: Path) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from trl import SFTConfig, SFTTrainer

    baseline = _status_kib("VmRSS")
    torch.set_num_threads(spec["threads"])
    packing, padding_free = row.get("packing", False), row.get("padding_free", False)
    precision = {"defaults": {}, "fp32": {"bf16": False}, "bf16": {"bf16": True}}[spec["precision"]]
    config = SFTConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=spec["rows_per_step"] if packing else spec["batch"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        num_train_epochs=1,
        max_length=None if padding_free else spec["seq_len"],
        packing=packing,
        padding_free=padding_free,
        assistant_only_loss=True,
        chat_template_path=spec["template"],
        train_sampling_strategy="sequential",
        seed=spec["seed"],
        data_seed=spec["seed"],
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        **precision,
    )
    lora = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    dataset = datasets.Dataset.from_list(_read_jsonl(Path(spec["subset"])))
    times: list[float] = []
    trainer = SFTTrainer(
        model=spec["model_dir"],
        args=config,
        train_dataset=dataset,
        peft_config=lora,
        callbacks=[_timer_callback(times)],
    )
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ready = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    trainer.train()
    peak = _status_kib("VmHWM")
    trainer.save_model(str(out / "adapter"))

    prepared = trainer.train_dataset
    check = _check_trl_dataset(prepared, spec, packed=packing)
    impl = getattr(model.config, "_attn_implementation", None)
    layout = (
        f"bfd-packed rows of {spec['seq_len']}, {spec['rows_per_step']}/step, flattened (padding-free)"
        if packing
        else "padding-free (each batch flattened)"
        if padding_free
        else "padded"
    )
    ran = (
        f"SFTTrainer: {layout}, {'bf16 autocast' if config.bf16 else 'fp32'}, "
        f"{'grad checkpointing' if config.gradient_checkpointing else 'no checkpointing'}, "
        f"fused LM-head loss, {impl}"
    )
    return {
        "ran": ran,
        "steps": trainer.state.global_step,
        "step_ends_s": [t - start for t in times],
        "train_s": times[-1] - start,
        "baseline_mib": baseline / MIB,
        "ready_mib": ready / MIB,
        "peak_mib": peak / MIB,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB,
        "trainable": trainable,
        "bf16": bool(config.bf16),
        "grad_checkpointing": bool(config.gradient_checkpointing),
        "padding_free": bool(trainer.padding_free),
        "attention": impl,
        "log_history": trainer.state.log_history,
        "versions": {
            "trl": trl.__version__,
            "peft": peft.__version__,
            "datasets": datasets.__version__,
            "transformers": transformers.__version__,
        },
        **check,
    }


def _check_trl_dataset(prepared: Any, spec: dict[str, Any], *, packed: bool) -> dict[str, Any]:
    """TRL's prepared training data against lorakit's tokenisation: the same examples, ids and labels."""
    expected = json.loads(Path(spec["tokens"]).read_text(encoding="utf-8"))["train"]
    got: list[list[list[int]]] = []
    for item in prepared:
        ids, labels = list(item["input_ids"]), list(item["labels"])
        if packed:  # split a packed row back into its examples
            at = 0
            for length in item["seq_lengths"]:
                got.append([ids[at : at + length], labels[at : at + length]])
                at += length
        else:
            got.append([ids, labels])
    # Packed rows hold the examples in best-fit order: compare them as multisets.
    same = sorted(map(json.dumps, got)) == sorted(map(json.dumps, expected)) if packed else got == expected
    return {
        "examples": len(got),
        "trained_tokens": sum(_trained(labels) for _, labels in got),
        "rows": len(prepared),
        "same_as_lorakit": same,
        "first_trained": None if packed else [_trained(labels) for _, labels in got[:3]],
    }


def child_lorakit(spec: dict[str, Any], row: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch
    import transformers

    import lorakit
    from lorakit import LoraConfig, inject
    from lorakit import data as D
    from lorakit.data.packing import num_rows
    from lorakit.kernels.switch import enabled
    from lorakit.models import load_model
    from lorakit.train import TrainConfig, fit

    baseline = _status_kib("VmRSS")
    torch.set_num_threads(spec["threads"])
    packing, ckpt = row.get("packing", False), row.get("grad_checkpointing", False)
    autocast = "bf16" if spec["precision"] == "bf16" else "none"
    model, tokenizer, _ = load_model(spec["model_dir"])
    examples = D.load_examples(spec["subset"], tokenizer=tokenizer)
    dataset = D.tokenize_examples(examples, tokenizer, spec["seq_len"])
    inject(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = spec["rows_per_step"] if packing else spec["batch"]
    config = TrainConfig(
        lr=spec["lr"],
        weight_decay=0.0,
        schedule="linear",
        warmup_steps=0,
        epochs=1,
        batch_size=batch,
        max_grad_norm=1.0,
        seed=spec["seed"],
        save_every=None,
        loss="chunked",
        grad_checkpointing=ckpt,
        autocast=autocast,
        packing=packing,
    )
    per_epoch = D.num_batches(dataset, batch, packing=packing)

    def batches(epoch: int, start: int):
        return D.iterate_batches(
            dataset, batch, seed=spec["seed"], epoch=epoch, start=start, shuffle=False, packing=packing
        )

    times: list[float] = []
    ready = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    result = fit(
        model,
        batches,
        config,
        out / "lorakit",
        batches_per_epoch=per_epoch,
        on_step=lambda step, record: times.append(time.perf_counter()),
        progress=False,
    )
    peak = _status_kib("VmHWM")
    shutil.copytree(result.adapter_dir, out / "adapter")
    expected = json.loads(Path(spec["tokens"]).read_text(encoding="utf-8"))["train"]
    mine = [[ids, labels] for ids, labels in zip(dataset.input_ids, dataset.labels, strict=True)]
    impl = getattr(model.config, "_attn_implementation", None)
    layout = f"BFD-packed rows of {spec['seq_len']}, {batch}/step, block-diagonal mask" if packing else "padded"
    ran = (
        f"fit: {layout}, {'bf16 autocast' if autocast == 'bf16' else 'fp32'}, "
        f"{'grad checkpointing' if ckpt else 'no checkpointing'}, chunked loss, "
        f"kernels {'on' if enabled('gated_mlp') else 'off'}, {impl}"
    )
    losses = [
        json.loads(line)["loss"]
        for line in (out / "lorakit" / "metrics.jsonl").read_text().splitlines()
        if line.strip() and "loss" in json.loads(line)
    ]
    return {
        "ran": ran,
        "steps": result.steps,
        "step_ends_s": [t - start for t in times],
        "train_s": times[-1] - start,
        "baseline_mib": baseline / MIB,
        "ready_mib": ready / MIB,
        "peak_mib": peak / MIB,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB,
        "trainable": trainable,
        "examples": len(mine),
        "trained_tokens": sum(_trained(labels) for _, labels in mine),
        "rows": num_rows(dataset) if packing else len(mine),
        "same_as_lorakit": mine == expected,
        "first_trained": [_trained(labels) for _, labels in mine[:3]],
        "attention": impl,
        "train_losses": losses,
        "versions": {"lorakit": lorakit.__version__, "transformers": transformers.__version__},
    }


# ----------------------------------------------------------------------------- evaluation child


def child_eval(spec: dict[str, Any], adapter: Path | None) -> dict[str, Any]:
    """Held-out loss and greedy answers of the base model plus `adapter` (PEFT), the same for every row."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    rows = json.loads(Path(spec["tokens"]).read_text(encoding="utf-8"))["heldout"][: spec["eval_examples"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    started = time.perf_counter()
    with torch.no_grad():
        for at in range(0, len(rows), spec["eval_batch"]):
            part = rows[at : at + spec["eval_batch"]]
            width = max(len(ids) for ids, _ in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            labels = torch.full((len(part), width), -100, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, (row_ids, row_labels) in enumerate(part):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                labels[i, : len(row_labels)] = torch.tensor(row_labels)
                mask[i, : len(row_ids)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(nll)
            count += int((targets != -100).sum())
    loss_s = time.perf_counter() - started
    answers = []
    for prompt in spec["prompts"]:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=spec["max_new_tokens"], do_sample=False, pad_token_id=pad)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return {"loss": total / count, "tokens": count, "examples": len(rows), "loss_s": loss_s, "answers": answers}


# ----------------------------------------------------------------------------- the parent


def _child_env(threads: int) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same for every row (lorakit would set it for itself)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks"), env.get("PYTHONPATH", "")])
    return env


def run_child(
    kind: str, name: str, folder: Path, spec_path: Path, args: argparse.Namespace, adapter: Path | None = None
) -> dict[str, Any]:
    """Run one child; its result, or `{"error": ...}` with the end of its output."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    argv = [sys.executable, __file__, "--child", kind, "--row", name, "--spec", str(spec_path), "--dir", str(folder)]
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    started = time.perf_counter()
    with open(folder / "log.txt", "wb") as log:
        try:
            proc = subprocess.run(
                argv, env=_child_env(args.threads), stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {args.timeout:.0f} s"
    result_path = folder / "result.json"
    if rc == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-15:]
        errors = [line for line in tail if re.match(r"^\w*(Error|Exception)\b|^\w+Error:", line)]
        result = {"error": (errors[-1] if errors else f"exit {rc}")[:400], "log_tail": tail, "rc": rc}
    result["wall_s"] = time.perf_counter() - started
    return result


def summarise(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """A row over its repeats: the first's counts, the medians of its rate and peak."""
    ok = [r for r in repeats if "error" not in r]
    if not ok:
        return {"error": repeats[0]["error"], "repeats": repeats}
    first = ok[0]
    rates = [r["trained_tokens"] / r["train_s"] for r in ok]
    return {
        "ran": first["ran"],
        "steps": first["steps"],
        "examples": first["examples"],
        "trained_tokens": first["trained_tokens"],
        "rows": first["rows"],
        "same_as_lorakit": all(r["same_as_lorakit"] for r in ok),
        "first_trained": first["first_trained"],
        "trainable": first["trainable"],
        "versions": first["versions"],
        "train_s": statistics.median(r["train_s"] for r in ok),
        "tokens_per_s": statistics.median(rates),
        "peak_above_baseline_mib": statistics.median(r["peak_mib"] - r["baseline_mib"] for r in ok),
        "repeats": repeats,
    }


def _fmt(x: float | None, digits: int = 0) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _pct(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b - 1:+.1%}"


def report(rows: list[str], results: dict[str, Any], evals: dict[str, Any]) -> str:
    """The markdown table: every row's work, throughput, memory and held-out loss against trl-default."""
    ref = results.get("trl-default", {})
    ref_rate, ref_peak = ref.get("tokens_per_s"), ref.get("peak_above_baseline_mib")
    ref_loss = evals.get("trl-default", {}).get("loss")
    lines = []
    for name in rows:
        r, e = results[name], evals.get(name, {})
        if "error" in r:
            lines.append([name, f"error: {r['error']}", *[""] * 9])
            continue
        lines.append(
            [
                name,
                r["ran"],
                r["steps"],
                r["examples"],
                f"{r['trained_tokens']:,}",
                _fmt(r["tokens_per_s"], 1),
                _report.fmt_ratio(_report.ratio(r["tokens_per_s"], ref_rate)),
                _fmt(r["peak_above_baseline_mib"]),
                _report.fmt_ratio(_report.ratio(r["peak_above_baseline_mib"], ref_peak)),
                _fmt(e.get("loss"), 4),
                _pct(e.get("loss"), ref_loss),
            ]
        )
    headers = [
        "row",
        "what it ran",
        "steps",
        "examples",
        "trained tokens",
        "trained tokens/s",
        "vs TRL default",
        "peak RSS MiB above post-import",
        "vs TRL default",
        "held-out loss",
        "vs TRL default",
    ]
    return _report.markdown_table(headers, lines)


def verdict(results: dict[str, Any], evals: dict[str, Any]) -> str:
    """The goals, checked: each packed lorakit row's speed and memory, each lorakit row's loss."""

    def ok(name: str) -> bool:
        return name in results and "error" not in results[name]

    trl_rows = [n for n in results if n.startswith("trl-") and ok(n)]
    if not ok("trl-default"):
        return "verdict: needs the trl-default row"
    default = results["trl-default"]
    best = max(trl_rows, key=lambda n: results[n]["tokens_per_s"])
    parts = []
    for name in ("lorakit-packed", "lorakit-packed-ckpt"):
        if not ok(name):
            continue
        mine = results[name]
        speed = mine["tokens_per_s"] / default["tokens_per_s"]
        vs_best = mine["tokens_per_s"] / results[best]["tokens_per_s"]
        mem = mine["peak_above_baseline_mib"] / default["peak_above_baseline_mib"]
        parts.append(
            f"{name}: {speed:.2f}× trl-default's tokens/s (≥ 2×: {'met' if speed >= 2 else 'missed'}), "
            f"{vs_best:.2f}× the best TRL row's, {best} (≥ 1.3×: {'met' if vs_best >= 1.3 else 'missed'}), "
            f"peak {mem:.2f}× trl-default's (≤ 0.6×: {'met' if mem <= 0.6 else 'missed'})"
        )
    for name, other in SAME_BATCHES.items():
        mine_loss, theirs = evals.get(name, {}).get("loss"), evals.get(other, {}).get("loss")
        if mine_loss is not None and theirs is not None:
            met = "met" if abs(mine_loss / theirs - 1) <= 0.02 else "missed"
            parts.append(f"{name} held-out loss {_pct(mine_loss, theirs)} vs {other} (within 2%: {met})")
    return "verdict: " + ("; ".join(parts) if parts else "no lorakit row finished")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="3 steps of 4 examples at --seq-len 256: checks it runs")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the unpacked rows (default 40)")
    parser.add_argument("--batch", type=int, default=8, help="examples per unpacked batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per example / packed row (default 512)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument(
        "--precision",
        choices=("defaults", "fp32", "bf16"),
        default="defaults",
        help="defaults: each tool's own (TRL bf16 autocast, lorakit fp32); fp32: both; bf16: both under bf16 autocast",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every child (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="training rounds, rows rotated each round")
    parser.add_argument("--heldout", type=int, default=200, help="records held out (default 200)")
    parser.add_argument("--eval-examples", type=int, default=None, help="held-out examples scored (default all)")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--answers", type=int, default=3, help="held-out instructions answered by each row")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data", default=str(DATA), help="Alpaca JSON (default ../shared/data/alpaca/alpaca_5000.json)"
    )
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-sft", help="data, adapters, logs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a child is killed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.spec.read_text())
        if args.child == "train":
            row = ROWS[args.row]
            result = (child_trl if row["tool"] == "trl" else child_lorakit)(spec, row, args.dir)
        else:
            result = child_eval(spec, args.adapter)
        (args.dir / "result.json").write_text(json.dumps(result, indent=1))
        return

    if args.quick:
        args.steps, args.batch, args.seq_len = 3, 4, 256
        args.eval_examples = args.eval_examples or 16
        if args.workdir == REPO / "runs" / "bench-sft":
            args.workdir = REPO / "runs" / "bench-sft-quick"
    args.eval_examples = args.eval_examples or args.heldout
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; the rows are {', '.join(ROWS)}")
    started = time.perf_counter()
    work = args.workdir.resolve()
    print(f"preparing data in {work} ...", flush=True)
    spec = prepare(args, work)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    check = spec["mask_check"]
    print(
        f"  {spec['examples']} training examples (the first that fit in {args.seq_len} tokens; "
        f"{spec['passed_over']} longer passed over), {spec['train_tokens']:,} tokens, "
        f"{spec['trained_tokens']:,} trained; packed: {spec['packed_rows']} rows, {spec['rows_per_step']} a step; "
        f"held out: {spec['heldout_examples']} ({spec['heldout_truncated']} cut at {args.seq_len}), "
        f"{args.eval_examples} scored"
    )
    print(
        f"  TRL's masks (generation template): same text {check['same_text']}/{check['records']}, "
        f"same ids and labels as lorakit {check['same_ids_and_labels']}/{check['records']}"
    )
    print(f"  TRL on SmolLM2's own template with assistant_only_loss: {check['smollm2_template_refusal']!r}")
    for i, ex in enumerate(check["first_examples"]):
        print(
            f"  example {i}: trained tokens lorakit {ex['lorakit']}, TRL assistant_only_loss "
            f"{ex['trl_assistant_only']}, TRL prompt/completion {ex['trl_prompt_completion']} "
            f"(ends {ex['lorakit_trained_text_end']!r} vs {ex['prompt_completion_text_end']!r})"
        )

    per_repeat: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    for repeat in range(args.repeats):
        order = rows[repeat % len(rows) :] + rows[: repeat % len(rows)]
        for name in order:
            print(f"[train {name}, round {repeat + 1}/{args.repeats}]", flush=True)
            result = run_child("train", name, work / name / f"r{repeat}", spec_path, args)
            per_repeat[name].append(result)
            if "error" in result:
                print(f"  error: {result['error']}\n    " + "\n    ".join(result["log_tail"][-6:]))
            else:
                rate = result["trained_tokens"] / result["train_s"]
                print(
                    f"  {result['steps']} steps, {result['train_s']:.1f} s, {rate:.1f} trained tokens/s, "
                    f"peak {result['peak_mib'] - result['baseline_mib']:.0f} MiB above post-import, "
                    f"same data as lorakit: {result['same_as_lorakit']}, first trained {result['first_trained']}"
                )
    results = {name: summarise(per_repeat[name]) for name in rows}

    evals: dict[str, Any] = {}
    for name in ["base", *rows]:
        if name != "base" and "error" in results[name]:
            continue
        adapter = None if name == "base" else work / name / "r0" / "adapter"
        print(f"[eval {name}]", flush=True)
        evals[name] = run_child("eval", name, work / name / "eval", spec_path, args, adapter)
        if "error" in evals[name]:
            print(f"  error: {evals[name]['error']}")
        else:
            print(f"  held-out loss {evals[name]['loss']:.4f} over {evals[name]['tokens']:,} tokens")

    table, line = report(rows, results, evals), verdict(results, evals)
    title = (
        f"**Chat SFT on Alpaca** ({args.model}, LoRA all-linear r=16 α=32 dropout 0.05, lr {args.lr}, "
        f"{spec['examples']} examples at --seq-len {args.seq_len}: {args.steps} steps of {args.batch} unpacked, "
        f"packed {spec['packed_rows']} rows, {spec['rows_per_step']} a step; precision {args.precision}; "
        f"{args.threads} threads; {'quick' if args.quick else 'full'}; held-out loss over "
        f"{args.eval_examples} examples)"
    )
    base = evals.get("base", {}).get("loss")
    versions: dict[str, str] = {}
    for name in rows:
        versions.update(results[name].get("versions", {}))
    first = check["first_examples"]
    notes = [
        "every row: AdamW, linear decay to 0, no warmup, no weight decay, grad-norm clip 1.0, seed 0, one epoch "
        "in file order; " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        f"base model held-out loss (no adapter): {_fmt(base, 4)}",
        f"TRL masks: SmolLM2's template with `{{% generation %}}` around each reply + <|im_end|> renders the same "
        f"text for {check['same_text']}/{check['records']} records and labels the same tokens as lorakit for "
        f"{check['same_ids_and_labels']}/{check['records']}; SmolLM2's own template with assistant_only_loss: "
        f"{check['smollm2_template_refusal']!r}",
        "trained tokens of the first three examples: lorakit "
        + ", ".join(str(e["lorakit"]) for e in first)
        + "; TRL assistant_only_loss "
        + ", ".join(str(e["trl_assistant_only"]) for e in first)
        + "; TRL prompt/completion (not used: also trains the newline after <|im_end|>) "
        + ", ".join(str(e["trl_prompt_completion"]) for e in first),
        "trainable parameters: "
        + ", ".join(f"{n} {results[n]['trainable']:,}" for n in rows if "error" not in results[n]),
        "same training data as lorakit's tokenisation: "
        + ", ".join(f"{n} {results[n]['same_as_lorakit']}" for n in rows if "error" not in results[n]),
    ]
    answers = []
    for i, prompt in enumerate(spec["prompts"]):
        answers.append(f"\n**Held-out instruction {i + 1}:** {' '.join(prompt.split())}")
        for name in ["base", *rows]:
            e = evals.get(name, {})
            if "answers" in e:
                answers.append(f"- `{name}`: {' '.join(e['answers'][i].split())}")
    payload = {
        "argv": sys.argv,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": _report.machine_info(argparse.Namespace(device="cpu")),
        "spec": spec,
        "results": results,
        "evals": evals,
        "table": table,
        "verdict": line,
    }
    print("\n" + title + "\n")
    print(table)
    print("\n" + "\n".join(notes))
    print("\n" + line)
    print("\n".join(answers))
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    if args.out:
        _report.write_json(args.out, {"title": title, **payload})


if __name__ == "__main__":
    main()
