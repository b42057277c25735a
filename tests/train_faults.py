"""One disk fault in a short `train_run`, what it must leave, and the resume after it.

`inject(k, ...)` runs the run of `tests.tiny_run` in this process with the k-th low-level write or
fsync under its output directory failing (`tests.faults.Faults`), then checks what the fault left
and resumes:

- the run stopped with a `FileWriteError` naming the file the failed call was writing (a folder's
  sync: the file just renamed into it, or the directory being built) and the OS error;
- no temporary file or directory is left anywhere under the output directory, nor the lock file;
- every checkpoint left is complete (its manifest verifies) and loads, and the newest is the
  newest one whose directory was renamed into place before the fault;
- `adapter/` exists only if it was written before the fault, and then equals the uninterrupted
  run's; metrics.jsonl holds whole lines only, steps 1..m, with the uninterrupted run's losses;
- `train_run(..., resume=True)` then finishes with the uninterrupted run's adapter, byte for byte,
  and its metrics (steps 1..4, the same losses), leaving no temporary file.

Each check returns what it found wrong instead of asserting, so `benchmarks/reliability.py` can
tally a sweep; the tests assert the lists are empty.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from lorakit.errors import FileWriteError
from lorakit.train.checkpoint import STATE_TENSORS, list_checkpoints, read_trainer_state, verify
from lorakit.train.lock import LOCK_FILE
from lorakit.train.run import train_run
from tests.faults import Faults, Op
from tests.tiny_run import run_settings

__all__ = ["Outcome", "count_ops", "inject", "leftovers", "reference"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_TEMPORARY = re.compile(r"\..+(\.[a-z0-9_]{8}\.tmp|\.tmp-[a-z0-9_]{8}|\.old-\d+-[0-9a-f]{8}|\.staging)")


@dataclass
class Outcome:
    """What one injected fault did.

    Attributes:
        op: the call that failed.
        error: errno name it failed with.
        message: what the run raised (one line), or what else happened.
        lost: what the fault broke or lost (empty: nothing).
        resumed: the resumed run ended with the uninterrupted run's adapter and metrics.
    """

    op: Op
    error: str
    message: str = ""
    lost: list[str] = field(default_factory=list)
    resumed: bool = False


def reference(model: Path, data: Path, out: Path) -> dict:
    """Run the uninterrupted run into `out`; return its adapter bytes and metric losses."""
    train_run(*run_settings(model, data, out), echo=_quiet)
    return {
        "adapter": {name: (out / "adapter" / name).read_bytes() for name in ADAPTER_FILES},
        "losses": [(r["step"], r["loss"], r.get("eval_loss")) for r in _metrics(out)],
    }


def count_ops(model: Path, data: Path, out: Path) -> list[Op]:
    """Every low-level write and fsync of the run, in order (a counting pass, nothing fails)."""
    with Faults(out) as faults:
        train_run(*run_settings(model, data, out), echo=_quiet)
    return faults.ops


def inject(op: Op, model: Path, data: Path, out: Path, ref: dict, *, error: int = errno.ENOSPC) -> Outcome:
    """Fail call `op.index` of the run into `out` (a fresh folder) with `error`, check, resume, compare."""
    outcome = Outcome(op, errno.errorcode[error])
    settings = run_settings(model, data, out)
    with Faults(out, fail_at=op.index, error=error) as faults:
        try:
            train_run(*settings, echo=_quiet)
        except FileWriteError as err:
            outcome.message = str(err)
            outcome.lost += _check_error(err, op, out, error)
        except Exception as err:  # any other failure is a finding, not a crash of the sweep
            outcome.message = f"{type(err).__name__}: {err}"
            outcome.lost.append(f"raised {type(err).__name__}, not FileWriteError")
        else:
            outcome.lost.append("the run finished without an error")
    if faults.injected is None or faults.injected.label != op.label:
        outcome.lost.append(f"call {op.index} was {faults.injected}, not {op.label} (the run is not deterministic)")
    outcome.lost += _check_left(op, out, ref, faults.ops)
    run, lora, train = settings
    run.resume = True
    try:
        train_run(run, lora, train, echo=_quiet)
    except Exception as err:
        outcome.lost.append(f"resume failed: {type(err).__name__}: {err}")
        return outcome
    problems = _check_finished(out, ref)
    outcome.lost += problems
    outcome.resumed = not problems
    return outcome


def leftovers(out: Path) -> list[str]:
    """Temporary files and directories of lorakit.atomic (and the lock file) anywhere under `out`."""
    found = [p.relative_to(out).as_posix() for p in out.rglob("*") if _TEMPORARY.fullmatch(p.name)]
    return found + ([LOCK_FILE] if (out / LOCK_FILE).exists() else [])


# ---------------------------------------------------------------------------------------- checks
def _check_error(err: FileWriteError, op: Op, out: Path, code: int) -> list[str]:
    problems = []
    if err.errno != code or errno.errorcode[code] not in str(err):
        problems.append(f"the error does not carry {errno.errorcode[code]}: {err}")
    named = Path(err.filename or "")
    meant = out / _final(op.path)
    # A folder's sync names the folder (a directory being built) or the file just renamed into it.
    ok = named == meant or (op.path.endswith("/") and named.parent == meant)
    if not ok or f"cannot write {named}" not in str(err):
        problems.append(f"the error names {named}, not {meant}: {err}")
    if "\n" in str(err):
        problems.append("the message is more than one line")
    return problems


def _check_left(op: Op, out: Path, ref: dict, ops: list[Op]) -> list[str]:
    problems = [f"left {name}" for name in leftovers(out)]
    renamed = _renamed_before(op, ops)
    done = sorted(int(name[len("step-") :]) for name in renamed if name.startswith("step-"))
    found = list_checkpoints(out)
    for _, path in found:
        verdict = verify(path)
        if not verdict.complete or verdict.problem:
            problems.append(f"{path.name} is not complete: {verdict.problem}")
            continue
        try:
            read_trainer_state(path)
            load_file(path / STATE_TENSORS)
            load_file(path / ADAPTER_FILES[0])
        except Exception as err:
            problems.append(f"{path.name} does not load: {err}")
    newest = found[-1][0] if found else None
    if newest != (done[-1] if done else None):
        problems.append(f"the newest checkpoint is {newest}, expected {done[-1] if done else None}")
    adapter = out / "adapter"
    if adapter.exists() != ("adapter" in renamed):
        problems.append(f"adapter/ {'exists' if adapter.exists() else 'is missing'} after call {op.index}")
    elif adapter.exists():
        for name, data in ref["adapter"].items():
            if not (adapter / name).is_file() or (adapter / name).read_bytes() != data:
                problems.append(f"adapter/{name} differs from the uninterrupted run's")
    problems += _check_metrics(out, ref, complete=False)
    return problems


def _renamed_before(op: Op, ops: list[Op]) -> set[str]:
    """The directories built whole (`step-N`, `adapter`) that were renamed into place before `op`
    failed: build_directory renames one right after the last call inside its temporary folder."""
    last: dict[str, int] = {}
    for o in ops:
        m = re.search(r"(?:^|/)\.(step-\d+|adapter)\.tmp-[a-z0-9_]{8}/", o.path)
        if m:
            last[m.group(1)] = o.index
    return {name for name, index in last.items() if index < op.index}


def _check_finished(out: Path, ref: dict) -> list[str]:
    problems = [f"left {name} after the resume" for name in leftovers(out)]
    for name, data in ref["adapter"].items():
        path = out / "adapter" / name
        if not path.is_file() or path.read_bytes() != data:
            problems.append(f"resumed adapter/{name} differs from the uninterrupted run's")
    problems += _check_metrics(out, ref, complete=True)
    return problems


def _check_metrics(out: Path, ref: dict, *, complete: bool) -> list[str]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return [] if not complete else ["metrics.jsonl is missing"]
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        return ["metrics.jsonl ends in a torn line"]
    try:
        records = [json.loads(line) for line in text.splitlines()]
    except json.JSONDecodeError:
        return ["metrics.jsonl holds a torn line"]
    got = [(r["step"], r["loss"], r.get("eval_loss")) for r in records]
    want = ref["losses"] if complete else ref["losses"][: len(got)]
    return [] if got == want else [f"metrics.jsonl holds {got}, expected {want}"]


def _final(path: str) -> str:
    """The path a temporary one becomes: `checkpoints/.step-2.tmp-ab12cd34/.x.json.a1b2c3d4.tmp`
    -> `checkpoints/step-2/x.json` (step numbers kept)."""
    parts = []
    for part in path.rstrip("/").split("/"):
        part = re.sub(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$", r"\1", part)
        part = re.sub(r"^\.(.+)\.tmp-[a-z0-9_]{8}$", r"\1", part)
        parts.append(part)
    return "/".join(p for p in parts if p not in ("", "."))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _quiet(_line: str) -> None:
    pass


def fresh(folder: Path) -> Path:
    """`folder`, emptied."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder
