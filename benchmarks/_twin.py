"""A random-weight twin of a causal LM: the same config and tokenizer, seeded random weights.

For machines the packaged model cannot reach (a GPU machine that receives only the repository, too
small a transfer for the 98 MB GGUF): timing and memory depend on the shapes, not on the values, so
the twin of SmolLM2-135M measures what SmolLM2 would. Its losses mean nothing.

    python benchmarks/_twin.py SRC DST     # SRC: a folder with config.json and the tokenizer files

`python benchmarks/_twin.py --pack DST` copies the packaged SmolLM2's config and tokenizer files
(no weights, about 3.5 MB) into DST, which can then travel as SRC.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def pack(dst: Path) -> Path:
    """Copy the packaged SmolLM2's config and tokenizer files (not its weights) into `dst`."""
    from lorakit.models import ensure_cached

    src = ensure_cached("smollm2-135m")
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def twin(src: Path, dst: Path, seed: int = 0) -> Path:
    """Write `dst`: `src`'s config and tokenizer with seeded random fp32 weights (reused if present)."""
    if (dst / "model.safetensors").is_file():
        return dst
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in FILES[1:]:
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    tmp.rename(dst)
    return dst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pack", action="store_true", help="copy the packaged SmolLM2's config and tokenizer into DST")
    parser.add_argument("paths", nargs="+", type=Path, help="SRC DST (or DST with --pack)")
    args = parser.parse_args()
    if args.pack:
        print(pack(args.paths[-1]))
    elif len(args.paths) == 2:
        print(twin(*args.paths))
    else:
        parser.error("give SRC and DST")
    return 0


if __name__ == "__main__":
    sys.exit(main())
