"""Regenerate lorakit's bundled E2E samples from the official E2E NLG CSVs (deterministic).

    python scripts/make_e2e_sample.py [--e2e ../shared/data/e2e] [--out src/lorakit/data/bundled]

Picks 300 meaning representations (MRs) of `trainset.csv` and 50 of `devset.csv` with a fixed seed
and writes every reference of each chosen MR, in file order, as JSON lines
`{"mr": ..., "prompt": ..., "completion": ...}` rendered as `lorakit.data` renders E2E records
(`lorakit.e2e.e2e_example`: LoRA-paper context + " ||", " " + Moses-style tokenised reference).
The data is CC BY-SA 4.0 (Novikova, Dušek and Rieser, SIGDIAL 2017); see E2E_LICENSE.md beside
the output.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorakit.e2e import e2e_mr_to_context, e2e_tokenize  # noqa: E402

SAMPLES = (  # (source csv, output file, number of MRs, seed)
    ("trainset.csv", "e2e_train_sample.jsonl", 300, 0),
    ("devset.csv", "e2e_dev_sample.jsonl", 50, 1),
)


def write_sample(source: Path, target: Path, count: int, seed: int) -> tuple[int, int]:
    """Write `count` randomly chosen MRs of `source` with all their references to `target`.

    Args:
        source: An official E2E CSV with header `mr,ref`.
        target: The JSONL file to write.
        count: Number of MRs to keep.
        seed: Seed of the choice.

    Returns:
        `(MRs written, lines written)`.
    """
    refs: dict[str, list[str]] = {}
    with source.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            refs.setdefault(row["mr"], []).append(row["ref"])
    mrs = list(refs)  # file order
    chosen = sorted(random.Random(seed).sample(range(len(mrs)), count))
    lines = 0
    with target.open("w", encoding="utf-8", newline="\n") as out:
        for index in chosen:
            mr = mrs[index]
            prompt = e2e_mr_to_context(mr) + " ||"
            for ref in refs[mr]:
                record = {"mr": mr, "prompt": prompt, "completion": " " + e2e_tokenize(ref)}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                lines += 1
    return len(chosen), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e", type=Path, default=REPO.parent / "shared" / "data" / "e2e")
    parser.add_argument("--out", type=Path, default=REPO / "src" / "lorakit" / "data" / "bundled")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for source, target, count, seed in SAMPLES:
        mrs, lines = write_sample(args.e2e / source, args.out / target, count, seed)
        print(f"{args.out / target}: {mrs} MRs, {lines} references")


if __name__ == "__main__":
    main()
