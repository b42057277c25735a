"""E2E NLG (LoRA paper, Table 3): base zero-shot vs lorakit LoRA vs PEFT LoRA vs full fine-tuning.

Question: on the paper's E2E protocol, does lorakit's LoRA (r=4 on q and v, < 0.5% of the weights)
match full fine-tuning under the same step budget, and does it agree with PEFT trained identically?

Model: the packaged SmolLM2-135M-Instruct (the paper used GPT-2 Medium, 355M). Data: the official
`trainset.csv` (42,061 references of 4,862 MRs) converted as the LoRA repo does
(`lorakit.data.load_examples`: `name : The Vaults | Type : pub | ... ||` + Moses-style tokenised
reference + EOS, loss on the reference only), scored on `devset.csv` (547 MRs, references grouped
per MR).

Methods, each on a freshly loaded model, all trained by the same loop (`_experiments.train`), with
the same seed and batch order:

- `base`: the model as packaged, zero-shot on the same prompts (no training).
- `lora`: `lorakit.inject` with the paper's config (r=4, alpha=32, dropout 0.1, q_proj and v_proj).
- `peft`: PEFT 0.21 LoRA, same config, starting from exactly lorakit's initial A and B (lorakit's
  initial adapter is written in PEFT's format and loaded with `PeftModel.from_pretrained`).
- `full`: every weight trained (lr `--full-lr`, default 5e-5; the rest as for LoRA).
- `qlora`, `dora`, `qdora` (not run unless named in `--methods`): `lora` over the base's linear
  weights stored in NF4 (`lorakit.quantize(model, "nf4")`, QLoRA), `lora` with `use_dora=True`
  (DoRA), and both. Each starts from the same A as `lora` and trains the same steps. Over an
  NF4 base, decoding runs on `lorakit.merge_and_unload(model)` (every weight dequant(W), plus ΔW
  where adapted, in fp32: what `lorakit merge` writes), the same function as the quantized model
  up to float rounding: on the quantized model every decoding step dequantizes every weight
  again, about 3× the time per MR on CPU.

Training follows the paper (microsoft/LoRA examples/NLG README): AdamW, lr 2e-4, batch 8, weight
decay 0.01, linear warmup then linear decay, label smoothing 0.1, no gradient clipping (`--clip
0.0`). Decoding follows its `gpt2_beam.py`: beam 10, length penalty 0.8, no repeated 4-grams
among the generated tokens, at most 64 new tokens (`lorakit.generate`: batched, KV cache).

Scores: `lorakit.e2e.e2e_metrics` (BLEU, NIST, METEOR, ROUGE-L, CIDEr as the E2E challenge's
`measure_scores.py`). As in the paper's pipeline, predictions and references are both in the
LoRA repo's tokenised form (`family - friendly`, `£ 20`), the references being `devset.csv`'s
passed through `lorakit.e2e.e2e_tokenize`. `--out` also gets `references.txt` (one reference a
line, a blank line between MRs): `measure_scores.py references.txt <method>/predictions.txt`
rescores with the official scorer.

Run:

    .venv/bin/python benchmarks/e2e.py --train-size 64 --max-steps 5 --eval-size 8 --beams 2  # smoke
    .venv/bin/python benchmarks/e2e.py                           # CPU budget (preset `cpu`)
    .venv/bin/python benchmarks/e2e.py --preset paper --device cuda   # all of train, 5 epochs
    .venv/bin/python benchmarks/e2e.py --methods lora,qlora,dora --max-steps 100 --out runs/e2e-qlora
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import _experiments as X
import _report
import torch

import lorakit
from lorakit import atomic, e2e
from lorakit import data as D
from lorakit.generate import Decoding, generate
from lorakit.models import load_model
from lorakit.train import TrainConfig

METHODS = ("base", "lora", "peft", "full", "qlora", "dora", "qdora")
DEFAULT_METHODS = ("base", "lora", "peft", "full")
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# LoRA paper, Table 3 (GPT-2 Medium, E2E test set): trainable parameters and the five scores.
PAPER = {
    "GPT-2 M LoRA (paper)": {"params": 0.35e6, **dict(zip(METRICS, (70.4, 8.85, 46.8, 71.8, 2.53), strict=True))},
    "GPT-2 M FT (paper)": {"params": 354.92e6, **dict(zip(METRICS, (68.2, 8.62, 46.2, 71.0, 2.47), strict=True))},
}

PRESETS: dict[str, dict[str, Any]] = {
    # A 2-core CPU budget: 1,000 steps of batch 8 (8,000 references, ~1/5 epoch) over the whole
    # train set, scored on all 547 dev MRs.
    "cpu": {
        "train_size": None,
        "max_steps": 1000,
        "epochs": None,
        "eval_size": None,
        "warmup_steps": None,
        "decode_batch_size": 8,
    },
    # The paper's budget: all 42,061 references, 5 epochs (26,290 steps of batch 8), 500 warmup steps;
    # 32 MRs (320 beams) per generate call, for a GPU.
    "paper": {
        "train_size": None,
        "max_steps": None,
        "epochs": 5,
        "eval_size": None,
        "warmup_steps": 500,
        "decode_batch_size": 32,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="budget defaults; explicit flags win")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--model", default="smollm2-135m", help="packaged alias, model directory or .gguf file")
    X.add_data_dir_flag(p)
    p.add_argument("--train-file", help="E2E CSV (mr,ref) or LoRA .txt (default: <data-dir>/e2e/trainset.csv)")
    p.add_argument("--train-size", type=int, help="train on a seeded random subset of N rows (default: all)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (wins over --epochs)")
    p.add_argument("--epochs", type=int, help="passes over the training rows when --max-steps is not set")
    p.add_argument("--eval-file", help="official E2E CSV (mr,ref), or .txt (default: <data-dir>/e2e/devset.csv)")
    p.add_argument("--eval-size", type=int, help="score only the first N MRs (default: all)")
    p.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (lora, peft)")
    p.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning learning rate")
    p.add_argument("-r", "--r", type=int, default=4, help="LoRA rank")
    p.add_argument("--rank-pattern", default="", help="per-module ranks, e.g. k_proj=6,v_proj=6 (PEFT's rank_pattern)")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--target", default="q_proj,v_proj", help="comma-separated target module names")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, help="default: min(500, 2%% of the steps), the paper's ratio")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the gradient norm (0: off, as the paper)")
    p.add_argument("--seq-len", type=int, default=512, help="longest training row in tokens (E2E rows are < 150)")
    p.add_argument("--beams", type=int, default=10, help="beam width (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=0.8)
    p.add_argument("--no-repeat-ngram", type=int, default=4, help="ban repeated n-grams in the output (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--decode-batch-size", type=int, default=8, help="MRs per generate call (x beams rows)")
    p.add_argument("--seed", type=int, default=110, help="seed of init, dropout, batch order (paper: 110)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="runs/e2e", help="output directory")
    args = X.parse_with_preset(p, PRESETS, argv)
    methods, problems = X.run_problems(args, METHODS)
    args.train_file = args.train_file or str(X.data_file(args.data_dir, "e2e", "trainset.csv"))
    args.eval_file = args.eval_file or str(X.data_file(args.data_dir, "e2e", "devset.csv"))
    for flag in ("train_file", "eval_file"):
        if not Path(getattr(args, flag)).is_file():
            problems.append(f"--{flag.replace('_', '-')}: no such file {getattr(args, flag)}")
    if problems:
        p.error("\n  ".join(problems))
    args.methods = methods
    return args


def load_train(args: argparse.Namespace, tokenizer: Any) -> tuple[D.TokenizedDataset, int]:
    """The training rows (a seeded subset with `--train-size`, file order kept), tokenised."""
    examples = D.load_examples(args.train_file)
    if args.train_size is not None and args.train_size < len(examples):
        keep = sorted(random.Random(f"e2e-subset:{args.seed}").sample(range(len(examples)), args.train_size))
        examples = [examples[i] for i in keep]
    mrs = len({ex.group for ex in examples})
    return D.tokenize_examples(examples, tokenizer, args.seq_len), mrs


def load_eval(args: argparse.Namespace) -> tuple[list[str], list[str], list[list[str]]]:
    """(MRs, prompts, grouped references) of the first `--eval-size` MRs of the eval file, in file order."""
    examples = D.load_examples(args.eval_file)
    prompt_of: dict[str, str] = {}
    for ex in examples:
        prompt_of.setdefault(ex.group, ex.prompt)
    # group_references is the official scorer's grouping; references in the LoRA repo's tokenised form.
    mrs, refs = e2e.group_references([ex.group for ex in examples], [ex.completion.strip() for ex in examples])
    if args.eval_size is not None:
        mrs, refs = mrs[: args.eval_size], refs[: args.eval_size]
    return mrs, [prompt_of[mr] for mr in mrs], refs


def train_config(args: argparse.Namespace, lr: float, steps: int) -> TrainConfig:
    """The paper's optimizer and schedule; warmup defaults to min(500, 2% of the steps)."""
    warmup = args.warmup_steps if args.warmup_steps is not None else min(500, round(0.02 * steps))
    return TrainConfig(
        lr=lr,
        weight_decay=args.weight_decay,
        warmup_steps=warmup,
        schedule="linear",
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_grad_norm=args.max_grad_norm or None,
        seed=args.seed,
        label_smoothing=args.label_smoothing,
        save_every=None,
    )


def lora_config(args: argparse.Namespace, name: str) -> lorakit.LoraConfig:
    """The paper's E2E adapter: r=4, alpha=32, dropout 0.1 on q and v."""
    return lorakit.LoraConfig(
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[t.strip() for t in args.target.split(",")],
        rank_pattern={k.strip(): int(v) for k, v in (x.split("=") for x in args.rank_pattern.split(",") if x.strip())},
        base_model_name_or_path=name,
    )


def decode(model: torch.nn.Module, tokenizer: Any, prompts: list[str], args: argparse.Namespace) -> list[str]:
    """Beam-search every prompt (`lorakit.generate`, batched with the KV cache), printing progress."""
    chunk = args.decode_batch_size * 8
    decoding = Decoding(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram,
    )
    out: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(prompts), chunk):
        out += generate(model, tokenizer, prompts[start : start + chunk], decoding, batch_size=args.decode_batch_size)
        print(f"  decoded {len(out)}/{len(prompts)} MRs ({time.perf_counter() - started:.0f} s)", flush=True)
    return [" ".join(text.split()) for text in out]  # one line per MR


def run_method(
    method: str,
    args: argparse.Namespace,
    device: torch.device,
    prompts: list[str],
    refs: list[list[str]],
    out: Path,
) -> dict[str, Any]:
    """Load a fresh model, set up `method`, train it (unless base), decode and score; write its files."""
    folder = out / method
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[{method}] loading {args.model}", flush=True)
    torch.manual_seed(args.seed)
    model, tokenizer, name = load_model(args.model)
    base_params = X.count_parameters(model)
    result: dict[str, Any] = {"method": method, "model": name, "base_parameters": base_params}
    model, setup = X.set_up_method(method, model, lora_config(args, name), args.seed, folder, device)
    result.update(setup)
    trainable = setup["trainable_parameters"]

    if method != "base":
        train_ds, train_mrs = load_train(args, tokenizer)
        steps = args.max_steps or args.epochs * D.num_batches(train_ds, args.batch_size)
        cfg = train_config(args, args.full_lr if method == "full" else args.lr, steps)
        print(
            f"[{method}] training {trainable:,} of {base_params:,} parameters on {len(train_ds)} rows "
            f"({train_mrs} MRs): {steps} steps of {cfg.batch_size}, lr {cfg.lr:g}, warmup {cfg.warmup_steps}",
            flush=True,
        )
        stats = X.train(model, train_ds, cfg, folder, label=method)
        result.update(X.train_record(stats, train_ds, cfg))
        result["adapter_bytes"] = X.directory_bytes(stats.saved)

    if method in ("qlora", "qdora"):
        model = lorakit.merge_and_unload(model)
        result["decoded_merged"] = True
    print(f"[{method}] decoding {len(prompts)} MRs, beam {args.beams}", flush=True)
    started = time.perf_counter()
    predictions = decode(model, tokenizer, prompts, args)
    result["decode_seconds"] = time.perf_counter() - started
    result["decode_seconds_per_mr"] = result["decode_seconds"] / len(prompts)
    atomic.write_text(folder / "predictions.txt", "".join(text + "\n" for text in predictions))
    started = time.perf_counter()
    result["scores"] = e2e.e2e_metrics(predictions, refs)
    result["score_seconds"] = time.perf_counter() - started
    atomic.write_json(folder / "scores.json", result["scores"])
    print(f"[{method}] " + "  ".join(f"{k} {v:.4g}" for k, v in result["scores"].items()), flush=True)
    del model
    X.release_memory()
    return result


def table(results: dict[str, Any]) -> str:
    """Our methods and the paper's two rows, as markdown."""
    headers = ["method", "trainable", "%", "adapter file", "steps", "train", "s/step", *METRICS, "decode s/MR"]
    rows = []
    labels = {
        "base": "base (zero-shot)",
        "lora": "lorakit LoRA",
        "peft": "PEFT LoRA",
        "full": "full FT",
        "qlora": "lorakit LoRA, NF4 base",
        "dora": "lorakit DoRA",
        "qdora": "lorakit DoRA, NF4 base",
    }
    for method in METHODS:
        r = results["methods"].get(method)
        if r is None:
            continue
        scores = r["scores"]
        rows.append(
            [
                labels[method],
                X.human_count(r["trainable_parameters"]),
                f"{100 * r['trainable_parameters'] / r['base_parameters']:.3f}",
                X.human_bytes(r.get("adapter_bytes")) + (" (model)" if method == "full" else ""),
                r.get("steps", 0),
                f"{r['train_seconds'] / 60:.1f} min" if "train_seconds" in r else "-",
                f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-",
                f"{scores['BLEU']:.1f}",
                f"{scores['NIST']:.2f}",
                f"{scores['METEOR']:.1f}",
                f"{scores['ROUGE_L']:.1f}",
                f"{scores['CIDEr']:.2f}",
                f"{r['decode_seconds_per_mr']:.2f}",
            ]
        )
    for label, p in PAPER.items():
        rows.append(
            [
                label,
                X.human_count(int(p["params"])),
                f"{100 * p['params'] / 354.92e6:.3f}",
                "-",
                "26,290",
                "-",
                "-",
                f"{p['BLEU']:.1f}",
                f"{p['NIST']:.2f}",
                f"{p['METEOR']:.1f}",
                f"{p['ROUGE_L']:.1f}",
                f"{p['CIDEr']:.2f}",
                "-",
            ]
        )
    return _report.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen methods, write `results.json`, print the table."""
    args = parse_args(argv)
    device = X.setup_device(args.device, args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mrs, prompts, refs = load_eval(args)
    atomic.write_text(out / "references.txt", "\n".join("".join(r + "\n" for r in group) for group in refs))
    atomic.write_text(out / "mrs.txt", "".join(mr + "\n" for mr in mrs))
    print(f"eval: {len(mrs)} MRs, {sum(map(len, refs))} references from {args.eval_file}", flush=True)
    methods = X.run_methods(args, lambda method: run_method(method, args, device, prompts, refs, out))
    update = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "eval": {"file": args.eval_file, "mrs": len(mrs), "references": sum(map(len, refs))},
        "environment": X.environment(),
        "paper": PAPER,
        "methods": methods,
    }
    results, _ = X.finish(out, update, table)
    if {"lora", "peft"} <= results["methods"].keys():
        lora, peft = results["methods"]["lora"], results["methods"]["peft"]
        same = lora.get("init_lora_A_abs_sum") == peft.get("init_lora_A_abs_sum")
        gap = lora["scores"]["BLEU"] - peft["scores"]["BLEU"]
        print(f"\nlorakit vs PEFT: same initial A: {same}; BLEU difference {gap:+.2f}")
    for variant in ("qlora", "dora", "qdora"):
        if {"lora", variant} <= results["methods"].keys():
            gap = results["methods"][variant]["scores"]["BLEU"] - results["methods"]["lora"]["scores"]["BLEU"]
            print(f"{variant} vs lora (same steps, same initial A): BLEU difference {gap:+.2f}")
    return results


if __name__ == "__main__":
    main()
