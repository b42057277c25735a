"""Fine-tuning a model that does not fit in memory in full precision (issue 26), measured.

Rows (each in its own process; memory is the kernel's high-water mark of resident memory, VmHWM,
read from `/proc/<pid>/status` and reset through `/proc/<pid>/clear_refs` between phases; every
child runs with glibc's mmap threshold fixed at 128 kB, so freed large blocks go back to the system
and a peak is what was alive):

- `7b`: a LLaMA-2-7B-shape model (hidden 4096, 32 layers, intermediate 11008, 32 heads, vocab
  32000) with seeded random bf16 weights, written once as safetensors shards (about 13.5 GB) into
  `<cache>/bigmodel/llama2-7b-shape` without ever holding the whole model (one tensor at a time),
  with the packaged MiniLM's WordPiece tokenizer (30,522 tokens: it fits the 32,000 vocabulary).
  Then the real `lorakit train --quantize nf4 --target all-linear -r 16 --grad-checkpointing` (chunked
  loss, the default) for 2 optimizer steps at 1×256: the load's peak (from the start to the
  "model: ..." line), the training's peak (reset after the load), the step time (`metrics.jsonl`)
  and the adapter file's size; beside `lorakit.memory`'s estimate of the training peak.
- `nf4-vs-fp32`: the same flow on the packaged SmolLM2-135M and the Qwen2.5-Coder-0.5B GGUF
  (`_large_model.py`, fetched from PyPI once): whole-process peak of `lorakit train` (load + 3 steps,
  1×128, q,v r=8), NF4 base against fp32 base.
- `loss`: SmolLM2, all-linear r=16, 8×512 random tokens: the loss's own memory (the head, the
  cross entropy and its backward on fixed hidden states: VmHWM above the resident set before it)
  and the whole step's time, `loss="chunked"` against `loss="full"`.
- `ckpt`: the same model and batch: the step's peak above the resident set after a warm-up step,
  and its time, with and without gradient checkpointing.
- `peft`: PEFT + transformers on the same SmolLM2 flow as `nf4-vs-fp32` (from_pretrained fp32, then
  `get_peft_model` q,v r=8, 3 steps of `model(ids, labels=ids).loss.backward()` + AdamW), and with
  bitsandbytes 4-bit where it loads on this machine (the row says why not otherwise): the load's
  peak and the whole process's.

Usage:
    .venv/bin/python benchmarks/bigmodel.py                      # every row (the 7B run takes a while)
    .venv/bin/python benchmarks/bigmodel.py --rows loss,ckpt     # some rows
    .venv/bin/python benchmarks/bigmodel.py --quick              # small shapes: checks it all runs
    .venv/bin/python benchmarks/bigmodel.py --device cuda --dtype bf16 --rows loss,ckpt

Nothing here runs in CI: the 7B run is minutes a step on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _report

REPO = Path(__file__).resolve().parents[1]
ROWS = ("7b", "nf4-vs-fp32", "loss", "ckpt", "peft")
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
QUICK_SHAPE = {
    **LLAMA2_7B,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
MIB = 2**20
# What every `lorakit train` row shares: one row a batch, one evaluation row, no samples or checkpoints.
_COMMON = "--batch-size 1 --eval-max-rows 1 --samples 0 --save-every none"


# ----------------------------------------------------------------------------- memory of a process


def _status_kib(pid: int | str, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak(pid: int | str) -> None:
    """Reset the process's VmHWM to its current resident set (Linux: clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


def _child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks"), env.get("PYTHONPATH", "")])
    return env


# ----------------------------------------------------------------------------- the 7B-shape model


def write_random_llama(directory: Path, shape: dict[str, int], seed: int = 0, shard_bytes: int = 2 * 2**30) -> Path:
    """A LLaMA of `shape` with seeded random bf16 weights (std 0.02, norms 1) as safetensors shards.

    One tensor is created at a time and a shard is written once it holds `shard_bytes`, so the
    process never holds more than a shard. Reused when `directory` already holds a complete copy
    (its `model.safetensors.index.json` is written last).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lorakit.models.packaged import packaged_encoder_dir

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        return directory
    if directory.exists():
        shutil.rmtree(directory)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
        torch_dtype="bfloat16",
    )
    config.save_pretrained(tmp)
    encoder = packaged_encoder_dir()
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(encoder / name, tmp / name)
    tok_config = json.loads((encoder / "tokenizer_config.json").read_text())
    # The WordPiece tokenizer ends a sequence with [SEP]: make it the EOS a causal LM needs.
    tok_config.update({"eos_token": "[SEP]", "bos_token": "[CLS]", "model_max_length": 4096})
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))

    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    size, count, total = 0, 0, 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, size, count
        if shard:
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            files.append(name)
            for key in shard:
                weight_map[key] = name
            shard, size = {}, 0

    started = time.perf_counter()
    for index, (name, dims) in enumerate(names):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        if len(dims) == 1:
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if size and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
        if index % 20 == 0:
            elapsed = time.perf_counter() - started
            print(f"  writing {directory.name}: {total / 2**30:.1f} GiB, {elapsed:.0f} s", flush=True)
    flush()
    # Shard names carry the count, as transformers writes them.
    final: dict[str, str] = {}
    for number, name in enumerate(files, 1):
        new = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        os.rename(tmp / name, tmp / new)
        final[name] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    os.rename(tmp, directory)
    print(f"  wrote {directory} ({total / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s", flush=True)
    return directory


# ----------------------------------------------------------------------------- `lorakit train` as a user runs it


def run_train(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run `lorakit train` and measure it: the load's peak, then (reset) the training's peak.

    The load phase ends with the "model: ..." line lorakit prints once the model is loaded.
    """
    out = Path(tempfile.mkdtemp(prefix="bigmodel-"))
    cmd = [str(REPO / ".venv" / "bin" / "lorakit"), "train", *argv, "--out", str(out / "run"), "--no-progress"]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_child_env(int(argv[argv.index("--threads") + 1])),
    )
    state: dict[str, Any] = {"load_peak": 0, "train_peak": 0, "loaded": False, "lines": []}
    lock = threading.Lock()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            state["lines"].append(line.rstrip())
            print("    | " + line.rstrip(), flush=True)
            if line.startswith("model:") and not state["loaded"]:
                with lock:
                    state["load_peak"] = _status_kib(proc.pid, "VmHWM")
                    state["load_seconds"] = time.perf_counter() - started
                    _reset_peak(proc.pid)
                    state["loaded"] = True

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while proc.poll() is None:
        try:
            with lock:
                peak = _status_kib(proc.pid, "VmHWM")
                key = "train_peak" if state["loaded"] else "load_peak"
                state[key] = max(state[key], peak)
        except (FileNotFoundError, ProcessLookupError):
            break
        if time.perf_counter() - started > timeout:
            proc.kill()
            raise SystemExit(f"lorakit train ran past {timeout} s")
        time.sleep(0.2)
    proc.wait()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"lorakit train failed ({proc.returncode}):\n" + "\n".join(state["lines"][-20:]))
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "run" / "summary.json").read_text())
    steps = [m["seconds"] for m in metrics if "seconds" in m]
    result = {
        "load_peak_mib": state["load_peak"] / 1024,
        "train_peak_mib": state["train_peak"] / 1024,
        "process_peak_mib": max(state["load_peak"], state["train_peak"]) / 1024,
        "load_seconds": state.get("load_seconds"),
        "step_seconds": steps,
        "adapter_bytes": summary["adapter_bytes"],
        "wall_seconds": time.perf_counter() - started,
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def _estimate(
    spec: str, *, quantize: str | None, targets: Any, r: int, batch: int, seq: int, ckpt: bool
) -> float | None:
    """lorakit.memory's estimate of the training peak in MiB (None where the module is absent)."""
    try:
        from lorakit import memory
    except ImportError:
        return None
    import lorakit

    config = lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.05)
    estimate = memory.estimate(
        spec, quantize=quantize, lora=config, batch_size=batch, seq_len=seq, grad_checkpointing=ckpt, loss="chunked"
    )
    return estimate.total / MIB


def row_7b(args: argparse.Namespace) -> dict[str, Any]:
    from lorakit.models import cache_dir

    shape = QUICK_SHAPE if args.quick else LLAMA2_7B
    name = "llama-quick-shape" if args.quick else "llama2-7b-shape"
    directory = write_random_llama(cache_dir() / "bigmodel" / name, shape)
    seq = 64 if args.quick else 256
    argv = ["--model", str(directory), "--quantize", "nf4", "--target", "all-linear", "-r", "16"]
    argv += f"--grad-checkpointing --eval-every none --seq-len {seq} --max-steps 2 {_COMMON}".split()
    result = run_train([*argv, "--threads", str(args.threads)], args.timeout)
    result["estimate_mib"] = _estimate(
        str(directory), quantize="nf4", targets="all-linear", r=16, batch=1, seq=seq, ckpt=True
    )
    result["disk_gib"] = sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**30
    return result


def row_nf4_vs_fp32(args: argparse.Namespace) -> dict[str, Any]:
    import _large_model

    models = ["smollm2-135m"] if args.quick else ["smollm2-135m", "qwen2.5-coder-0.5b"]
    out: dict[str, Any] = {}
    for model in models:
        spec = _large_model.resolve(model)
        for scheme in ("none", "nf4"):
            argv = ["--model", spec, "--quantize", scheme, "--target", "q_proj,v_proj", "-r", "8"]
            argv += f"--seq-len 128 --max-steps 3 {_COMMON}".split()
            out[f"{model}/{scheme}"] = run_train([*argv, "--threads", str(args.threads)], args.timeout)
    return out


# ----------------------------------------------------------------------------- in-process rows (children)


def _child(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one in-process measurement in a fresh interpreter; its JSON is the last stdout line."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        row,
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--model",
        args.model,
        "--rounds",
        str(args.rounds),
        *(["--quick"] if args.quick else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(args.threads), timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _smollm2(args: argparse.Namespace, targets: Any, r: int):
    import torch

    import lorakit
    from lorakit.models import load_model

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, _, _ = load_model(args.model, dtype=dtype)
    if args.quick:
        model.model.layers = model.model.layers[:2]
    lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.05))
    return model.to(args.device).train()


def _batch(model, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    batch, seq = (2, 128) if args.quick else (8, 512)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _hwm_delta(step, device: str) -> float:
    """MiB the process's peak rises above its resident set while `step()` runs (CUDA: allocated)."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    base = _status_kib("self", "VmRSS")
    _reset_peak("self")
    step()
    return (_status_kib("self", "VmHWM") - base) / 1024


def _alternated(steps: dict[str, Any], device: str, rounds: int = 2) -> dict[str, float]:
    """Each of two steps once a round, the order reversed every other round, after a warm-up round:
    `step_s_<kind>` (median), `step_s_min_<kind>` and `step_peak_mib_<kind>` (above the resident set)."""
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    peaks: dict[str, list[float]] = {kind: [] for kind in steps}
    kinds = list(steps)
    for round_ in range(rounds + 1):
        for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
            t0 = time.perf_counter()
            peak = _hwm_delta(steps[kind], device)
            if round_:  # round 0 warms up
                times[kind].append(time.perf_counter() - t0)
                peaks[kind].append(peak)
    out: dict[str, float] = {}
    for kind in kinds:
        out[f"step_s_{kind}"] = statistics.median(times[kind])
        out[f"step_s_min_{kind}"] = min(times[kind])
        out[f"step_peak_mib_{kind}"] = max(peaks[kind])
    return out


def child_loss(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lorakit.train import train_step
    from lorakit.train.chunked_loss import chunked_head, linear_cross_entropy
    from lorakit.train.loss import loss_sum

    model = _smollm2(args, "all-linear", 16)
    batch = _batch(model, args)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = chunked_head(model)
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state.detach()
    labels = batch["labels"]
    out: dict[str, Any] = {"tokens": int(labels.numel()), "vocab": model.config.vocab_size}

    def loss_only(kind: str):
        def run() -> None:
            h = hidden.clone().requires_grad_()
            value = loss_sum(head(h), labels) if kind == "full" else linear_cross_entropy(h, head, labels)
            value.backward()

        return run

    for kind in ("full", "chunked", "full", "chunked"):  # the first of each warms up
        out[f"loss_mib_{kind}"] = _hwm_delta(loss_only(kind), args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    steps = {kind: (lambda kind=kind: train_step(model, [batch], optimizer, loss=kind)) for kind in ("full", "chunked")}
    return {**out, **_alternated(steps, args.device, args.rounds)}


def child_ckpt(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lorakit.train import train_step
    from lorakit.train.checkpointing import disable_grad_checkpointing, enable_grad_checkpointing

    model = _smollm2(args, "all-linear", 16)
    batch = _batch(model, args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    out: dict[str, Any] = {}

    def step(checkpointing: bool) -> None:
        (enable_grad_checkpointing if checkpointing else disable_grad_checkpointing)(model)
        train_step(model, [batch], optimizer)

    out.update(_alternated({"off": lambda: step(False), "on": lambda: step(True)}, args.device, args.rounds))
    batch_size, seq = batch["input_ids"].shape
    for ckpt in (False, True):
        est = _estimate(args.model, quantize=None, targets="all-linear", r=16, batch=batch_size, seq=seq, ckpt=ckpt)
        out[f"estimate_mib_{'on' if ckpt else 'off'}"] = est
    out["rss_mib"] = _status_kib("self", "VmRSS") / 1024
    return out


def child_peft(args: argparse.Namespace, four_bit: bool) -> dict[str, Any]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from lorakit.models import ensure_cached

    directory = ensure_cached(args.model)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32}
    if four_bit:
        try:
            import bitsandbytes  # noqa: F401

            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            )
        except Exception as exc:  # not installed, or no backend for this machine
            return {"error": f"bitsandbytes 4-bit unavailable: {type(exc).__name__}: {str(exc)[:120]}"}
    start_rss = _status_kib("self", "VmRSS")
    _reset_peak("self")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except Exception as exc:
        return {"error": f"from_pretrained: {type(exc).__name__}: {str(exc)[:160]}"}
    load_peak = _status_kib("self", "VmHWM")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    model = get_peft_model(model, config)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    _reset_peak("self")
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "load_peak_mib": load_peak / 1024,
        "train_peak_mib": _status_kib("self", "VmHWM") / 1024,
        "imports_mib": start_rss / 1024,
    }


# ----------------------------------------------------------------------------- report


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "7b" in results:
        r = results["7b"]
        steps = r["step_seconds"]
        est = r.get("estimate_mib")
        lines += [
            "**7B-shape QLoRA through `lorakit train`** (NF4 base, all-linear r=16, gradient checkpointing, "
            "chunked loss, 1×256, 2 steps)",
            "",
            _report.markdown_table(
                [
                    "load peak RSS MiB",
                    "train peak RSS MiB",
                    "estimate MiB",
                    "estimate / measured",
                    "load s",
                    "step s",
                    "adapter MB",
                    "shards on disk GiB",
                ],
                [
                    [
                        _mib(r["load_peak_mib"]),
                        _mib(r["train_peak_mib"]),
                        _mib(est),
                        "–" if est is None else f"{est / r['train_peak_mib']:.2f}",
                        f"{r['load_seconds']:.0f}",
                        ", ".join(f"{s:.0f}" for s in steps),
                        f"{r['adapter_bytes'] / 1e6:.1f}",
                        f"{r['disk_gib']:.1f}",
                    ]
                ],
            ),
            "",
        ]
    if "nf4-vs-fp32" in results:
        rows = []
        data = results["nf4-vs-fp32"]
        for model in dict.fromkeys(k.split("/")[0] for k in data):
            fp32, nf4 = data[f"{model}/none"], data[f"{model}/nf4"]
            rows.append(
                [
                    model,
                    _mib(fp32["process_peak_mib"]),
                    _mib(nf4["process_peak_mib"]),
                    f"{nf4['process_peak_mib'] / fp32['process_peak_mib']:.2f}×",
                    _mib(fp32["load_peak_mib"]),
                    _mib(nf4["load_peak_mib"]),
                ]
            )
        lines += [
            "**Whole-process peak, `lorakit train` load + 3 steps, 1×128, q,v r=8**",
            "",
            _report.markdown_table(
                ["model", "fp32 base MiB", "NF4 base MiB", "NF4 / fp32", "fp32 load peak", "NF4 load peak"], rows
            ),
            "",
        ]
    if "peft" in results:
        rows = []
        for name, r in results["peft"].items():
            if "error" in r:
                rows.append([name, "–", "–", r["error"]])
            else:
                rows.append([name, _mib(r["load_peak_mib"]), _mib(max(r["load_peak_mib"], r["train_peak_mib"])), ""])
        lines += [
            "**PEFT + transformers, the same SmolLM2 flow** (from_pretrained, q,v r=8, 3 steps at 1×128)",
            "",
            _report.markdown_table(["row", "load peak MiB", "process peak MiB", "note"], rows),
            "",
        ]
    if "loss" in results and "error" not in results["loss"]:
        r = results["loss"]
        lines += [
            f"**Chunked vs full loss** (SmolLM2, all-linear r=16, {r['tokens']} tokens, vocab {r['vocab']})",
            "",
            _report.markdown_table(
                [
                    "loss",
                    "loss's own memory MiB",
                    "vs full",
                    "step s (median)",
                    "step vs full",
                    "fastest vs fastest",
                    "step peak MiB",
                ],
                [
                    [
                        kind,
                        _mib(r[f"loss_mib_{kind}"]),
                        f"{r[f'loss_mib_{kind}'] / r['loss_mib_full']:.3f}×",
                        f"{r[f'step_s_{kind}']:.2f}",
                        f"{r[f'step_s_{kind}'] / r['step_s_full']:.3f}×",
                        f"{r[f'step_s_min_{kind}'] / r['step_s_min_full']:.3f}×",
                        _mib(r[f"step_peak_mib_{kind}"]),
                    ]
                    for kind in ("full", "chunked")
                ],
            ),
            "",
        ]
    if "ckpt" in results and "error" not in results["ckpt"]:
        r = results["ckpt"]
        lines += [
            "**Gradient checkpointing** (SmolLM2, all-linear r=16, chunked loss; peak above the resident set)",
            "",
            _report.markdown_table(
                [
                    "checkpointing",
                    "step peak MiB",
                    "vs off",
                    "step s (median)",
                    "vs off",
                    "fastest vs fastest",
                    "estimate MiB (whole process)",
                    "resident set MiB",
                ],
                [
                    [
                        kind,
                        _mib(r[f"step_peak_mib_{kind}"]),
                        f"{r[f'step_peak_mib_{kind}'] / r['step_peak_mib_off']:.2f}×",
                        f"{r[f'step_s_{kind}']:.2f}",
                        f"{r[f'step_s_{kind}'] / r['step_s_off']:.2f}×",
                        f"{r[f'step_s_min_{kind}'] / r['step_s_min_off']:.2f}×",
                        _mib(r.get(f"estimate_mib_{kind}")),
                        _mib(r["rss_mib"]),
                    ]
                    for kind in ("off", "on")
                ],
            ),
            "",
        ]
    for name in ("loss", "ckpt"):
        if name in results and "error" in results[name]:
            lines.append(f"{name}: error {results[name]['error']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="small shapes: checks every row runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="the model of the loss, ckpt and peft rows: the packaged alias (default) or a transformers directory "
        "of the same shape (e.g. a random-weight twin, benchmarks/_twin.py, where the package cannot travel)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="timed rounds of the loss and ckpt rows (after a warm-up round)"
    )
    parser.add_argument("--timeout", type=float, default=5400, help="seconds before a run is killed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "loss":
            result = child_loss(args)
        elif args.child == "ckpt":
            result = child_ckpt(args)
        else:
            result = child_peft(args, four_bit=args.child == "peft-4bit")
        print(json.dumps(result))
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; the rows are {', '.join(ROWS)}")
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for row in rows:
        print(f"[{row}]", flush=True)
        if row == "7b":
            results[row] = row_7b(args)
        elif row == "nf4-vs-fp32":
            results[row] = row_nf4_vs_fp32(args)
        elif row == "peft":
            results[row] = {
                "PEFT, fp32 base": _child("peft", args),
                "PEFT + bitsandbytes 4-bit": _child("peft-4bit", args),
            }
        else:
            results[row] = _child(row, args)
        print(json.dumps(results[row], indent=1), flush=True)
    text = report(results)
    print(f"\n{args.threads} threads, {args.device}, {'quick shapes' if args.quick else 'full size'}\n")
    print(text)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    if args.out:
        _report.write_json(args.out, {"argv": sys.argv, "results": results})


if __name__ == "__main__":
    main()
