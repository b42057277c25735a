"""`--report-to` (`lorakit.train.reporting`): TensorBoard event files and an MLflow store under the run's
directory hold the metrics.jsonl lines, read back with TensorBoard's own `EventAccumulator` and MLflow's
client — also after a crash and a resume — and a missing extra names itself before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorakit.train import TrainConfig, fit
from lorakit.train.reporting import MLFLOW_EXPERIMENT, MLFLOW_STORE, TENSORBOARD_DIR
from tests.conftest import REPO
from tests.unit.test_train import batches, lora_llama, token_data

KEYS = ("epoch", "loss", "lr", "grad_norm", "tokens_per_s", "seconds")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _mlflow(out: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / MLFLOW_STORE}")
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    return {key: sorted((m.step, m.value) for m in points) for key, points in history.items()}, run


def _expected(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for key, value in line.items():
            if key != "step":
                out.setdefault(key, []).append((line["step"], float(value)))
    return out


def assert_reports_equal_metrics(out: Path, status: str) -> None:
    lines = _metrics(out)
    expected = _expected(lines)
    assert set(KEYS) | {"eval_loss"} <= set(expected)
    # TensorBoard keeps a scalar as float32: each value is the metrics.jsonl value rounded once.
    board = _tensorboard(out)
    assert board.keys() == expected.keys()
    for key, points in expected.items():
        assert board[key] == [(step, float(np.float32(value))) for step, value in points], key
    history, run = _mlflow(out)
    assert history == expected  # float64: exact
    assert run.info.status == status and run.info.run_name == out.name
    assert run.data.params["report_to"] == "['tensorboard', 'mlflow']"


def _eval(model) -> dict[str, float]:
    return {"loss": float(sum(p.detach().abs().sum() for p in model.parameters() if p.requires_grad))}


class _Crash(Exception):
    pass


def test_fit_reports_its_metrics_lines_to_tensorboard_and_mlflow_and_again_after_a_resume(tmp_path):
    ids, labels = token_data(rows=8)
    data = batches(ids, labels, 2)
    config = TrainConfig(
        lr=1e-2, max_steps=6, batch_size=2, save_every=3, eval_every=2, report_to=["tensorboard", "mlflow"]
    )
    whole = tmp_path / "whole"
    fit(lora_llama(dropout=0.05), data, config, whole, batches_per_epoch=4, eval_fn=_eval)
    assert [m["step"] for m in _metrics(whole)] == [1, 2, 3, 4, 5, 6]
    assert_reports_equal_metrics(whole, "FINISHED")

    def crash(step, record):
        if step == 5:
            raise _Crash

    split = tmp_path / "split"
    with pytest.raises(_Crash):
        fit(lora_llama(dropout=0.05), data, config, split, batches_per_epoch=4, eval_fn=_eval, on_step=crash)
    assert_reports_equal_metrics(split, "FAILED")  # steps 1-5, step 5 past the checkpoint at 3
    assert [m["step"] for m in _metrics(split)] == [1, 2, 3, 4, 5]
    fit(lora_llama(dropout=0.05), data, config, split, batches_per_epoch=4, eval_fn=_eval, resume=True)
    # Steps 4 and 5 were computed twice; metrics.jsonl and both reports hold each step once.
    assert [m["step"] for m in _metrics(split)] == [1, 2, 3, 4, 5, 6]
    assert_reports_equal_metrics(split, "FINISHED")
    assert [m["loss"] for m in _metrics(split)] == pytest.approx([m["loss"] for m in _metrics(whole)], abs=1e-6)
    assert len(list((split / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1


def test_a_missing_reporting_extra_is_named_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys\nsys.modules['mlflow'] = None  # import raises ImportError\n"
        "from lorakit.cli import main\n"
        f"sys.exit(main(['train', '--report-to', 'tensorboard,mlflow', '--out', {str(out)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit train: error: "), proc.stderr
    assert "--report-to mlflow needs mlflow" in lines[0] and "pip install 'lorakit[mlflow]'" in lines[0]
    assert not out.exists() and proc.stdout == ""
