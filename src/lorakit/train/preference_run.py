"""`lorakit train --method dpo|ipo|orpo`: a whole preference-tuning run around `fit`.

`train.run.train_run` checks the output folder and the resumed checkpoint, then hands a run whose
`TrainConfig.method` is not `sft` to `preference_run`, which reads and tokenises the pairs
(`lorakit.data.preference`), loads the model, starts the adapter — fresh (`inject`; the reference is
the base, the adapter switched off) or from an SFT adapter (`--init-adapter DIR`: loaded trainable
as the policy and, for DPO and IPO, loaded again frozen as the reference, `"ref"`: one base model in
memory) — optionally computes the reference's log-probabilities once (`--precompute-ref`, stored
in `out/reference_logps.safetensors` and reused by a resumed run), evaluates before, trains with
`fit` (`TrainConfig.method` selects `preference_step`), evaluates and samples after, and writes the
curves and the summary. The adapter is an ordinary PEFT adapter in `out/adapter`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from torch import nn

from lorakit import atomic
from lorakit import data as D
from lorakit.adapters import trainable_parameters
from lorakit.config import LoraConfig
from lorakit.data.preference import (
    PreferenceDataset,
    PreferencePair,
    iterate_pair_batches,
    load_pairs,
    preference_lines,
    split_pairs,
    tokenize_pairs,
)
from lorakit.errors import ConfigError
from lorakit.generate import Decoding, generate
from lorakit.inject import inject
from lorakit.io import WEIGHTS_NAME, check_adapter_files, load_adapter
from lorakit.models import load_model, load_tokenizer
from lorakit.quantization import storage_summary
from lorakit.state import lora_layers
from lorakit.targeting import names_module
from lorakit.train.checkpointing import checkpointable_blocks
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import DistInfo
from lorakit.train.loop import check_resume, fit
from lorakit.train.packed import check_packable
from lorakit.train.plot_preference import plot_preference
from lorakit.train.preference_step import REFERENCE_ADAPTER, evaluate_pairs, needs_reference, precompute_reference
from lorakit.train.sharding import is_sharded

__all__ = ["REFERENCE_FILE", "preference_run", "read_reference", "reference_fingerprint"]

REFERENCE_FILE = "reference_logps.safetensors"
"""Where `--precompute-ref` keeps the reference's log-probabilities in the run's folder."""

Printer = Callable[[str], None]


def preference_run(
    run: Any,
    lora: LoraConfig,
    train: TrainConfig,
    say: Printer,
    info: DistInfo,
    *,
    out: Path,
    checkpoint: Path | None,
) -> dict[str, Any]:
    """Preference-tune with LoRA (`train.method`: dpo, ipo or orpo) and write the run's files.

    Args:
        run: the `TrainRun` (model, data, output; `init_adapter`).
        lora: the adapter to train when it starts fresh.
        train: the hyper-parameters, `method`, `beta`, `label_smoothing`, `precompute_ref`.
        say: where progress lines go (a no-op on ranks other than 0).
        info: this rank.
        out: the checked output folder.
        checkpoint: the checkpoint to resume from (checked against `train` already), or None.

    Returns:
        The summary (also `out/summary.json`); empty on ranks other than 0.

    Raises:
        ConfigError: an option preference tuning does not take (`--task classification`,
            `--train-on` other than assistant), LoRA flags beside `--init-adapter`.
        AdapterFormatError: an `--init-adapter` folder that is not a complete adapter.
        DataError: a bad record (named), no pair left.
        All before the model loads, nothing written to `out`.
    """
    main = info.is_main
    resume = checkpoint is not None
    _check_options(run, lora)
    init_config = check_adapter_files(run.init_adapter) if run.init_adapter else None
    for source in (run.data, run.eval_data):
        if source:
            D.resolve_source(source)
    torch.manual_seed(train.seed)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(run.model)
    train_pairs, eval_pairs, eval_total = _read_pairs(run, tokenizer, train.seed)
    options = {"train_on_eos": run.train_on_eos, "truncate": run.truncate}
    train_ds = tokenize_pairs(train_pairs, tokenizer, run.seq_len, source=run.data, **options)
    eval_source = run.eval_data or f"{run.data} (held out)"
    eval_ds = tokenize_pairs(eval_pairs, tokenizer, run.seq_len, source=eval_source, warn=False, **options)
    for line in preference_lines(train_ds, name="training data"):
        say(line)
    capped = f" (a sample of {eval_total}; --eval-max-rows)" if eval_ds.pairs_read < eval_total else ""
    lost = f", {eval_ds.dropped} dropped" if eval_ds.dropped else ""
    say(f"eval data: {len(eval_ds)} pairs{lost}{capped}")
    per_epoch = math.ceil(len(train_ds) / train.batch_size)
    if checkpoint is not None:
        check_resume(checkpoint, train, batches_per_epoch=per_epoch)

    scheme = None if run.quantize == "none" else run.quantize
    say(
        f"loading model {run.model or 'smollm2-135m'}"
        + (f" ({scheme} linear weights, bf16 embeddings and head)" if scheme else "")
        + " ..."
    )
    t1 = time.perf_counter()
    model, tokenizer, name = load_model(run.model, quantize=scheme)
    if train.grad_checkpointing:
        checkpointable_blocks(model)
    if train.packing:
        check_packable(model)
    say(
        f"model: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"loaded in {time.perf_counter() - t1:.1f}s{f'; {storage_summary(model)}' if scheme else ''})"
    )
    lora = _start_adapter(model, lora, init_config, run.init_adapter, train.method, name)
    trainable, total = trainable_parameters(model)
    adapted = len({path for path, _ in lora_layers(model)})
    start = f"from {run.init_adapter}" if run.init_adapter else "fresh"
    reference = (
        "none (orpo)"
        if not needs_reference(train.method)
        else (f"the initial adapter, frozen as {REFERENCE_ADAPTER!r}" if run.init_adapter else "the base (adapter off)")
    )
    say(
        f"{train.method.upper()} (beta={train.beta}) with LoRA r={lora.r}, alpha={lora.lora_alpha} on "
        f"{adapted} layers, {start}; trainable {trainable:,} of {total:,} parameters; reference: {reference}"
    )

    eval_batch = run.eval_batch_size or 2 * train.batch_size
    progress = run.progress and main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if run.overwrite and not resume:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            (out / REFERENCE_FILE).unlink(missing_ok=True)
        atomic.write_json(
            out / "run_config.json",
            {"run": dataclasses.asdict(run), "lora": dataclasses.asdict(lora), "train": train.to_dict()},
        )
    if train.precompute_ref:
        _precompute(model, run, train, train_ds, eval_ds, out, eval_batch, progress, say, info, resume)

    method = {"method": train.method, "beta": train.beta, "label_smoothing": train.label_smoothing, "loss": train.loss}
    before = evaluate_pairs(model, eval_ds, eval_batch, progress=progress, desc="eval before", **method)
    prompts = _prompts(eval_pairs, run.samples)
    before_samples = _samples(model, tokenizer, prompts, progress)
    say(f"eval before: {_shown(before)}")
    for (_, shown), text in zip(prompts, before_samples, strict=True):
        say(f"  before | {shown}\n         -> {text}")

    def batches(epoch: int, start: int):
        return iterate_pair_batches(
            train_ds,
            train.batch_size,
            seed=train.seed,
            epoch=epoch,
            start=start,
            packing=train.packing,
            group_by_length=train.group_by_length,
        )

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_pairs(m, eval_ds, eval_batch, progress=progress, **method)

    result = fit(
        model,
        batches,
        train,
        out,
        batches_per_epoch=per_epoch,
        eval_fn=evaluate,
        resume=resume,
        progress=run.progress,
        resume_hint=f"run `lorakit train --out {shlex.quote(str(out))} --resume`",
    )
    if not main and not is_sharded(model):
        return {}
    last = result.evals[-1] if result.evals else {}
    if last.get("step") == result.steps and "eval_loss" in last:
        after = {k.removeprefix("eval_"): v for k, v in last.items() if k.startswith("eval_")}
    else:
        after = evaluate_pairs(model, eval_ds, eval_batch, progress=progress, desc="eval after", **method)
    after_samples = _samples(model, tokenizer, prompts, progress)
    if not main:
        return {}
    say(f"eval after: {_shown(after)}")
    for (_, shown), text in zip(prompts, after_samples, strict=True):
        say(f"  after  | {shown}\n         -> {text}")
    if (out / "metrics.jsonl").is_file():
        plot_preference(out / "metrics.jsonl", out / "loss.png")
    adapter_dir = out / "adapter"
    size = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    summary = {
        "model": name,
        "method": train.method,
        "beta": train.beta,
        "steps": result.steps,
        "eval_before": before,
        "eval_after": after,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter_bytes": size,
        "pairs": len(train_ds),
        "truncated_pairs": train_ds.truncated,
        "dropped_pairs": train_ds.dropped,
        "identical_pairs": train_ds.identical,
        "samples_before": before_samples,
        "samples_after": after_samples,
        "seconds": time.perf_counter() - t0,
        "final_train_loss": result.final_loss,
    }
    atomic.write_json(out / "summary.json", summary)
    say(
        f"adapter: {adapter_dir} ({size / 1e6:.2f} MB; PEFT format) | metrics: {out / 'metrics.jsonl'} | "
        f"curves: {out / 'loss.png'}"
    )
    return summary


# ------------------------------------------------------------------------------------------ helpers
def _check_options(run: Any, lora: LoraConfig) -> None:
    problems = []
    if run.task != "causal-lm":
        problems.append(f"preference tuning trains a causal LM; --task {run.task} is not one")
    if run.train_on != "assistant":
        problems.append(
            f"--train-on {run.train_on}: preference tuning scores only the answers (chosen and rejected); "
            "leave --train-on at assistant"
        )
    if run.init_adapter:
        fresh = LoraConfig()
        changed = [
            f.name
            for f in dataclasses.fields(LoraConfig)
            if f.name != "base_model_name_or_path" and getattr(lora, f.name) != getattr(fresh, f.name)
        ]
        recorded = _recorded_lora(run.init_adapter)
        differ = [
            n for n in changed if recorded is None or not _same_setting(n, getattr(lora, n), getattr(recorded, n))
        ]
        if differ:
            problems.append(
                f"--init-adapter {run.init_adapter}: its adapter_config.json sets the LoRA settings; drop "
                f"{', '.join('--' + n.replace('_', '-') for n in differ)}"
            )
    if problems:
        raise ConfigError("invalid options for preference tuning:\n  - " + "\n  - ".join(problems))


def _same_setting(name: str, given: Any, recorded: Any) -> bool:
    """Whether a LoRA flag says what the initial adapter's config records. Saved adapters list
    their targets as full module paths (`model.layers.0.self_attn.q_proj`), so `--target q_proj`
    agrees with a list in which every path ends with a given name and every name ends a path."""
    if given == recorded:
        return True
    if name != "target_modules" or not isinstance(recorded, list) or not given or given == "all-linear":
        return False
    names = [t.strip() for t in given.split(",")] if isinstance(given, str) else list(given)
    every_path_named = all(any(names_module(p, t) for t in names) for p in recorded)
    return every_path_named and all(any(names_module(p, t) for p in recorded) for t in names)


def _recorded_lora(directory: str) -> LoraConfig | None:
    """The initial adapter's own config (what a resumed run's recorded LoRA settings are), if readable."""
    try:
        return check_adapter_files(directory)
    except Exception:  # reported by check_adapter_files itself, right after
        return None


def _read_pairs(run: Any, tokenizer: Any, seed: int) -> tuple[list[PreferencePair], list[PreferencePair], int]:
    """(training pairs, the eval sample, eval pairs before `eval_max_rows`)."""
    pairs = load_pairs(run.data, tokenizer=tokenizer, fields=run.fields)
    if run.eval_data:
        train_pairs, eval_pairs = pairs, load_pairs(run.eval_data, tokenizer=tokenizer, fields=run.fields)
    else:
        train_pairs, eval_pairs = split_pairs(pairs, run.eval_fraction, seed)
    total = len(eval_pairs)
    if run.eval_max_rows is not None and total > run.eval_max_rows:
        chosen = sorted(random.Random(f"lorakit-eval:{seed}").sample(range(total), run.eval_max_rows))
        eval_pairs = [eval_pairs[i] for i in chosen]
    return train_pairs, eval_pairs, total


def _start_adapter(
    model: nn.Module, lora: LoraConfig, init: LoraConfig | None, directory: str | None, method: str, name: str
) -> LoraConfig:
    """A fresh adapter (`inject`), or the initial adapter loaded trainable and, for a method with a
    reference, again frozen as `REFERENCE_ADAPTER`. Returns the adapter's config."""
    if init is None:
        if lora.base_model_name_or_path is None:
            lora = dataclasses.replace(lora, base_model_name_or_path=name)
        inject(model, lora)
        return lora
    load_adapter(model, directory, "default", is_trainable=True)
    if needs_reference(method):
        load_adapter(model, directory, REFERENCE_ADAPTER, is_trainable=False)
    model.train()  # the adapters take the model's mode; fit trains in train mode anyway
    return init


def reference_fingerprint(run: Any, train_ds: PreferenceDataset, eval_ds: PreferenceDataset) -> str:
    """What the precomputed reference depends on: the model, the initial adapter's weights, the
    quantization, the loss path and every pair's tokens (SHA-256)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([run.model, run.quantize, run.init_adapter]).encode())
    if run.init_adapter:
        digest.update(hashlib.sha256((Path(run.init_adapter) / WEIGHTS_NAME).read_bytes()).digest())
    for ds in (train_ds, eval_ds):
        for rows in (ds.chosen_ids, ds.chosen_labels, ds.rejected_ids, ds.rejected_labels):
            digest.update(json.dumps(rows).encode())
    return digest.hexdigest()


def read_reference(path: Path, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored (train, eval) reference log-probabilities, or None if missing, unreadable or made
    for other data or another model."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            return f.get_tensor("train"), f.get_tensor("eval")
    except Exception:  # a missing or damaged file is computed again
        return None


def _precompute(
    model: nn.Module,
    run: Any,
    train: TrainConfig,
    train_ds: PreferenceDataset,
    eval_ds: PreferenceDataset,
    out: Path,
    batch_size: int,
    progress: bool,
    say: Printer,
    info: DistInfo,
    resume: bool,
) -> None:
    """Give both datasets their reference log-probabilities: read from the run's file (a resumed run),
    else computed once and written there (rank 0)."""
    path = out / REFERENCE_FILE
    fingerprint = reference_fingerprint(run, train_ds, eval_ds)
    stored = read_reference(path, fingerprint) if resume else None
    if stored is not None and stored[0].shape == (len(train_ds), 2) and stored[1].shape == (len(eval_ds), 2):
        train_ds.reference, eval_ds.reference = stored
        say(f"reference log-probabilities: read from {path}")
        return
    t = time.perf_counter()
    cast = torch.bfloat16 if train.autocast == "bf16" else None
    options = {"loss": train.loss, "autocast": cast, "progress": progress}
    train_ref = precompute_reference(model, train_ds, batch_size, desc="reference", **options)
    eval_ref = precompute_reference(model, eval_ds, batch_size, desc="reference (eval)", **options)
    train_ds.reference, eval_ds.reference = train_ref, eval_ref
    if info.is_main:
        atomic.write_bytes(
            path, save_tensors({"train": train_ref, "eval": eval_ref}, metadata={"fingerprint": fingerprint})
        )
    say(
        f"reference log-probabilities: {len(train_ds) + len(eval_ds)} pairs in {time.perf_counter() - t:.1f}s -> {path}"
    )


def _prompts(pairs: list[PreferencePair], n: int) -> list[tuple[str, str]]:
    """Up to `n` distinct prompts of `pairs`: (the text a model is given, what is printed of it)."""
    seen: dict[str, str] = {}
    for pair in pairs:
        if len(seen) >= n:
            break
        if pair.prompt and pair.prompt not in seen:
            seen[pair.prompt] = _shown_prompt(pair)
    return list(seen.items())


def _samples(model: nn.Module, tokenizer: Any, prompts: list[tuple[str, str]], progress: bool) -> list[str]:
    if not prompts:
        return []
    return generate(model, tokenizer, [p for p, _ in prompts], Decoding(max_new_tokens=40), progress=progress)


def _shown_prompt(pair: PreferencePair) -> str:
    """A prompt as printed: a conversation's last message before the answer, else the prompt text."""
    messages = pair.chosen.messages
    if messages:
        before = [m for m in messages[: pair.chosen.prompt_messages] if isinstance(m.get("content"), str)]
        if before:
            return " ".join(before[-1]["content"].split())[:200]
    return " ".join(pair.prompt.split())[:200]


def _shown(values: dict[str, float]) -> str:
    keys = ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected", "nll")
    return ", ".join(f"{k} {values[k]:.4f}" for k in keys if k in values)
