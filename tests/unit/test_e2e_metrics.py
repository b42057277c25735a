"""lorakit.e2e.metrics: E2E scores against their definitions and reference libraries, grouping.

Java (METEOR and the PTB tokenizer) starts in two module-scoped calls only (~10 s each), for the
tests marked `integration`; every other test runs BLEU/NIST alone through `mteval_scores` (or a fake
`java`).
"""

from __future__ import annotations

import csv
import gc
import itertools
import math
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sacrebleu
from nltk.translate.nist_score import corpus_nist
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from lorakit.e2e import (
    ScorerUnavailableError,
    coco_scores,
    e2e_metrics,
    group_references,
    mteval_scores,
)
from lorakit.errors import DataError, LorakitError

DEVSET = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "e2e" / "devset.csv"
E2E_KEYS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
# mteval-v13a nist_length_penalty: beta makes the penalty 0.5 at a length ratio of 2/3.
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def _read_devset(limit: int | None = None) -> list[tuple[str, str]]:
    with DEVSET.open(encoding="utf-8", newline="") as handle:
        rows = [(row["mr"], row["ref"]) for row in csv.DictReader(handle)]
    return rows if limit is None else rows[:limit]


def _grouped(limit: int | None = None) -> list[list[str]]:
    rows = _read_devset(limit)
    return group_references([mr for mr, _ in rows], [ref for _, ref in rows])[1]


def _streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position, None where an MR has fewer."""
    width = max(len(group) for group in references)
    return [[group[i] if i < len(group) else None for group in references] for i in range(width)]


def _nist_penalty(ratio: float) -> float:
    return 1.0 if ratio >= 1 else math.exp(-NIST_BETA * math.log(ratio) ** 2)


# --- the two Java calls --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus() -> list[list[str]]:
    """The devset's first MRs (whole groups only), 2 to 10+ references each."""
    groups = _grouped(limit=150)
    return groups[:-1]  # the last group may be cut by the row limit


@pytest.fixture(scope="module")
def perfect_run(small_corpus: list[list[str]]) -> tuple[dict[str, float], list[list[str]]]:
    """e2e_metrics where each prediction is one of its MR's references, and the processes it launched."""
    launches: list[list[str]] = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            launches.append(list(args))
            super().__init__(args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", RecordingPopen)
        scores = e2e_metrics([group[0] for group in small_corpus], small_corpus)
    return scores, launches


@pytest.fixture(scope="module")
def shuffled_scores(small_corpus: list[list[str]]) -> dict[str, float]:
    """The same predictions rotated by one MR, and one of them empty (a degenerate output)."""
    predictions = [group[0] for group in small_corpus]
    predictions = predictions[1:] + predictions[:1]
    predictions[len(predictions) // 2] = ""
    return e2e_metrics(predictions, small_corpus)


@pytest.mark.integration  # the real Java scorers (PTB tokenizer, METEOR)
def test_perfect_prediction_scores_full_marks(perfect_run):
    scores, _ = perfect_run
    assert set(scores) == set(E2E_KEYS)
    assert scores["BLEU"] == pytest.approx(100.0)
    assert scores["ROUGE_L"] == pytest.approx(100.0)
    assert scores["METEOR"] > 95.0
    assert scores["NIST"] > 0 and scores["CIDEr"] > 0


@pytest.mark.integration  # the real Java scorers (PTB tokenizer, METEOR)
def test_java_starts_once_per_call_not_per_sentence(perfect_run, small_corpus):
    _, launches = perfect_run
    java = [args for args in launches if Path(str(args[0])).name == "java"]
    # One PTB tokenizer run for references and predictions together, one METEOR JVM for the corpus.
    assert len(java) == 2, java
    assert any("edu.stanford.nlp.process.PTBTokenizer" in args for args in java)
    assert any(any(arg.endswith("meteor-1.5.jar") for arg in args) for args in java)
    assert len(small_corpus) > 2


@pytest.mark.integration  # the real Java scorers (PTB tokenizer, METEOR)
def test_shuffling_predictions_among_mrs_lowers_every_metric(perfect_run, shuffled_scores):
    perfect, _ = perfect_run
    assert all(math.isfinite(value) for value in shuffled_scores.values())
    for key in E2E_KEYS:
        assert shuffled_scores[key] < perfect[key], key


@pytest.mark.integration  # the real Java scorers (PTB tokenizer, METEOR)
def test_e2e_bleu_and_nist_are_mteval_scores(perfect_run, small_corpus):
    perfect, _ = perfect_run
    alone = mteval_scores([group[0] for group in small_corpus], small_corpus)
    assert perfect["BLEU"] == pytest.approx(alone["BLEU"])
    assert perfect["NIST"] == pytest.approx(alone["NIST"])


# --- BLEU ----------------------------------------------------------------------------------------


def test_bleu_matches_sacrebleu_corpus_bleu_on_devset_multi_reference():
    references = _grouped(limit=1200)[:-1]
    held_out = [group[-1] for group in references]
    rest = [group[:-1] for group in references]
    expected = sacrebleu.corpus_bleu(held_out, _streams(rest), lowercase=True, tokenize="13a")
    assert len({len(group) for group in rest}) > 1  # variable reference counts
    assert mteval_scores(held_out, rest)["BLEU"] == pytest.approx(expected.score, abs=1e-9)


def test_bleu_brevity_penalty_by_hand():
    # 6 predicted tokens, every n-gram in the 7-token reference: p1..p4 = 1, BP = exp(1 - r/c).
    scores = mteval_scores(["the cat sat on the mat"], [["the cat sat on the mat today"]])
    assert scores["BLEU"] == pytest.approx(100.0 * math.exp(1 - 7 / 6))


def test_bleu_closest_reference_length_ties_go_to_the_shorter():
    # References of 7 and 5 tokens are both 1 away from the 6-token prediction; mteval takes the
    # shorter (5 < 6, so BP = 1). Taking the longer would give exp(1 - 7/6).
    scores = mteval_scores(["the cat sat on the mat"], [["the cat sat on the mat today", "a cat on a mat"]])
    assert scores["BLEU"] == pytest.approx(100.0)


def test_bleu_lowercases_and_tokenises_like_mteval():
    scores = mteval_scores(["The cat sat on the MAT."], [["the cat sat on the mat ."]])
    assert scores["BLEU"] == pytest.approx(100.0)


def test_bleu_lowercases_ascii_letters_only_as_mteval_does():
    # mteval-v13a lower-cases with tr/[A-Z]/[a-z]/, so "É" stays upper-case; Python's lower() would not.
    ours = mteval_scores(["CAFÉ by the river"], [["café by the river"]])["BLEU"]
    unicode_lower = sacrebleu.corpus_bleu(["CAFÉ by the river"], [["café by the river"]], lowercase=True)
    assert unicode_lower.score == pytest.approx(100.0)
    assert ours < 100.0


# --- NIST ----------------------------------------------------------------------------------------


def test_nist_clips_against_all_references_by_hand():
    # Reference words: a b a c -> 4; counts a:2 b:1 c:1, "a b":1 "a c":1.
    # info(a) = log2(4/2) = 1, info(b) = info(c) = log2(4/1) = 2, info(a b) = log2(2/1) = 1.
    # 1-grams: a, b, c all match some reference -> (1 + 2 + 2) / 3.
    # 2-grams: "a b" matches, "b c" does not -> 1 / 2. 3-gram "a b c": 0 / 1. 4-, 5-grams: none.
    # Length ratio 3 / (4 words / 2 references) >= 1 -> no penalty.
    scores = mteval_scores(["a b c"], [["a b", "a c"]])
    assert scores["NIST"] == pytest.approx(5 / 3 + 1 / 2)


def test_nist_length_penalty_by_hand():
    # One reference "a b c": info(a) = log2(3/1); the prediction "a" matches it. Ratio 1/3.
    scores = mteval_scores(["a"], [["a b c"]])
    assert scores["NIST"] == pytest.approx(math.log2(3) * _nist_penalty(1 / 3))


def test_nist_average_reference_length_uses_the_largest_reference_count():
    # The E2E scorer pads every MR to R = 3 reference sets, so mteval divides all 7 reference words by
    # 3, not by each MR's own count. info(a) = info(x) = log2(7/1); ratio = 2 / (7/3).
    scores = mteval_scores(["a", "x"], [["a b c d"], ["x", "y", "z"]])
    assert scores["NIST"] == pytest.approx(math.log2(7) * _nist_penalty(2 / (7 / 3)))


def test_nist_equals_nltk_corpus_nist_with_one_reference_per_mr():
    # NLTK scores each segment against its single best reference; with one reference that is
    # mteval's clipping, so the two must agree on the same tokens.
    references = _grouped(limit=1200)[:-1]
    predictions = [group[-1] for group in references]
    single = [[group[0]] for group in references]
    tokenize = Tokenizer13a()
    expected = corpus_nist(
        [[tokenize(group[0].lower()).split()] for group in single],
        [tokenize(text.lower()).split() for text in predictions],
        n=5,
    )
    assert mteval_scores(predictions, single)["NIST"] == pytest.approx(expected, rel=1e-12)


def test_mteval_scores_ignore_the_order_of_mrs_and_of_references():
    references = _grouped(limit=600)[:-1]
    predictions = [group[-1] for group in references]
    rest = [group[:-1] for group in references]
    pairs = list(zip(predictions, rest, strict=True))
    random.Random(0).shuffle(pairs)
    shuffled = mteval_scores([p for p, _ in pairs], [list(reversed(r)) for _, r in pairs])
    original = mteval_scores(predictions, rest)
    assert shuffled == pytest.approx(original, rel=1e-12)


def test_empty_predictions_score_zero_without_error():
    references = [["there is a pub"], ["it is cheap"]]
    assert mteval_scores(["", ""], references) == {"BLEU": 0.0, "NIST": 0.0}
    partly = mteval_scores(["there is a pub", ""], references)
    assert 0.0 < partly["BLEU"] < 100.0 and partly["NIST"] > 0.0


# --- grouping ------------------------------------------------------------------------------------


def test_group_references_on_devset_rows_matches_consecutive_grouping():
    rows = _read_devset(limit=80)
    mrs, references = group_references([mr for mr, _ in rows], [ref for _, ref in rows])
    expected = [(mr, [ref for _, ref in run]) for mr, run in itertools.groupby(rows, key=lambda r: r[0])]
    assert list(zip(mrs, references, strict=True)) == expected
    assert len({len(group) for group in references}) > 1


def test_devset_has_each_mr_on_consecutive_rows():
    rows = _read_devset()
    mrs, references = group_references([mr for mr, _ in rows], [ref for _, ref in rows])
    runs = [mr for mr, _ in itertools.groupby(rows, key=lambda r: r[0])]
    assert mrs == runs
    assert sum(len(group) for group in references) == len(rows)
    assert min(len(group) for group in references) >= 1


def test_group_references_is_invariant_to_row_order():
    rows = _read_devset(limit=200)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    mrs, references = group_references([mr for mr, _ in shuffled], [ref for _, ref in shuffled])
    base_mrs, base_refs = group_references([mr for mr, _ in rows], [ref for _, ref in rows])
    assert dict(zip(mrs, map(sorted, references), strict=True)) == dict(
        zip(base_mrs, map(sorted, base_refs), strict=True)
    )
    # MRs in order of first appearance; references in row order within each MR.
    first_row = [next(i for i, (mr, _) in enumerate(shuffled) if mr == wanted) for wanted in mrs]
    assert first_row == sorted(first_row)
    for mr, group in zip(mrs, references, strict=True):
        assert group == [ref for row_mr, ref in shuffled if row_mr == mr]


def test_group_references_rejects_mismatched_columns():
    with pytest.raises(DataError, match="3 MRs but 2 references"):
        group_references(["a", "a", "b"], ["x", "y"])


# --- input errors and Java -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        (["a", "b"], [["a"]], "2 predictions but 1 reference groups"),
        ([], [], "the corpus is empty"),
        (["a", "b"], [["a"], []], "MRs without a list of references at indices 1"),
        (["a"], [["a", "  "]], "blank or non-string references in the groups at indices 0"),
        ([None], [["a"]], "predictions that are not strings at indices 0"),
    ],
    ids=["mismatched-lengths", "empty", "mr-without-refs", "blank-ref", "non-string-prediction"],
)
def test_malformed_corpus_raises_data_error_before_any_java(predictions, references, message):
    for score in (e2e_metrics, mteval_scores, coco_scores):
        with pytest.raises(DataError, match=message) as caught:
            score(predictions, references)
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, LorakitError)


def test_malformed_corpus_lists_every_problem_at_once():
    with pytest.raises(DataError) as caught:
        e2e_metrics(["a", 3, "c"], [["a"], [""]])
    text = str(caught.value)
    assert "3 predictions but 2 reference groups" in text
    assert "not strings at indices 1" in text
    assert "blank or non-string references in the groups at indices 1" in text


def test_missing_java_raises_instead_of_dropping_meteor(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ScorerUnavailableError, match="no `java` executable on PATH") as caught:
        e2e_metrics(["there is a pub"], [["there is a pub"]])
    assert isinstance(caught.value, OSError) and isinstance(caught.value, LorakitError)
    assert "mteval_scores()" in str(caught.value)


def _fake_java(directory: Path, *, tokenizer_works: bool) -> None:
    """A `java` that fails like a broken JVM; optionally echoes the PTB tokenizer's input file."""
    ptb = (
        'if [ "$3" = "edu.stanford.nlp.process.PTBTokenizer" ]; then\n'
        '  for last; do :; done; /bin/cat "$last"; exit 0\n'
        "fi\n"
    )
    script = directory / "java"
    script.write_text("#!/bin/sh\n" + (ptb if tokenizer_works else "") + 'echo "fake java: no JVM here" >&2\nexit 1\n')
    script.chmod(0o755)


def test_failing_tokenizer_jar_raises(monkeypatch, tmp_path):
    _fake_java(tmp_path, tokenizer_works=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ScorerUnavailableError, match="PTB tokenizer"):
        coco_scores(["there is a pub", "it is cheap"], [["there is a pub"], ["it is cheap"]])


def test_failing_meteor_jar_raises_with_its_message_and_stops_cleanly(monkeypatch, tmp_path):
    _fake_java(tmp_path, tokenizer_works=True)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ScorerUnavailableError, match="fake java: no JVM here"):
        coco_scores(["there is a pub"], [["there is a pub"]])
    # Meteor.__del__ takes the lock compute_score kept when the jar died; it must not block.
    collector = threading.Thread(target=gc.collect, daemon=True)
    collector.start()
    collector.join(60)
    assert not collector.is_alive(), "collecting the dead METEOR scorer blocked"


# --- the eval extra ------------------------------------------------------------------------------


def test_scorers_without_the_eval_extra_name_the_pip_command():
    """`import lorakit.e2e` needs neither sacrebleu nor pycocoevalcap; scoring names `lorakit[eval]`."""
    code = (
        "import sys\n"
        "sys.modules['sacrebleu'] = None\n"
        "sys.modules['pycocoevalcap'] = None\n"
        "import lorakit.e2e\n"
        "from lorakit.errors import MissingExtraError\n"
        "for score in (lorakit.e2e.mteval_scores, lorakit.e2e.coco_scores, lorakit.e2e.e2e_metrics):\n"
        "    try:\n"
        "        score(['a b'], [['a b']])\n"
        "    except MissingExtraError as err:\n"
        "        assert \"pip install 'lorakit[eval]'\" in str(err), err\n"
        "    else:\n"
        "        raise AssertionError(f'{score.__name__} ran without the eval extra')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
