"""The core works without the extras; what needs one says which to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorakit import extras
from lorakit.errors import MissingExtraError
from tests.conftest import REPO

# Every package an extra brings (and PEFT, a test-only dependency), hidden from the child process.
HIDDEN = sorted({m for modules in extras.EXTRAS.values() for m in modules} | {"peft"})
PRELUDE = f"import sys\nfor name in {HIDDEN!r}:\n    sys.modules[name] = None  # import raises ImportError\n"


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_core_imports_and_works_without_any_extra(tmp_path):
    """inject, a training step through fit, save, load into a fresh model, merge: plain torch only."""
    code = f"""
import torch
from torch import nn
import lorakit, lorakit.kernels, lorakit.train, lorakit.data, lorakit.e2e, lorakit.metrics, lorakit.cli
import lorakit.evaluate, lorakit.generate, lorakit.models, lorakit.export
from lorakit.train import TrainConfig, fit

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 16))

model = lorakit.inject(make(), lorakit.LoraConfig(r=2, target_modules=["1", "3"], lora_dropout=0.1))
ids = torch.randint(0, 16, (4, 5))
batch = {{"input": ids, "labels": ids}}

class Wrapped(nn.Module):  # fit passes the batch's keys as keywords
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, input):
        return self.inner(input)

result = fit(Wrapped(model), lambda epoch, start: iter([batch] * (2 - start)), TrainConfig(max_steps=2, lr=1e-2),
             {str(tmp_path)!r}, batches_per_epoch=2, progress=False)
fresh = lorakit.load_adapter(make(), result.adapter_dir).eval()
model.eval()
torch.testing.assert_close(fresh(ids), model(ids))
lorakit.merge(fresh)
print("core ok", result.steps)
"""
    proc = _child(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "core ok 2" in proc.stdout


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["train", "--max-steps", "1"], "cli"),
        (["inspect"], "cli"),
        (["eval", "--e2e-metrics"], "cli"),  # loading the model comes first
    ],
)
def test_a_command_without_its_extra_names_the_extra(argv, extra):
    proc = _child(f"from lorakit.cli import main\nsys.exit(main({argv!r}))")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorakit {argv[0]}: error: "), proc.stderr
    assert f"pip install 'lorakit[{extra}]'" in lines[0] and "transformers" in lines[0]


def test_the_e2e_scores_without_the_eval_extra_name_it():
    proc = _child("import lorakit.e2e as e\ne.mteval_scores(['a b'], [['a b']])")
    assert proc.returncode == 1
    assert "MissingExtraError" in proc.stderr and "pip install 'lorakit[eval]'" in proc.stderr


def test_require_and_require_extra(monkeypatch):
    assert extras.require("json", "cli", "x").dumps([]) == "[]"
    with pytest.raises(MissingExtraError, match=r"loss plots needs no_such_pkg_x.*pip install 'lorakit\[cli\]'"):
        extras.require("no_such_pkg_x", "cli", "loss plots")
    monkeypatch.setitem(extras.EXTRAS, "cli", ("json", "no_such_pkg_y", "no_such_pkg_z"))
    with pytest.raises(MissingExtraError, match="no_such_pkg_y, no_such_pkg_z, which are not installed"):
        extras.require_extra("cli", "lorakit train")
    assert isinstance(MissingExtraError("x"), ImportError)  # catchable without knowing lorakit


def test_nf4_without_the_quantize_extra_names_it_and_changes_nothing():
    code = """
from torch import nn
import lorakit.quantization as Q
model = nn.Sequential(nn.Linear(64, 64))
try:
    Q.quantize(model, "nf4")
except ImportError as err:
    print(type(err).__name__, err, type(model[0]).__name__)
"""
    proc = _child(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MissingExtraError" in proc.stdout and "pip install 'lorakit[quantize]'" in proc.stdout
    assert proc.stdout.strip().endswith("Linear")  # not replaced
