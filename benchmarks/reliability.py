"""Issue 28: does a training run survive being killed, and a full disk, without losing anything?

Two parts, each printed as a markdown table (and saved with `--out FILE.json`):

1. **The SIGKILL campaign.** An uninterrupted `lorakit train` runs first (the reference). Then, 20
   times (`--kills`), the same run starts afresh and is killed with SIGKILL at a random moment of a
   chosen kind — during an optimizer step, during an evaluation, during a checkpoint write (taken in
   turn) — and `lorakit train --out X --resume` continues it. Each one is judged against the
   reference: the adapter files bit for bit (safetensors bytes; the config as JSON), metrics.jsonl's
   steps and losses, every checkpoint left by the kill complete (its manifest verifies), no
   temporary file and no lock file left after the resume. Goal: 20/20.

   To hit a phase rather than a random instant, the victim runs as `python reliability.py --child
   MARKERS -- train ...`: the same `lorakit.cli.main`, with the loop's step, evaluation, checkpoint
   and final-save functions wrapped to append `time phase begin|end` lines to MARKERS. The kill waits
   for the chosen occurrence (random) of the phase to begin, then sleeps a random fraction of how long
   that occurrence took in the reference. The table reports where the kill actually landed (the last
   marker) and from which checkpoint the resume started. The resume is the plain console script.

2. **Disk faults** (`--faults`, on unless `--no-faults`): `tests/train_faults.py`'s sweep in this
   process — the short run of `tests/tiny_run.py` (71 low-level writes and fsyncs) with each call in
   turn failing (ENOSPC, then EIO, alternately; `--quick`: the test suite's sample), checked and
   resumed — and every call of `compress`, `export` (gguf-lora over an existing file) and `merge`
   failing. Tallied per kind of call and file: injected, lost (any check that failed), resumed
   exactly, and the message a user saw.

    .venv/bin/python benchmarks/reliability.py --quick                 # tiny model, 6 kills, sampled faults (~2 min)
    .venv/bin/python benchmarks/reliability.py --out runs/bench/reliability.json   # SmolLM2, 20 kills, every fault

The full campaign trains the packaged SmolLM2-135M (q,v r=8, dropout 0.05) on the bundled E2E
sample for 14 steps of 2×2 rows, a checkpoint every 2 steps, an evaluation every 4; `--quick` (and
`--model tiny`) uses `tests/tiny_run.py`'s one-block model for 16 steps.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.faults, tests.tiny_run, tests.train_faults

LORAKIT = Path(sys.executable).with_name("lorakit")
PHASES = ("step", "eval", "checkpoint")  # the kinds of moment killed in turn
TEMPORARY = re.compile(r"\..+(\.[a-z0-9_]{8}\.tmp|\.tmp-[a-z0-9_]{8}|\.old-\d+-[0-9a-f]{8}|\.staging)")


# ------------------------------------------------------------------------------------------ child
def child(markers: str, argv: list[str]) -> int:
    """`lorakit.cli.main(argv)` with phase markers appended to `markers` (one os.write per line)."""
    import lorakit.train.loop as loop
    import lorakit.train.run as run
    from lorakit.cli import main

    fd = os.open(markers, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def mark(phase: str, edge: str) -> None:
        os.write(fd, f"{time.monotonic():.6f} {phase} {edge}\n".encode())

    def wrap(owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            mark(phase, "begin")
            try:
                return original(*args, **kwargs)
            finally:
                mark(phase, "end")

        setattr(owner, name, wrapped)

    wrap(loop._Loop, "step", "step")
    wrap(loop, "_evaluate", "eval")
    wrap(loop, "save_checkpoint", "checkpoint")
    wrap(loop, "_save_result", "adapter")
    wrap(run, "plot_losses", "plot")
    mark("start", "begin")
    return main(argv)


# ------------------------------------------------------------------------------------------ campaign
@dataclass
class Kill:
    """One killed and resumed run."""

    index: int
    target: str  # the phase aimed at
    occurrence: int  # which occurrence of it (0-based)
    delay_s: float  # after it began
    landed: str = ""  # the phase in progress at the kill ("between: after X" when none)
    resumed_from: str = ""  # the checkpoint the resume started from
    identical: bool = False  # adapter bytes, config and metrics equal the reference's
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _read_markers(path: Path) -> list[tuple[float, str, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((float(parts[0]), parts[1], parts[2]))
    return out


def _occurrences(markers: list[tuple[float, str, str]]) -> dict[str, list[float]]:
    """phase -> the duration of each occurrence, in order."""
    open_at: dict[str, float] = {}
    found: dict[str, list[float]] = collections.defaultdict(list)
    for t, phase, edge in markers:
        if edge == "begin":
            open_at[phase] = t
        elif phase in open_at:
            found[phase].append(t - open_at.pop(phase))
    return found


def _landed(markers: list[tuple[float, str, str]], out: Path) -> str:
    steps = sum(1 for _, phase, edge in markers if phase == "step" and edge == "end")
    depth: list[str] = []
    for _, phase, edge in markers:
        if edge == "begin":
            depth.append(phase)
        elif depth and depth[-1] == phase:
            depth.pop()
    inner = [p for p in depth if p != "start"]
    where = inner[-1] if inner else f"between (after {markers[-1][1]} {markers[-1][2]})" if markers else "start-up"
    return f"{where}, {steps} steps done"


def _run_child(args: argparse.Namespace, flags: list[str], out: Path, markers: Path) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(markers), "--"]
    command += ["train", *flags, "--out", str(out)]
    return subprocess.Popen(
        command, env=_env(args.threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _judge(out: Path, ref: Path) -> list[str]:
    from safetensors.torch import load_file

    problems = [f"left {p.relative_to(out)}" for p in out.rglob("*") if TEMPORARY.fullmatch(p.name)]
    if (out / "lorakit.lock").exists():
        problems.append("left lorakit.lock")
    ours, theirs = out / "adapter", ref / "adapter"
    if (ours / "adapter_model.safetensors").read_bytes() != (theirs / "adapter_model.safetensors").read_bytes():
        a, b = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
        diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("nan")
        problems.append(f"adapter_model.safetensors differs (max |diff| {diff:.3g})")
    if json.loads((ours / "adapter_config.json").read_text()) != json.loads(
        (theirs / "adapter_config.json").read_text()
    ):
        problems.append("adapter_config.json differs")
    got, want = _losses(out), _losses(ref)
    if got != want:
        problems.append(f"metrics differ: {len(got)} lines vs {len(want)}")
    return problems


def _losses(out: Path) -> list[tuple]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in map(json.loads, lines)]


def _checkpoints_complete(out: Path) -> list[str]:
    from lorakit.train.checkpoint import list_checkpoints, verify

    problems = []
    for _, path in list_checkpoints(out):
        verdict = verify(path)
        if not verdict.complete:
            problems.append(f"after the kill, {path.name} is incomplete: {verdict.problem}")
    return problems


def campaign(args: argparse.Namespace, flags: list[str], work: Path) -> list[Kill]:
    rng = random.Random(args.seed)
    ref, ref_markers = work / "reference", work / "reference.markers"
    started = time.perf_counter()
    proc = _run_child(args, flags, ref, ref_markers)
    _, err = proc.communicate(timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{err[-3000:]}")
    durations = _occurrences(_read_markers(ref_markers))
    print(
        f"reference run: {time.perf_counter() - started:.1f} s; "
        + ", ".join(f"{p} x{len(d)} ({1000 * sum(d) / len(d):.1f} ms each)" for p, d in sorted(durations.items())),
        file=sys.stderr,
    )
    kills = []
    for index in range(args.kills):
        target = PHASES[index % len(PHASES)]
        occurrence = rng.randrange(len(durations[target]))
        kill = Kill(index + 1, target, occurrence, rng.random() * durations[target][occurrence])
        kills.append(_kill_and_resume(args, flags, work, ref, kill))
        print(
            f"kill {kill.index}/{args.kills}: {kill.target} #{kill.occurrence} +{1000 * kill.delay_s:.1f} ms -> "
            f"{kill.landed}; resumed from {kill.resumed_from}: "
            f"{'identical' if kill.identical else '; '.join(kill.problems)}",
            file=sys.stderr,
        )
    return kills


def _kill_and_resume(args: argparse.Namespace, flags: list[str], work: Path, ref: Path, kill: Kill) -> Kill:
    out, markers = work / f"kill-{kill.index}", work / f"kill-{kill.index}.markers"
    started = time.perf_counter()
    victim = _run_child(args, flags, out, markers)
    seen, offset, deadline = 0, 0, time.monotonic() + args.timeout
    while victim.poll() is None and time.monotonic() < deadline:
        if markers.exists():
            with markers.open() as f:
                f.seek(offset)
                chunk = f.read()
            lines = chunk.splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines = lines[:-1]
            for line in lines:
                offset += len(line)
                if line.split()[1:] == [kill.target, "begin"]:
                    seen += 1
            if seen > kill.occurrence:
                time.sleep(kill.delay_s)
                break
        time.sleep(0.0005)
    if victim.poll() is None:
        victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    kill.landed = _landed(_read_markers(markers), out) if victim.returncode == -signal.SIGKILL else "finished first"
    kill.problems += _checkpoints_complete(out)
    resumed = subprocess.run(
        [str(LORAKIT), "train", "--out", str(out), "--resume"],
        env=_env(args.threads), capture_output=True, text=True, timeout=args.timeout,
    )  # fmt: skip
    found = re.search(r"resuming .* from (step-\d+)", resumed.stdout)
    kill.resumed_from = found.group(1) if found else "step 0"
    if resumed.returncode != 0:
        kill.problems.append(f"resume exited {resumed.returncode}: {resumed.stderr.strip().splitlines()[-1:]}")
    else:
        kill.problems += _judge(out, ref)
    kill.identical = not kill.problems
    kill.seconds = time.perf_counter() - started
    if kill.identical and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return kill


# ------------------------------------------------------------------------------------------ faults
@dataclass
class Tally:
    injected: int = 0
    lost: int = 0
    resumed: int = 0
    message: str = ""
    problems: list[str] = field(default_factory=list)


def fault_sweep(args: argparse.Namespace, work: Path) -> dict[str, Tally]:
    """The training run's calls (every one, or the test's sample with --quick), then merge/export/compress."""
    import warnings

    from tests.faults import sample
    from tests.tiny_run import threads_kept, tiny_data, tiny_model
    from tests.train_faults import count_ops, fresh, inject, reference

    warnings.simplefilter("ignore")  # the resumes' warnings: the tallies say what matters
    model, data = tiny_model(work / "tiny-model"), tiny_data(work / "tiny-data.jsonl")
    tallies: dict[str, Tally] = collections.defaultdict(Tally)
    with threads_kept():
        ref = reference(model, data, work / "fault-ref")
        ops = count_ops(model, data, work / "fault-count")
        chosen = sample(ops) if args.quick else ops
        for i, op in enumerate(chosen):
            code = errno.ENOSPC if i % 2 == 0 else errno.EIO
            outcome = inject(op, model, data, fresh(work / "fault-run"), ref, error=code)
            tally = tallies[f"train: {op.label}"]
            tally.injected += 1
            tally.lost += bool(outcome.lost)
            tally.resumed += outcome.resumed
            tally.message = tally.message or outcome.message.replace(str(work / "fault-run"), "OUT")
            tally.problems += outcome.lost
        print(f"disk faults: {len(chosen)} of the run's {len(ops)} calls failed in turn", file=sys.stderr)
    for name, tally in _command_sweeps(work, model).items():
        tallies[name] = tally
    return tallies


def _command_sweeps(work: Path, model_dir: Path) -> dict[str, Tally]:
    """compress, export (gguf-lora over an existing file) and merge, failing at each of their calls."""
    import copy

    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.analysis.compress import compress
    from lorakit.errors import FileWriteError
    from lorakit.export import export_merged
    from lorakit.export.gguf import export_gguf
    from lorakit.models import load_tokenizer
    from tests.conftest import randomize_adapters
    from tests.faults import Faults

    root = work / "commands"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    lorakit.inject(model, config)
    randomize_adapters(model, seed=1)
    lorakit.save_adapter(model, root / "adapter")
    tokenizer = load_tokenizer(str(model_dir))
    gguf = root / "existing.gguf"
    export_gguf(model, gguf)
    before = gguf.read_bytes()
    second = copy.deepcopy(model)
    randomize_adapters(second, seed=2)

    def leftovers() -> list[str]:
        return [p.name for p in root.rglob("*") if TEMPORARY.fullmatch(p.name)]

    # name -> (write(target), the target counted, the target failed, is the failed target as it was?)
    fault = root / "fault"
    writers = {
        "compress --rank 2 into an empty --out": (
            lambda out: compress(root / "adapter", out, rank=2),
            root / "count",
            fault,
            lambda: fault.is_dir() and not any(fault.iterdir()),
        ),
        "export gguf-lora over an existing file": (
            lambda out: export_gguf(second, out),
            root / "count.gguf",
            gguf,
            lambda: gguf.read_bytes() == before,
        ),
        "merge into a new --out": (
            lambda out: export_merged(copy.deepcopy(model), tokenizer, out),
            root / "count",
            fault,
            lambda: not fault.exists(),
        ),
    }
    tallies: dict[str, Tally] = {}
    for name, (write, counted, failed, unchanged) in writers.items():
        with Faults(root) as counting:
            write(counted)
        ops = counting.ops
        shutil.rmtree(root / "count", ignore_errors=True)
        (root / "count.gguf").unlink(missing_ok=True)
        tally = tallies[name] = Tally()
        for op in ops[:-1]:  # the last call is the folder's sync after the rename: the new output is whole
            shutil.rmtree(fault, ignore_errors=True)
            if failed == fault and name.startswith("compress"):
                fault.mkdir()  # an empty --out the user made
            tally.injected += 1
            problem = "no error"
            with Faults(root, fail_at=op.index):
                try:
                    write(failed)
                except FileWriteError as err:
                    problem = ""
                    tally.message = tally.message or str(err).replace(str(root), "DIR")
            problem = problem or ("" if unchanged() else "the existing output changed")
            problem = problem or ("; ".join(f"left {x}" for x in leftovers()))
            tally.lost += bool(problem)
            tally.problems += [problem] if problem else []
        print(f"disk faults: {name}: {len(ops) - 1} calls failed in turn", file=sys.stderr)
    return tallies


# ------------------------------------------------------------------------------------------ main
def _flags(args: argparse.Namespace, work: Path) -> list[str]:
    if args.model == "tiny":
        from tests.tiny_run import tiny_data, tiny_model

        model, data = tiny_model(work / "tiny-model"), tiny_data(work / "tiny-data.jsonl", rows=40)
        head = ["--model", str(model), "--data", str(data), "--seq-len", "24", "--max-steps", "16"]
        head += ["-r", "4", "--lora-alpha", "8", "--eval-every", "3"]
    else:
        head = ["--model", args.model, "--data", "e2e", "--seq-len", "64", "--max-steps", "14", "--grad-accum", "2"]
        head += ["-r", "8", "--lora-alpha", "16", "--eval-every", "4"]
    tail = ["--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2", "--lora-dropout", "0.05"]
    tail += ["--target", "q_proj,v_proj", "--save-every", "2", "--keep-checkpoints", "2", "--eval-max-rows", "4"]
    tail += ["--samples", "0", "--threads", str(args.threads), "--no-progress"]
    return head + tail


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, 6 kills, the sampled faults")
    parser.add_argument("--kills", type=int, help="SIGKILLs (default 20; --quick 6)")
    parser.add_argument("--model", help="smollm2-135m (default), tiny (--quick), or a model directory")
    parser.add_argument("--seed", type=int, default=0, help="the random moments")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--no-faults", dest="faults", action="store_false", help="skip the disk-fault sweep")
    parser.add_argument("--no-campaign", dest="campaign", action="store_false", help="skip the SIGKILL campaign")
    parser.add_argument("--timeout", type=float, default=900, help="seconds any one run may take")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs that ended identical too")
    parser.add_argument("--out", type=Path, help="write the tables and every number as JSON")
    args = parser.parse_args()
    args.kills = args.kills if args.kills is not None else (6 if args.quick else 20)
    args.model = args.model or ("tiny" if args.quick else "smollm2-135m")
    work = args.work or Path(tempfile.mkdtemp(prefix="lorakit-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    from _report import markdown_table, write_json

    payload: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    if args.campaign:
        flags = _flags(args, work)
        payload["flags"] = flags
        kills = campaign(args, flags, work)
        same = sum(k.identical for k in kills)
        title = f"SIGKILL campaign ({args.model}, {args.kills} kills): {same}/{len(kills)} bit-identical"
        rows = [
            [k.index, k.target, f"#{k.occurrence} +{1000 * k.delay_s:.1f} ms", k.landed, k.resumed_from,
             "yes" if k.identical else "; ".join(k.problems), f"{k.seconds:.1f}"]
            for k in kills
        ]  # fmt: skip
        print(f"\n{title}\n")
        print(markdown_table(["kill", "aimed at", "moment", "landed in", "resumed from", "identical", "s"], rows))
        payload["campaign"] = {"title": title, "kills": [asdict(k) for k in kills]}
    if args.faults:
        tallies = fault_sweep(args, work)
        injected = sum(t.injected for t in tallies.values())
        lost = sum(t.lost for t in tallies.values())
        title = f"Disk faults (ENOSPC/EIO): {injected} injected, {lost} lost something"
        rows = [
            [name, t.injected, t.lost, t.resumed if name.startswith("train") else "–", t.message[:160]]
            for name, t in tallies.items()
        ]
        print(f"\n{title}\n")
        print(markdown_table(["call failed", "injected", "lost", "resumed exactly", "first message"], rows))
        payload["faults"] = {"title": title, "tallies": {k: asdict(v) for k, v in tallies.items()}}
    write_json(args.out, payload)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    failed = (args.campaign and not all(k.identical for k in kills)) or (args.faults and lost)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
