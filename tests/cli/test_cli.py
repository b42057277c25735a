"""The `lorakit` command, run for real: packaged SmolLM2-135M and MiniLM-L6, slices of real data.

Each train run happens once per module and the other commands reuse its output: PEFT loads the
adapter with the same logits, `merge` writes a plain transformers model, `generate`/`eval` read
the run directory, and every bad input ends with exit code 2, one line on stderr naming the
culprit, and no file touched. All the calls run in one module fixture, two at a time, since
most of each one's time is starting Python and loading a model on one core.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import commands
from lorakit.cli.flags import field_help
from lorakit.generate import Decoding, generate
from lorakit.models import ensure_cached, load_model
from lorakit.train.lock import LOCK_FILE as LOCK_NAME

pytestmark = pytest.mark.integration  # the real `lorakit` command on the packaged models

REPO = Path(__file__).resolve().parents[2]
GLUE = REPO.parent / "shared" / "data" / "glue"
BUNDLED = Path(lorakit.__file__).resolve().parent / "data" / "bundled"
LORAKIT = Path(sys.executable).with_name("lorakit")  # the console script, as a user runs it

ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # two processes at a time

# A handful of steps at a high learning rate: enough for the eval loss to fall clearly. The old
# flags (-r, --lora-alpha, --lora-dropout, --target) must keep working beside the generated ones.
TRAIN_FLAGS = ("--max-steps", 6, "--seq-len", 48, "--batch-size", 4, "--lr", 1e-2, "--warmup-steps", 1)
TRAIN_FLAGS += ("-r", 8, "--lora-alpha", 16, "--lora-dropout", 0.05, "--target", "q_proj,v_proj", "--save-every", 6)
QUIET = ("--samples", 0, "--threads", 1, "--no-progress")
CLS_FLAGS = ("--task", "classification", "--model", "minilm-l6", "--max-steps", 4, "--seq-len", 64)
CLS_FLAGS += ("--batch-size", 8, "--lr", 5e-3, "--warmup-steps", 1, "--save-every", 2)
PROMPT = "name : The Eagle | Type : pub | food : French | area : riverside ||"

COMMANDS = commands()


def cli(*args: object, module: bool = False) -> list[str]:
    """The command line `lorakit ARGS` (or `python -m lorakit ARGS`)."""
    head = [sys.executable, "-m", "lorakit"] if module else [str(LORAKIT)]
    return [*head, *map(str, args)]


def snapshot(root: Path) -> dict[str, object]:
    """`root` and every path under it, with size, mtime and content hash (None for directories).

    Not the run lock (`lorakit.lock`): a refused `train --out {run}` takes and drops it while the
    calls beside it watch {run}; test_no_run_lock_is_left_behind checks that none stays."""
    if not root.exists():
        return {str(root): "missing"}
    state: dict[str, object] = {}
    for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
        if path.name == LOCK_NAME:
            continue
        if path.is_dir():
            state[str(path)] = None
        else:
            stat = path.stat()
            state[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


@dataclasses.dataclass
class Result:
    """A finished `lorakit` process, and the watched paths before and after it ran."""

    proc: subprocess.CompletedProcess
    before: dict[str, object]
    after: dict[str, object]


# Every process runs under this umask: neither umask 022's 0o644 nor the private 0o600, so the
# modes of the files it writes can only come from the umask (issue 24: merge wrote 0o600 files).
UMASK, FILE_MODE, FOLDER_MODE = 0o027, 0o640, 0o750


def run(argv: list[str], watch: Sequence[Path] = ()) -> Result:
    before = {k: v for path in watch for k, v in snapshot(path).items()}
    proc = subprocess.run(argv, env=ENV, umask=UMASK, capture_output=True, text=True, timeout=400, check=False)
    return Result(proc, before, {k: v for path in watch for k, v in snapshot(path).items()})


def printed(stdout: str) -> dict[str, float]:
    """`name: value` lines (what `lorakit eval` prints) as a dict."""
    return {k: float(v) for k, v in re.findall(r"^(\w+): (-?[0-9.]+(?:e[-+]?[0-9]+)?)$", stdout, re.MULTILINE)}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def read_tsv(path: Path) -> tuple[list[str], list[str], list[int]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [int(r["label"]) for r in rows]


# ------------------------------------------------------------------------------------- bad input
# id -> (argv, words the one error line must contain). {work}, {out}, {run} (the E2E run) and
# {cls} (the classification run) are filled in; each case gets its own {out} holding one file.
# A refused command changes nothing, and refuses what it can before the slow part: a case that
# passes `--model {work}/weightless` (the packaged model's config and tokenizer, no weights, so
# loading it fails) shows that the command refused before it loaded the model.
TRAIN_SMALL = ("--max-steps", "1", "--seq-len", "32", "--samples", "0", "--no-progress", "--out", "{out}")
WEIGHTLESS = ("--model", "{work}/weightless")
BAD_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "missing-data-file": (
        ("train", "--data", "{work}/no-such-file.jsonl", *TRAIN_SMALL),
        ("{work}/no-such-file.jsonl", "not found"),
    ),
    "empty-data-file": (("train", "--data", "{work}/empty.jsonl", *TRAIN_SMALL), ("empty.jsonl", "empty")),
    "unknown-jsonl-keys": (
        ("train", "--data", "{work}/qa.jsonl", *TRAIN_SMALL),
        ("qa.jsonl", "line 1", "'question'", "'prompt' and 'completion'"),
    ),
    "unknown-tsv-columns": (
        ("train", "--task", "classification", "--model", "minilm-l6", "--data", "{work}/reviews.tsv", *TRAIN_SMALL),
        ("reviews.tsv", "'review'"),
    ),
    "unknown-model-path": (("train", "--model", "{work}/no-such-model", *TRAIN_SMALL), ("{work}/no-such-model",)),
    "bad-toml-key": (
        ("train", "--config", "{work}/run.toml", *TRAIN_SMALL),
        ("run.toml", "learning_rate", "known keys"),
    ),
    "out-holds-a-finished-run": (("train", "--out", "{run}", "--max-steps", "1"), ("{run}", "finished run")),
    "generate-system-without-chat": (
        ("generate", *WEIGHTLESS, "--system", "Answer briefly.", "--max-new-tokens", "2"),
        ("--system", "--chat"),
    ),
    "generate-adapter-for-another-model": (
        ("generate", "--model", "smollm2-135m", "--adapter", "{cls}", "--max-new-tokens", "2"),
        ("adapter_model.safetensors", "bert.encoder", "all-MiniLM-L6-v2"),
    ),
    "merge-adapter-for-another-model": (
        ("merge", "--model", "smollm2-135m", "--adapter", "{cls}", "--out", "{out}/merged"),
        ("adapter_model.safetensors", "bert.encoder", "all-MiniLM-L6-v2"),
    ),
    "merge-out-not-empty": (("merge", "--adapter", "{run}", *WEIGHTLESS, "--out", "{out}"), ("not empty",)),
    # Refused before anything is written or loaded (issue 24: a test per command).
    "train-resume-changed-max-steps": (("train", "--out", "{run}", "--resume", "--max-steps", "12"), ("max_steps",)),
    "train-resume-not-a-run": (("train", "--resume", "--out", "{out}"), ("holds no lorakit run", "keep.txt")),
    "train-out-under-a-file": (
        ("train", *WEIGHTLESS, "--max-steps", "1", "--out", "{out}/keep.txt/run"),
        ("keep.txt", "is a file, not a folder"),
    ),
    "train-jsonl-line-2-not-json": (
        ("train", *WEIGHTLESS, "--data", "{work}/line2.jsonl", *TRAIN_SMALL),
        ("line2.jsonl", "line 2", "invalid JSON"),
    ),
    "train-csv-wrong-columns": (
        ("train", *WEIGHTLESS, "--data", "{work}/qa.csv", *TRAIN_SMALL),
        ("qa.csv", "'question'", "columns"),
    ),
    "generate-adapter-keys-not-peft": (
        ("generate", *WEIGHTLESS, "--adapter", "{work}/foreign-keys", "--max-new-tokens", "2"),
        ("foreign-keys/adapter_model.safetensors", "does not start with"),
    ),
    "eval-adapter-config-not-json": (
        ("eval", *WEIGHTLESS, "--adapter", "{work}/config-not-json", "--data", "{work}/dev16.jsonl"),
        ("config-not-json/adapter_config.json", "not valid JSON"),
    ),
    "eval-jsonl-line-2-not-json": (("eval", *WEIGHTLESS, "--data", "{work}/line2.jsonl"), ("line2.jsonl", "line 2")),
    "merge-out-under-a-file": (
        ("merge", "{run}", *WEIGHTLESS, "--out", "{out}/keep.txt/merged"),
        ("keep.txt", "is a file, not a folder"),
    ),
    "export-lora-outtype": (
        ("export", "{run}", *WEIGHTLESS, "--outtype", "q8_0", "--out", "{out}/adapter.gguf"),
        ("f32, f16 or bf16", "q8_0"),
    ),
    "export-lora-dora": (
        ("export", "{work}/dora", *WEIGHTLESS, "--out", "{out}/adapter.gguf"),
        ("DoRA", "--format gguf"),
    ),
    "export-lora-out-is-a-folder": (("export", "{run}", *WEIGHTLESS, "--out", "{out}"), ("is a directory",)),
    "export-gguf-no-such-base": (
        (
            "export",
            "{run}",
            "--format",
            "gguf",
            *WEIGHTLESS,
            "--base-gguf",
            "{work}/no-such-base.gguf",
            "-o",
            "{out}/m.gguf",
        ),
        ("{work}/no-such-base.gguf",),
    ),
    "export-gguf-adapter-keys-not-peft": (
        ("export", "{work}/foreign-keys", "--format", "gguf", *WEIGHTLESS, "--out", "{out}/m.gguf"),
        ("foreign-keys/adapter_model.safetensors", "does not start with"),
    ),
    "analyze-out-is-a-file": (
        ("analyze", "{run}", "--base", "{work}/weightless", "--out", "{out}/keep.txt"),
        ("keep.txt", "not a directory"),
    ),
    "analyze-adapter-before-the-base": (
        ("analyze", "{work}/foreign-keys", "--base", "{work}/weightless", "--out", "{out}/report"),
        ("foreign-keys/adapter_model.safetensors", "does not start with"),
    ),
    "compress-out-not-empty": (("compress", "{run}", "--rank", "2", "--out", "{out}"), ("not empty",)),
    "compress-out-under-a-file": (
        ("compress", "{run}", "--rank", "2", "--out", "{out}/keep.txt/small"),
        ("keep.txt", "is a file, not a folder"),
    ),
    "serve-no-such-adapter": (
        ("serve", *WEIGHTLESS, "--quantize", "none", "--adapter", "a={work}/no-such-adapter", "--port", "0"),
        ("{work}/no-such-adapter", "does not exist"),
    ),
    "serve-adapter-keys-not-peft": (
        ("serve", *WEIGHTLESS, "--adapter", "a={work}/foreign-keys", "--port", "0"),
        ("foreign-keys/adapter_model.safetensors", "does not start with"),
    ),
    "serve-adapter-dir-not-a-folder": (
        ("serve", "--adapter-dir", "{out}/keep.txt", "--port", "0"),
        ("adapter_dir", "keep.txt", "is not a folder"),
    ),
    "inspect-bad-rank": (("inspect", *WEIGHTLESS, "-r", "0"), ("r must be a positive integer",)),
}
# The cases whose error is about data: the model is never loaded (`lorakit train` prints `model: ...` once it is).
BAD_DATA = ("train-jsonl-line-2-not-json", "train-csv-wrong-columns", "eval-jsonl-line-2-not-json")


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The inputs: slices of real data, and the bad files of BAD_INPUTS."""
    work = tmp_path_factory.mktemp("cli")
    lines = (BUNDLED / "e2e_dev_sample.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (work / "dev16.jsonl").write_text("".join(lines[:16]), encoding="utf-8")  # a small, fixed eval set
    lines = (GLUE / "mrpc" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (work / "mrpc48.tsv").write_text("".join(lines[:49]), encoding="utf-8")  # header + 48 rows, quoting kept
    (work / "empty.jsonl").write_text("")
    (work / "qa.jsonl").write_text('{"question": "name : Aromi ||", "answer": " Aromi is a pub ."}\n')
    (work / "reviews.tsv").write_text("review\tlabel\ngreat food\t1\n")
    (work / "run.toml").write_text("max_steps = 1\nlearning_rate = 0.1\n")
    (work / "line2.jsonl").write_text('{"prompt": "name : Aromi ||", "completion": " Aromi is a pub ."}\n{"prompt": \n')
    (work / "qa.csv").write_text("question,answer\nname : Aromi ||, Aromi is a pub .\n")
    # The packaged model without its weights: a command that loads it fails, naming it.
    (work / "weightless").mkdir()
    for path in ensure_cached("smollm2-135m").iterdir():
        if path.suffix in (".json", ".jinja"):
            shutil.copy(path, work / "weightless" / path.name)
    # Adapters that are refused from their files alone.
    key = "model.layers.0.self_attn.q_proj"
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"]).to_peft_dict()
    pair = {"lora_A.weight": torch.zeros(2, 576), "lora_B.weight": torch.zeros(576, 2)}
    for name, peft_config, tensors in (
        ("foreign-keys", config, {f"{key}.{k}": v for k, v in pair.items()}),  # no base_model.model. prefix
        ("config-not-json", "{not json", {f"base_model.model.{key}.{k}": v for k, v in pair.items()}),
        ("dora", {**config, "use_dora": True}, {f"base_model.model.{key}.{k}": v for k, v in pair.items()}),
    ):
        (work / name).mkdir()
        text = peft_config if isinstance(peft_config, str) else json.dumps(peft_config)
        (work / name / "adapter_config.json").write_text(text)
        save_file(tensors, str(work / name / "adapter_model.safetensors"), metadata={"format": "pt"})
    return work


@pytest.fixture(scope="module")
def results(work) -> dict[str, Result]:
    """Every `lorakit` call of this file, two processes at a time (most of each is one core
    starting Python and loading a model). The two train runs go first; what needs their output
    is queued once both are done, behind the calls that need nothing."""
    run_dir, cls_dir, again = work / "run", work / "cls", work / "cls-again"
    dev, mrpc = work / "dev16.jsonl", work / "mrpc48.tsv"
    trainings = {
        "train": cli("train", "--data", "e2e", "--eval-data", dev, *TRAIN_FLAGS, *QUIET, "--out", run_dir),
        "train-cls": cli("train", *CLS_FLAGS, "--data", mrpc, *QUIET, "--out", cls_dir),
    }
    later = {
        "merge": cli("merge", "--adapter", run_dir, "--out", work / "merged"),
        "generate": cli("generate", "--adapter", run_dir, "--prompt", PROMPT, "--max-new-tokens", 12),
        "generate-chat": cli(
            "generate",
            "--adapter",
            run_dir,
            "--chat",
            "--system",
            "Answer briefly.",
            "--prompt",
            "Name three primary colors.",
            "--max-new-tokens",
            12,
        ),
        "eval": cli("eval", "--adapter", run_dir, "--data", dev, "--seq-len", 48),
        # No --model: the adapter records the packaged encoder, which eval must load (not the default LM).
        "eval-cls": cli("eval", "--adapter", cls_dir, "--task", "classification", "--data", mrpc),
        "train-overwrite": cli(
            "train", *CLS_FLAGS, "--data", mrpc, *QUIET, "--max-steps", 2, "--overwrite", "--out", again
        ),
    }
    now: dict[str, list[str]] = {
        "inspect": cli("inspect", "--target", "all-linear"),
        "help": cli("--help", module=True),  # `python -m lorakit`, what torchrun runs
        **{f"help-{name}": cli(name, "--help") for name in COMMANDS},
        # --debug after the command, or before it (each its own --out: the two run at once, and a
        # second run on one --out is refused by the run lock before the model loads)
        "debug-after": cli("train", "--debug", "--model", work / "no-such-model", "--out", work / "debug-after"),
        "debug-before": cli("--debug", "train", "--model", work / "no-such-model", "--out", work / "debug-before"),
    }
    watch: dict[str, list[Path]] = {}
    for case, (argv, _) in BAD_INPUTS.items():
        out = work / "bad" / case
        out.mkdir(parents=True)
        (out / "keep.txt").write_text(f"written before the {case} run\n")
        command = cli(*(arg.format(work=work, out=out, run=run_dir, cls=cls_dir) for arg in argv))
        (later if any("{run}" in a or "{cls}" in a for a in argv) else now)[case] = command
        # Its --out and every path it names (data, config, run directories) must stay as they were.
        watch[case] = [out, *(Path(arg) for arg in command[1:] if Path(arg).is_absolute())]

    with ThreadPoolExecutor(2) as pool:
        first = {key: pool.submit(run, argv, watch.get(key, ())) for key, argv in {**trainings, **now}.items()}
        futures.wait([first[key] for key in trainings])
        if cls_dir.is_dir():  # a finished run to overwrite (a copy: the others read the original)
            shutil.copytree(cls_dir, again)
        second = {key: pool.submit(run, argv, watch.get(key, ())) for key, argv in later.items()}
    return {key: future.result() for key, future in {**first, **second}.items()}


@pytest.fixture(scope="module")
def trained(work, results) -> tuple[Path, subprocess.CompletedProcess]:
    """`lorakit train` on the packaged default model and the bundled E2E sample, 6 steps."""
    proc = results["train"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work / "run", proc


@pytest.fixture(scope="module")
def classified(work, results) -> tuple[Path, subprocess.CompletedProcess]:
    """`lorakit train --task classification` on the packaged MiniLM-L6 and the MRPC slice, 4 steps."""
    proc = results["train-cls"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work / "cls", proc


@pytest.fixture(scope="module")
def smol() -> tuple[nn.Module, object]:
    model, tokenizer, _ = load_model("smollm2-135m")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def adapted(trained, smol) -> nn.Module:
    """The base model with the trained adapter, loaded by lorakit in this process."""
    base, _ = smol
    return lorakit.load_adapter(copy.deepcopy(base), trained[0] / "adapter").eval()


@pytest.fixture(scope="module")
def e2e_batch(smol, work) -> dict[str, torch.Tensor]:
    _, tokenizer = smol
    rows = [json.loads(line) for line in (work / "dev16.jsonl").read_text().splitlines()[:2]]
    texts = [r["prompt"] + r["completion"] for r in rows]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


# ------------------------------------------------------------------------------------- train
def test_train_writes_the_run_files(trained):
    out, proc = trained
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and "lr" in r and "grad_norm" in r for r in records)
    assert "eval_loss" in records[-1]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["train"]["max_steps"] == 6 and run_config["run"]["seq_len"] == 48
    assert run_config["train"]["lr"] == pytest.approx(1e-2)
    lora = run_config["lora"]
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (8, 16, 0.05)
    assert lora["target_modules"] == ["q_proj", "v_proj"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["final_train_loss"] == pytest.approx(records[-1]["loss"])

    # README: `checkpoints/step-N/` (adapter + optimizer/scheduler/RNG/data position in safetensors
    # + JSON), every --save-every steps.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6"]
    step6 = out / "checkpoints" / "step-6"
    assert sorted(p.name for p in step6.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    state = json.loads((step6 / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (6, 0, 6)  # 6 batches of the first epoch read
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    pickles = [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert pickles == []


def test_train_overwrite_replaces_a_finished_run(results, work):
    proc = results["train-overwrite"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = work / "cls-again"  # held the 4-step classification run, checkpoints/step-4 included
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "run_config.json").read_text())["train"]["max_steps"] == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_train_loss_falls(trained):
    out, _ = trained
    summary = json.loads((out / "summary.json").read_text())
    # Same 16 held-out rows before and after: 6 steps at lr 1e-2 cut it by about a third.
    assert summary["eval_loss_after"] < 0.9 * summary["eval_loss_before"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-2:]) / 2 < losses[0]


def test_train_truncates_long_rows_with_a_warning_and_a_count(trained):
    out, proc = trained
    truncated = json.loads((out / "summary.json").read_text())["truncated_rows"]
    rows = len((BUNDLED / "e2e_train_sample.jsonl").read_text().splitlines())
    assert 0 < truncated < rows  # seq_len 48 cuts the longer E2E references, not all of them
    assert f"{truncated} of {rows} examples are longer than seq_len=48" in proc.stderr
    assert f"truncated: {truncated:,} examples longer than seq_len=48 (each keeps its start" in proc.stdout


def test_peft_loads_the_adapter_with_the_same_logits(trained, smol, adapted, e2e_batch):
    base, _ = smol
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(trained[0] / "adapter")).eval()
    ours_logits = logits(adapted, e2e_batch)
    assert (ours_logits - logits(theirs, e2e_batch)).abs().max() <= 1e-5
    assert (ours_logits - logits(base, e2e_batch)).abs().max() > 1e-2  # the adapter is not a no-op


def test_every_file_lorakit_writes_has_the_umasks_mode(results, trained, classified, work):
    """Training (adapter, checkpoints, metrics, plot, JSON) and `merge` (transformers' save_pretrained,
    whose safetensors writer makes 0o600 files) give what a plain open()/mkdir() would."""
    assert results["merge"].proc.returncode == 0, results["merge"].proc.stderr[-2000:]
    written = [p for d in (work / "run", work / "cls", work / "merged") for p in (d, *d.rglob("*"))]
    names = {p.relative_to(work).as_posix() for p in written}
    assert {"merged/model.safetensors", "run/adapter/adapter_model.safetensors", "run/loss.png"} <= names
    assert any(name.startswith("run/checkpoints/step-") for name in names)
    wrong = {
        p.relative_to(work).as_posix(): oct(p.stat().st_mode & 0o777)
        for p in written
        if p.stat().st_mode & 0o777 != (FOLDER_MODE if p.is_dir() else FILE_MODE)
    }
    assert not wrong, f"not {oct(FILE_MODE)} (files) / {oct(FOLDER_MODE)} (folders) under umask {oct(UMASK)}"


# ------------------------------------------------------------------------------------- merge, generate, eval
def test_merge_writes_a_plain_transformers_model(results, smol, adapted, e2e_batch, work):
    base, _ = smol
    merged_dir = work / "merged"
    proc = results["merge"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(merged_dir.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), local_files_only=True, dtype=torch.float32).eval()
    assert type(merged) is type(base)
    assert sorted(merged.state_dict()) == sorted(base.state_dict())  # no lora_A/B, no base_layer
    assert (logits(merged, e2e_batch) - logits(adapted, e2e_batch)).abs().max() <= 1e-4


def test_generate_prints_the_adapted_models_text(results, smol, adapted):
    _, tokenizer = smol
    proc = results["generate"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    (expected,) = generate(adapted, tokenizer, [PROMPT], Decoding(max_new_tokens=12))  # greedy, the CLI default
    assert expected.strip()
    assert proc.stdout.strip() == expected.strip()


def test_generate_chat_answers_through_the_models_chat_template(results, smol, adapted):
    _, tokenizer = smol
    proc = results["generate-chat"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    # SmolLM2-Instruct's template (ChatML), written out by hand, the assistant's turn opened.
    text = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n"
    )
    (expected,) = generate(adapted, tokenizer, [text], Decoding(max_new_tokens=12))
    (plain,) = generate(adapted, tokenizer, ["Name three primary colors."], Decoding(max_new_tokens=12))
    assert expected.strip() and expected.strip() != plain.strip()  # the template changes the answer
    assert proc.stdout.strip() == expected.strip()


def test_eval_prints_loss_and_perplexity(results, trained):
    out, _ = trained
    proc = results["eval"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    values = printed(proc.stdout)
    assert set(values) == {"loss", "perplexity", "rows"} and values["rows"] == 16  # every row of dev16.jsonl
    # The same rows and seq_len as the run's final eval, now read back from the adapter files.
    assert values["loss"] == pytest.approx(json.loads((out / "summary.json").read_text())["eval_loss_after"], abs=2e-4)
    assert values["perplexity"] == pytest.approx(math.exp(values["loss"]), rel=1e-3)


# ------------------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def cls_models(classified) -> tuple[nn.Module, nn.Module, object]:
    """(PEFT-loaded, lorakit-loaded) MiniLM classifiers sharing one base (same untrained head)."""
    base, tokenizer, _ = load_model("minilm-l6", task="classification")
    adapter = classified[0] / "adapter"
    theirs = PeftModel.from_pretrained(copy.deepcopy(base.eval()), str(adapter)).eval()
    ours = lorakit.load_adapter(copy.deepcopy(base.eval()), adapter).eval()
    return theirs, ours, tokenizer


def test_classification_train_saves_the_head_in_modules_to_save(classified, cls_models, work):
    out, proc = classified
    assert "Traceback" not in proc.stderr
    # LoRA r=8 on query and value of 6 layers (384 -> 384), plus the whole 384 -> 2 head.
    assert f"trainable {6 * 2 * 8 * (384 + 384) + 384 * 2 + 2:,} of" in proc.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert config["target_modules"] and all(t.endswith((".query", ".value")) for t in config["target_modules"])
    saved = tensors(out / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.classifier.weight"].shape == (2, 384)
    assert saved["base_model.model.classifier.bias"].shape == (2,)
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()

    theirs, ours, tokenizer = cls_models
    first, second, _ = read_tsv(work / "mrpc48.tsv")
    batch = dict(tokenizer(first[:8], second[:8], truncation=True, max_length=64, padding=True, return_tensors="pt"))
    ours_logits = logits(ours, batch)
    assert (ours_logits - logits(theirs, batch)).abs().max() <= 1e-5
    # The head is the saved one: logits = pooled · Wᵀ + b with W, b read from the file.
    with torch.no_grad():
        pooled = ours.bert(**batch).pooler_output  # (8, 384)
    weight, bias = saved["base_model.model.classifier.weight"], saved["base_model.model.classifier.bias"]
    torch.testing.assert_close(ours_logits, pooled @ weight.T + bias, rtol=0, atol=1e-5)


def test_classification_eval_reports_accuracy_and_f1(results, cls_models, work):
    proc = results["eval-cls"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    values = printed(proc.stdout)
    assert {"loss", "accuracy", "f1"} <= set(values)

    # Recompute both from PEFT's predictions on the same rows (eval's default seq_len is 128).
    theirs, _, tokenizer = cls_models
    first, second, labels = read_tsv(work / "mrpc48.tsv")
    batch = dict(tokenizer(first, second, truncation=True, max_length=128, padding=True, return_tensors="pt"))
    preds = logits(theirs, batch).argmax(-1).tolist()
    tp = sum(p == y == 1 for p, y in zip(preds, labels, strict=True))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels, strict=True))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels, strict=True))
    accuracy = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    assert values["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert values["f1"] == pytest.approx(f1, abs=1e-4)


# ------------------------------------------------------------------------------------- inspect, --help
def test_inspect_lists_the_adaptable_layers(results, smol):
    base, _ = smol
    proc = results["inspect"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    layers = [(n, m) for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert f"HuggingFaceTB/SmolLM2-135M-Instruct: {len(layers)} adaptable layers" in proc.stdout
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert re.search(rf"^  {leaf} +Linear +weight \[\d+, \d+\] ×30$", proc.stdout, re.MULTILINE), leaf
    # all-linear: every linear layer but the output head (README), 8 × (in + out) parameters each.
    linear = [m for n, m in layers if isinstance(m, nn.Linear) and n != "lm_head"]
    params = sum(8 * (m.in_features + m.out_features) for m in linear)
    assert f"adapts {len(linear)} layers, {params:,} trainable parameters" in proc.stdout


FLAGS = {
    "train": ["--lr", "--batch-size", "--target", "--resume", "--config", "--max-steps", "-r", "--out", "--debug"],
    "generate": ["--adapter", "--prompt", "--max-new-tokens", "--num-beams", "--config", "--debug"],
    "eval": ["--adapter", "--data", "--task", "--e2e-metrics", "--config", "--debug"],
    "merge": ["--adapter", "--model", "--out", "--config", "--debug"],
    "inspect": ["--model", "--target", "-r", "--config", "--debug"],
    "serve": ["--model", "--adapter", "--adapter-dir", "--port", "--max-batch", "--api-key-env", "--quantize"],
    "export": ["--adapter", "--format", "--out", "-o", "--outtype", "--base-gguf", "--config", "--debug"],
    "analyze": ["--adapter", "--compare", "--base", "--energy", "--out", "--debug"],
    "compress": ["--adapter", "--out", "--energy", "--rank", "--debug"],
    "data": ["--data", "--model", "-n", "--fields", "--train-on", "--train-on-eos", "--truncate", "--seq-len"],
}


def _squash(text: str) -> str:
    return "".join(text.split())  # argparse re-wraps help text, also after hyphens


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_flag(results, command):
    proc = results[f"help-{command}"].proc
    assert proc.returncode == 0, proc.stderr
    for flag in FLAGS[command]:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout), flag
    # Every field of the command's config dataclasses is a flag, with the help text of the
    # dataclass's docstring (docs/design.md, "The command line": they cannot drift).
    for spec in COMMANDS[command].specs:
        docs = field_help(spec.cls)
        for field in spec.fields():
            assert "--" + field.name.replace("_", "-") in proc.stdout, field.name
            assert _squash(docs[field.name]) in _squash(proc.stdout), field.name


def test_top_level_help_lists_the_commands(results):
    proc = results["help"].proc
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert re.search(rf"^    {command} ", proc.stdout, re.MULTILINE), command


# ------------------------------------------------------------------------------------- bad input
def assert_one_error_line(proc: subprocess.CompletedProcess, command: str, *culprits: str) -> None:
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-4000:]
    assert lines[0].startswith(f"lorakit {command}: error: "), lines[0]
    for word in culprits:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in proc.stdout


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_error_line_and_touches_nothing(results, work, case):
    result = results[case]
    argv, culprits = BAD_INPUTS[case]
    fill = {"work": work, "out": work / "bad" / case, "run": work / "run", "cls": work / "cls"}
    assert_one_error_line(result.proc, argv[0], *(word.format(**fill) for word in culprits))
    assert result.after == result.before  # the file already in --out, the inputs and run directories


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_reported_before_the_model_loads(results, case):
    proc = results[case].proc
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "model:" not in proc.stdout  # `lorakit train` prints it once the model is loaded
    assert "cannot load" not in proc.stderr  # {work}/weightless has no weights: loading it fails


def test_no_run_lock_is_left_behind(results, work):
    """Every run and every refused run (those on --out {run} included) has let go of its lock."""
    assert not sorted(work.rglob(LOCK_NAME))


@pytest.mark.parametrize("case", ["debug-after", "debug-before"])
def test_debug_shows_the_traceback(results, work, case):
    proc = results[case].proc
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "lorakit.errors.ModelLoadError" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("lorakit train: error: unknown model")
    assert not (work / case).exists()
