"""Preference tuning (issue 29): an Alpaca preference set, DPO accuracy, and lorakit against TRL's
`DPOTrainer` + PEFT.

Three stages (`--skip accuracy,speed` leaves out the last two; the set is built once and reused):

1. `build` — the preference set, made once and cached under lorakit's cache directory
   (`<cache>/preference/`): Alpaca records (`/work/shared/data/alpaca/alpaca_5000.json`, CC BY-NC,
   never bundled) whose instruction and answer fit in `--seq-len`, as TRL conversational pairs:
   prompt = the instruction (plus a blank line and the input), chosen = the dataset's answer,
   rejected = the packaged SmolLM2-135M-Instruct's own greedy answer (`lorakit.generate`, at most
   `--max-new-tokens` tokens), generated in batches with a progress bar and appended to the cache
   as they come (an interrupted build goes on where it stopped). A pair whose greedy answer is the
   dataset's is left out and counted.
2. `accuracy` — `lorakit train --method dpo` (the library call the CLI makes: `train_run`) on the
   first `--train-pairs` pairs with `--eval-pairs` held out: held-out accuracy (pairs whose chosen
   answer gets the higher implicit reward β·log π/π_ref) before and after, and the answers to three
   held-out instructions before and after (greedy, 40 tokens).
3. `speed` — one DPO step of lorakit and of TRL 1.16 `DPOTrainer` + PEFT on the same pairs, each row
   in a fresh process: SmolLM2-135M-Instruct in fp32, LoRA r=16, α=32, dropout 0.05 on every linear
   layer but the head, batches of `--batch` pairs in file order, sequences cut at `--seq-len`
   (512), AdamW at lr 5e-6 (TRL's DPO default), `--steps` steps. Rows: `lorakit` and `trl`
   (reference forward every step: adapter disabled) and `lorakit-pre`, `trl-pre` (reference
   log-probabilities computed once before training: `--precompute-ref`,
   `precompute_ref_log_probs=True`), and `lorakit-packed`, `lorakit-packed-pre`: the same with
   `--packing` (each batch's sequences end to end in rows as long as its longest; compared with
   TRL's padded rows, since TRL 1.16 disables its `padding_free` and warns). The rows train on the
   pairs the steps read (the first `--steps` × `--batch`), so a precompute covers just those.
   TRL runs in fp32 without gradient checkpointing (`bf16=False`,
   `gradient_checkpointing=False`: lorakit's defaults, so both compute the same loss; `--trl-defaults`
   gives TRL its own, bf16 autocast and checkpointing) and with dropout kept (`disable_dropout=False`,
   as lorakit trains). Measured per row: the median step time after `--warmup` steps, the peak
   RSS of training (VmHWM reset after the model load, the data preparation and any precompute;
   also above the post-import baseline), and each step's loss (both start at log 2 and should fall
   alike; the table shows the mean of the timed steps).

`--quick` checks the stages work in a few minutes: 8 pairs generated with 16 new tokens, a 4-step
DPO run with 2 pairs held out, 3 speed steps at 128 tokens.

    .venv/bin/python benchmarks/preference.py --quick --out runs/bench/preference-quick.json
    .venv/bin/python benchmarks/preference.py --out runs/bench/preference.json      # full size
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
MIB = 1024
ROWS = ("lorakit", "trl", "lorakit-pre", "trl-pre", "lorakit-packed", "lorakit-packed-pre")


# --------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> None:
    """Reset this process's VmHWM to its current resident set (Linux: clear_refs 5)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


# ---------------------------------------------------------------------------------------- build
def _user(record: dict[str, str]) -> str:
    return record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")


def build(args: argparse.Namespace) -> Path:
    """The cached preference set (JSONL of TRL conversational pairs); generates what is missing."""
    import torch

    from lorakit import atomic
    from lorakit.generate import Decoding, generate
    from lorakit.models import cache_dir, load_model

    wanted = args.pairs
    key = hashlib.sha256(f"{ALPACA.stat().st_size}:{args.seq_len}:{args.max_new_tokens}".encode()).hexdigest()[:12]
    folder = cache_dir() / "preference"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"alpaca-smollm2-greedy-{key}.jsonl"
    have = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {r["index"] for r in have}
    if len([r for r in have if r["kept"]]) >= wanted:
        print(f"preference set: {path} ({len(have)} records cached)")
        return path
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model, tok, _ = load_model("smollm2-135m")
    records = json.loads(ALPACA.read_text())
    todo = []
    for index, record in enumerate(records):
        if index in done:
            continue
        messages = [{"role": "user", "content": _user(record)}, {"role": "assistant", "content": record["output"]}]
        text = tok.apply_chat_template(messages, tokenize=False)
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= args.seq_len - args.max_new_tokens:
            todo.append((index, record))
    kept = len([r for r in have if r["kept"]])
    append = atomic.open_append(path)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(todo), args.gen_batch):
            if kept >= wanted:
                break
            chunk = todo[start : start + args.gen_batch]
            prompts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": _user(r)}], tokenize=False, add_generation_prompt=True
                )
                for _, r in chunk
            ]
            answers = generate(
                model, tok, prompts, Decoding(max_new_tokens=args.max_new_tokens), batch_size=args.gen_batch
            )
            lines = []
            for (index, record), answer in zip(chunk, answers, strict=True):
                same = answer.strip() == record["output"].strip()
                kept += not same
                lines.append(
                    json.dumps(
                        {
                            "index": index,
                            "kept": not same,
                            "prompt": [{"role": "user", "content": _user(record)}],
                            "chosen": [{"role": "assistant", "content": record["output"]}],
                            "rejected": [{"role": "assistant", "content": answer}],
                        }
                    )
                    + "\n"
                )
            append.write("".join(lines))
            append.flush()
            rate = (start + len(chunk)) / (time.perf_counter() - t0)
            print(f"  generated {start + len(chunk)} answers ({kept}/{wanted} pairs kept, {rate:.2f}/s)", flush=True)
    finally:
        append.close()
    return path


def pairs_file(args: argparse.Namespace, cached: Path, folder: Path) -> tuple[Path, Path]:
    """The training and held-out pairs (kept pairs only, in Alpaca's order) as JSONL files."""
    kept = [json.loads(line) for line in cached.read_text().splitlines()]
    identical = sum(not r["kept"] for r in kept)
    kept = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in kept if r["kept"]]
    held, train = kept[: args.eval_pairs], kept[args.eval_pairs : args.eval_pairs + args.train_pairs]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", held)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(
        f"pairs: {len(train)} training, {len(held)} held out "
        f"({identical} greedy answers equal to the dataset's, left out)"
    )
    return folder / "train.jsonl", folder / "heldout.jsonl"


# ------------------------------------------------------------------------------------- accuracy
def accuracy(args: argparse.Namespace, train: Path, held: Path, out: Path) -> dict[str, Any]:
    """`lorakit train --method dpo` through `train_run`; its summary, with the accuracy ties counted half."""
    import torch

    from lorakit.config import LoraConfig
    from lorakit.data.preference import load_pairs, tokenize_pairs
    from lorakit.models import load_model
    from lorakit.train.config import TrainConfig
    from lorakit.train.preference_step import evaluate_pairs
    from lorakit.train.run import TrainRun, train_run

    torch.set_num_threads(args.threads)
    run = TrainRun(
        data=str(train), eval_data=str(held), seq_len=args.seq_len, samples=3, eval_max_rows=None,
        out=str(out), overwrite=True, progress=not args.quiet,
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    cfg = TrainConfig(
        method="dpo", beta=args.beta, lr=args.lr, epochs=args.epochs, batch_size=args.batch, warmup_steps=10,
        eval_every=args.eval_every, save_every=None, loss="chunked",
    )  # fmt: skip
    summary = train_run(run, lora, cfg)
    # Before training the policy is the reference: every margin is exactly 0, so no pair is ranked
    # right (accuracy 0); as a coin flip over ties, 50%. Also the base model's own ranking: the pairs
    # whose chosen answer it finds more likely (summed log-probabilities).
    model, tok, _ = load_model("smollm2-135m")
    import lorakit

    lorakit.inject(model, lora)
    held_ds = tokenize_pairs(load_pairs(held, tokenizer=tok), tok, args.seq_len, warn=False)
    base = evaluate_pairs(model, held_ds, 8, method="orpo", beta=1.0)  # ORPO's rewards: mean log-probabilities
    summary["base_prefers_chosen_by_mean_logprob"] = base["accuracy"]
    return summary


# ---------------------------------------------------------------------------------------- speed
def child(spec: dict[str, Any], row: str, folder: Path) -> dict[str, Any]:
    """One speed row in this (fresh) process."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    precompute = row.endswith("-pre")
    if row.startswith("trl"):
        return _child_trl(spec, precompute, folder)
    return _child_lorakit(spec, precompute, folder, packing="-packed" in row)


def _child_lorakit(spec: dict[str, Any], precompute: bool, folder: Path, packing: bool) -> dict[str, Any]:
    import lorakit
    from lorakit.data.preference import iterate_pair_batches, load_pairs, tokenize_pairs
    from lorakit.models import load_model
    from lorakit.train import TrainConfig, fit
    from lorakit.train.preference_step import precompute_reference

    baseline = _status_kib("VmRSS")  # after the imports: what the tool itself costs is not training
    model, tok, _ = load_model("smollm2-135m")
    lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    ds = tokenize_pairs(load_pairs(spec["train"], tokenizer=tok), tok, spec["seq_len"], warn=False)
    cfg = TrainConfig(
        method="dpo", beta=0.1, lr=5e-6, max_steps=spec["steps"], batch_size=spec["batch"], save_every=None,
        weight_decay=0.0, schedule="linear", precompute_ref=precompute, packing=packing,
    )  # fmt: skip
    pre_s = None
    if precompute:
        t = time.perf_counter()
        ds.reference = precompute_reference(model, ds, spec["batch"])
        pre_s = time.perf_counter() - t
    times: list[float] = []
    losses: list[float] = []

    def on_step(step: int, record: dict[str, Any]) -> None:
        times.append(time.perf_counter())
        losses.append(record["loss"])

    def batches(epoch: int, start: int):
        return iterate_pair_batches(ds, spec["batch"], seed=0, epoch=epoch, start=start, shuffle=False, packing=packing)

    ready = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    fit(
        model,
        batches,
        cfg,
        folder / "run",
        batches_per_epoch=-(-len(ds) // spec["batch"]),
        on_step=on_step,
        progress=False,
    )
    peak = _status_kib("VmHWM")
    layout = "packed (rows of the batch's longest)" if packing else "padded"
    ran = f"lorakit fit, fp32, chunked log-probs, {layout}, reference {'precomputed' if precompute else 'each step'}"
    return _result(ran, start, times, losses, baseline, ready, peak, pre_s)


def _child_trl(spec: dict[str, Any], precompute: bool, folder: Path) -> dict[str, Any]:
    import datasets
    import peft
    import trl
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    baseline = _status_kib("VmRSS")

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    own = {} if spec["trl_defaults"] else {"bf16": False, "gradient_checkpointing": False}
    config = DPOConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=spec["batch"], learning_rate=5e-6, beta=0.1,
        max_steps=spec["steps"], max_length=spec["seq_len"], precompute_ref_log_probs=precompute,
        disable_dropout=False, train_sampling_strategy="sequential", seed=0, data_seed=0, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=1, lr_scheduler_type="linear",
        weight_decay=0.0, **own,
    )  # fmt: skip
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    records = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines()]
    t = time.perf_counter()
    trainer = DPOTrainer(
        model=spec["model_dir"], args=config, train_dataset=datasets.Dataset.from_list(records), peft_config=lora,
        callbacks=[StepTimes()],
    )  # fmt: skip
    pre_s = time.perf_counter() - t if precompute else None  # TRL precomputes in __init__ (with its tokenising)
    ready = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    trainer.train()
    peak = _status_kib("VmHWM")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ran = (
        f"TRL {trl.__version__} DPOTrainer + PEFT {peft.__version__}, {'bf16 autocast' if config.bf16 else 'fp32'}, "
        f"{'grad checkpointing' if config.gradient_checkpointing else 'no checkpointing'}, fused LM head, padded, "
        f"reference {'precomputed' if precompute else 'each step'}"
    )
    return _result(ran, start, times, losses, baseline, ready, peak, pre_s)


def _result(ran, start, times, losses, baseline, ready, peak, pre_s) -> dict[str, Any]:
    ends = [start, *times]
    steps = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "ran": ran,
        "step_s": steps,
        "losses": losses,
        "baseline_mib": baseline / MIB,
        "ready_mib": ready / MIB,
        "peak_mib": peak / MIB,
        "precompute_s": pre_s,
    }


def _env(threads: int) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def speed(args: argparse.Namespace, train: Path, work: Path, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every row in a fresh process, rounds rotated over `--repeats`; `save(results)` after each row.

    The rows train on the pairs their timed and warm-up steps read (the first `steps × batch` of
    the training pairs, in order), so a precomputed reference covers those pairs only: what it
    costs per pair is the same, and a row no longer spends minutes on pairs it never trains on.
    """
    from lorakit.models import ensure_cached

    work.mkdir(parents=True, exist_ok=True)
    used = train.read_text().splitlines(keepends=True)[: args.steps * args.batch]
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(used))
    spec = {
        "train": str(pairs), "seq_len": args.speed_seq_len, "batch": args.batch, "steps": args.steps,
        "threads": args.threads, "model_dir": str(ensure_cached("smollm2-135m")), "trl_defaults": args.trl_defaults,
    }  # fmt: skip
    spec_path = work / "speed.json"
    spec_path.write_text(json.dumps(spec))
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in ROWS}
    for repeat in range(args.repeats):
        order = ROWS[repeat % len(ROWS) :] + ROWS[: repeat % len(ROWS)]
        for row in order:
            folder = work / f"{row}-{repeat}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            argv = [sys.executable, __file__, "--child", row, "--spec", str(spec_path), "--dir", str(folder)]
            with open(folder / "log.txt", "wb") as log:
                proc = subprocess.run(
                    argv, env=_env(args.threads), stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
                )
            result_path = folder / "result.json"
            if proc.returncode == 0 and result_path.is_file():
                results[row].append(json.loads(result_path.read_text()))
            else:
                tail = (folder / "log.txt").read_text(errors="replace").splitlines()[-10:]
                results[row].append({"error": f"exit {proc.returncode}", "log_tail": tail})
            print(f"  {row} (repeat {repeat + 1}): {_line(results[row][-1], args.warmup)}", flush=True)
            save(results)
    return results


def _timed(result: dict[str, Any], warmup: int) -> list[float]:
    return result["step_s"][warmup:] or result["step_s"]


def _line(result: dict[str, Any], warmup: int) -> str:
    if "error" in result:
        return f"failed: {result['error']} {result.get('log_tail', [])[-3:]}"
    return f"step {statistics.median(_timed(result, warmup)):.2f} s, peak {result['peak_mib']:.0f} MiB"


def speed_table(results: dict[str, list[dict[str, Any]]], warmup: int) -> str:
    rows = ["| row | ran | step (s) | × TRL | peak RSS (MiB) | above imports | × TRL | mean loss | precompute (s) |"]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, dict[str, float]] = {}
    for row, repeats in results.items():
        ok = [r for r in repeats if "error" not in r]
        if not ok:
            summary[row] = {}
            continue
        summary[row] = {
            "step": statistics.median(statistics.median(_timed(r, warmup)) for r in ok),
            "peak": statistics.median(r["peak_mib"] for r in ok),
            "above": statistics.median(r["peak_mib"] - r["baseline_mib"] for r in ok),
            "loss": statistics.mean(statistics.mean(r["losses"][warmup:] or r["losses"]) for r in ok),
            "pre": statistics.median(r["precompute_s"] for r in ok) if ok[0]["precompute_s"] is not None else None,
            "ran": ok[0]["ran"],
        }
    for row in ROWS:
        s = summary.get(row) or {}
        if not s:
            rows.append(f"| {row} | failed | | | | | | | |")
            continue
        theirs = summary.get("trl-pre" if row.endswith("-pre") else "trl") or {}

        def ratio(k: str, s: dict = s, theirs: dict = theirs) -> str:
            return f"{s[k] / theirs[k]:.2f}" if theirs.get(k) else ""

        pre = f"{s['pre']:.1f}" if s["pre"] is not None else "—"
        rows.append(
            f"| {row} | {s['ran']} | {s['step']:.2f} | {ratio('step')} | {s['peak']:.0f} | {s['above']:.0f} | "
            f"{ratio('above')} | {s['loss']:.4f} | {pre} |"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run that checks every stage works")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: accuracy,speed")
    parser.add_argument("--pairs", type=int, default=600, help="kept pairs to generate (cached)")
    parser.add_argument("--train-pairs", type=int, default=500)
    parser.add_argument("--eval-pairs", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="length cap of the greedy (rejected) answers")
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument(
        "--seq-len", type=int, default=320, help="instruction + answer, for the set and the accuracy run"
    )
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4, help="pairs per batch")
    parser.add_argument("--steps", type=int, default=12, help="speed: steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="speed: steps not timed")
    parser.add_argument("--speed-seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--trl-defaults", action="store_true", help="speed: TRL with its own bf16 autocast and checkpointing"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(json.loads(args.spec.read_text()), args.child, args.dir)
        (args.dir / "result.json").write_text(json.dumps(result))
        return
    if args.quick:
        args.pairs, args.train_pairs, args.eval_pairs, args.max_new_tokens = 10, 8, 2, 16
        args.steps, args.warmup, args.speed_seq_len, args.repeats, args.eval_every = 3, 1, 128, 1, 2
        args.lr, args.batch, args.seq_len = 5e-4, 2, 192
    from lorakit import atomic

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorakit-preference-"))
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    cached = build(args)  # cached after its first run: every stage reads it
    train, held = pairs_file(args, cached, work / "data")
    if "accuracy" not in skip:
        summary = accuracy(args, train, held, work / "dpo")
        report["accuracy"] = summary
        before, after = summary["eval_before"], summary["eval_after"]
        print("\n## DPO on the Alpaca preference set (held out)\n")
        print("| | accuracy | margin | loss |\n|---|---|---|---|")
        coin = "(all margins 0: 0.5 as a coin flip)"
        print(f"| before | {before['accuracy']:.3f} {coin} | {before['margin']:.4f} | {before['loss']:.4f} |")
        steps = summary["steps"]
        print(f"| after {steps} steps | {after['accuracy']:.3f} | {after['margin']:.4f} | {after['loss']:.4f} |")
        base = summary["base_prefers_chosen_by_mean_logprob"]
        print(f"\nthe base model prefers the chosen answer (mean log-prob) on {base:.3f} of held-out pairs")
        for b, a in zip(summary["samples_before"], summary["samples_after"], strict=True):
            print(f"\n- before: {b!r}\n  after:  {a!r}")

    def save(results: dict[str, Any] | None = None) -> None:  # every row as it ends: a stopped run keeps them
        if results is not None:
            report["speed"] = results
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(args.out, json.dumps(report, indent=1, default=str).encode())

    if "speed" not in skip:
        save()
        results = speed(args, train, work / "speed", save)
        report["speed"] = results
        print(
            f"\n## One DPO step: lorakit vs TRL DPOTrainer + PEFT ({args.batch} pairs, ≤{args.speed_seq_len} tokens)\n"
        )
        print(speed_table(results, args.warmup))
    print(f"\n({time.perf_counter() - t0:.0f} s in all; work folder {work})")
    save()


if __name__ == "__main__":
    main()
