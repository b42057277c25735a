"""The memory preflight in real `lorakit` processes: `inspect` on a config-only 7B-shape directory,
and `train`'s warning before the model loads.

The directories hold a config.json (and for `train` the packaged tokenizer's files) but no weight
file: the estimate reads the config alone, so `inspect` answers without one, and `train` prints its
warning before the load that then fails for want of weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit import LoraConfig, memory
from lorakit.models import ensure_cached

pytestmark = pytest.mark.integration  # the real `lorakit` command

LORAKIT = Path(sys.executable).with_name("lorakit")  # the console script, as a user runs it
ENV = {
    k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", memory.AVAILABLE_MEMORY_ENV)
}
ENV.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}

# Runs a command and reports its peak resident memory (the only child of this wrapper).
_MEASURED = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=300)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr, "peak": peak}))
"""


def test_inspect_estimates_a_7b_shape_from_its_config_alone(tmp_path):
    model = tmp_path / "llama2-7b-shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    argv = [str(LORAKIT), "inspect", "--model", str(model), "--quantize", "nf4", "--target", "all-linear", "-r", "16"]
    argv += ["--seq-len", "256", "--batch-size", "1"]
    env = {**ENV, memory.AVAILABLE_MEMORY_ENV: "2G"}
    result = json.loads(
        subprocess.run(
            [sys.executable, "-c", _MEASURED, *argv], env=env, capture_output=True, text=True, timeout=400, check=True
        ).stdout
    )
    assert result["rc"] == 0, result["err"][-3000:]
    out = result["out"]
    # 32 blocks of 7 linear layers, the embedding and the head; the 7B's 6.74e9 parameters.
    assert f"{model.resolve()}: 226 adaptable layers" in out
    assert "of 6,738,415,616)" in out
    # The process never held a weight: far below the NF4 model's 3.9 GB (let alone fp32's 27 GB).
    assert result["peak"] < 1.5 * 2**30, result["peak"]
    lines = out.splitlines()
    start = lines.index("memory estimate for training, batch 1 × 256 tokens, linear layers as nf4:")
    table = {line.split("  ")[1].strip(): line for line in lines[start + 1 : start + 8]}
    assert list(table) == [
        "weights",
        "adapters + optimizer",
        "activations",
        "loss (chunked)",
        "runtime",
        "total",
        "available RAM",
    ]
    est = memory.estimate(
        str(model), quantize="nf4", lora=LoraConfig(r=16, target_modules="all-linear"), batch_size=1, seq_len=256
    )
    assert memory.format_bytes(est.weight_bytes + est.buffers) in table["weights"]
    assert memory.format_bytes(est.total) in table["total"] and table["available RAM"].endswith(
        "2.0 GiB   from $LORAKIT_AVAILABLE_MEMORY"
    )
    # NF4: half a byte per weight, an int8 scaler per 64 and a float32 factor per 256 scalers.
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert 0.515 < est.weights["linear (nf4)"] / linear < 0.517
    assert est.weights["embeddings"] == est.weights["output head"] == 32000 * 4096 * 2  # stored in bf16
    verdict = lines[start + 8]
    assert verdict.startswith(f"does not fit: the estimate, {memory.format_bytes(est.total)}, exceeds"), verdict
    assert "--grad-checkpointing" in verdict and "--quantize nf4" not in verdict


@pytest.fixture
def weightless(tmp_path) -> Path:
    """A small LLaMA's config.json beside the packaged tokenizer's files, and no weights."""
    model = tmp_path / "weightless"
    model.mkdir()
    packaged = ensure_cached("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (packaged / name).is_file():
            shutil.copy(packaged / name, model / name)
    config = {**LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    config.update(num_key_value_heads=4, num_hidden_layers=2, vocab_size=49152)
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("available", ["1M", "1T"])
def test_train_warns_before_loading_when_the_estimate_exceeds_the_memory(weightless, tmp_path, available):
    out = tmp_path / "run"
    argv = [str(LORAKIT), "train", "--model", str(weightless), "--data", "e2e", "--out", str(out)]
    argv += ["--max-steps", "1", "--samples", "0", "--no-progress"]
    env = {**ENV, memory.AVAILABLE_MEMORY_ENV: available}
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    lines = proc.stdout.splitlines()
    # The load then fails (no weights), with the one-line error of bad input; nothing is written.
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert lines[-1].startswith("lorakit train: error: ") and str(weightless) in lines[-1]
    assert not out.exists()
    loading = next(i for i, line in enumerate(lines) if line.startswith("loading model"))
    warned = [i for i, line in enumerate(lines) if line.startswith("lorakit: warning: this run may run out of memory")]
    if available == "1T":
        assert warned == [], proc.stdout
        return
    est = memory.estimate(str(weightless), lora=LoraConfig(), batch_size=8, seq_len=128)  # train's defaults
    assert len(warned) == 1 and warned[0] < loading, proc.stdout
    line = lines[warned[0]]
    assert f"its estimated peak, {memory.format_bytes(est.total)}" in line
    assert "exceeds the 1.0 MiB available" in line
    assert line.endswith("try --quantize nf4, --grad-checkpointing or a smaller --batch-size"), line
