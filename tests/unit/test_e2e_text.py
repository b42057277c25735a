"""lorakit.e2e.text: E2E meaning representations and references rendered as the LoRA repo's files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.data import Example, e2e_example
from lorakit.e2e import E2E_SEPARATOR, e2e_mr_to_context, e2e_tokenize
from lorakit.errors import DataError

E2E = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "e2e"


def test_e2e_rendering_reproduces_lora_valid_txt():
    """The official dev CSV, rendered by lorakit, equals LoRA's valid.txt line for line."""
    with (E2E / "devset.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = (E2E / "valid.txt").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len(lines)
    for row, line in zip(rows, lines, strict=True):
        context, completion = line.split("||", 1)
        assert e2e_mr_to_context(row["mr"]) == context
        assert e2e_tokenize(row["ref"]) + " " == completion


def test_e2e_mr_to_context_renames_keys_in_mr_order():
    mr = "name[The Vaults], eatType[pub], priceRange[£20-25], familyFriendly[yes], customer rating[high]"
    assert e2e_mr_to_context(mr) == (
        "name : The Vaults | Type : pub | price : £ 20 - 25 | family friendly : yes | customer rating : high"
    )
    with pytest.raises(DataError, match="no 'key\\[value\\]' slot"):
        e2e_mr_to_context("just words")


def test_e2e_example_is_context_separator_and_tokenised_reference():
    mr = "name[The Vaults], eatType[pub], priceRange[more than £30]"
    ref = "The Vaults is a family-friendly pub; it costs more than £30."
    example = e2e_example(mr, ref)
    assert example == Example(
        "name : The Vaults | Type : pub | price : more than £ 30 ||",
        " The Vaults is a family - friendly pub ; it costs more than £ 30 .",
        group=mr,
    )
    assert example.prompt == e2e_mr_to_context(mr) + E2E_SEPARATOR
    assert example.completion == " " + e2e_tokenize(ref)
    with pytest.raises(DataError, match="no 'key\\[value\\]' slot"):
        e2e_example("just words", ref)


def test_e2e_and_data_import_in_either_order():
    """lorakit.data's readers import lorakit.e2e.text, which builds lorakit.data Examples: no cycle."""
    code = "import lorakit.e2e.text, lorakit.data\nprint(lorakit.data.load_examples('e2e-dev')[0].group)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "[" in done.stdout
