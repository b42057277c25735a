"""The E2E NLG challenge scores: BLEU, NIST, METEOR, ROUGE-L and CIDEr, as its official scorer computes them.

The scores follow the challenge's official scorer (tuetschek/e2e-metrics, ``measure_scores.py``),
which the LoRA paper used for its Table 3: BLEU and NIST come from ``mteval-v13a-sig.pl`` (here
sacrebleu for BLEU and a port of mteval's NIST, see `mteval_scores`), METEOR 1.5, ROUGE-L and CIDEr
from the MS-COCO caption evaluation code (here the ``pycocoevalcap`` package, see `coco_scores`).

sacrebleu and pycocoevalcap come with the ``eval`` extra (``pip install 'lorakit[eval]'``) and are
imported only when a score is computed, so this module imports without them; a scorer called
without them raises `lorakit.errors.MissingExtraError`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from lorakit.errors import DataError, ScorerUnavailableError
from lorakit.extras import require, require_extra

if TYPE_CHECKING:
    from pycocoevalcap.meteor.meteor import Meteor

__all__ = [
    "ScorerUnavailableError",
    "coco_scores",
    "e2e_metrics",
    "group_references",
    "mteval_scores",
]


# mteval-v13a lower-cases with `tr/[A-Z]/[a-z]/`: ASCII letters only ("É" stays upper-case).
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# mteval-v13a's NIST: n-grams up to 5; the length penalty is 0.5 when the output is 2/3 of the
# average reference length (nist_length_penalty: beta = -log(0.5) / log(1.5)^2).
_NIST_MAX_N = 5
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
_JAVA_HINT = (
    "METEOR and the PTB tokenizer used by METEOR, ROUGE_L and CIDEr run Java jars shipped with "
    "pycocoevalcap; install a Java runtime (8 or newer, e.g. `apt-get install default-jre-headless`) "
    "and put `java` on PATH, or call lorakit.e2e.mteval_scores() for BLEU and NIST alone"
)


def e2e_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Score generated texts with the five E2E NLG challenge metrics, as its official scorer does.

    One prediction per meaning representation (MR), each scored against all of that MR's references
    (1 to ~45, varying). Scales match the LoRA paper's Table 3 and the scorer's printout times 100
    where the scorer prints a fraction: BLEU 0-100, NIST unbounded (~8.5 on E2E), METEOR 0-100,
    ROUGE_L 0-100, CIDEr unbounded (~2.5 on E2E).

    Text handling is the official scorer's: BLEU and NIST lower-case ASCII letters and apply mteval's
    13a tokenisation; METEOR, ROUGE_L and CIDEr run the COCO PTB tokenizer (``-lowerCase``, punctuation
    tokens dropped), and METEOR adds its own ``-norm``. Pass raw, untokenised, cased strings.

    Where this differs from ``measure_scores.py`` (tuetschek/e2e-metrics):

    - Input: the scorer reads files, so a line break inside a string would split it into two
      entries there; here every line break is replaced by a space. Its TSV/CSV reader also repairs a
      few mojibake characters (``Ł``/``Â£`` to ``£``, ``Ã©`` to ``é``) and strips quotes; pass clean text.
    - BLEU comes from sacrebleu (same tokeniser, closest-reference brevity penalty with ties to the
      shorter reference, and mteval's default ``exp`` smoothing). It differs from mteval only when
      the corpus has no matching unigram at all (0 here, a tiny smoothed value there) or every
      prediction is shorter than 4 tokens.
    - NIST is `mteval_scores`'s port of mteval-v13a-sig; see there.
    - SPICE and the COCO Bleu_1..4 are not computed (the E2E table reports neither).

    Java starts twice per call, not per sentence: once for the PTB tokenizer (references and
    predictions together) and once for METEOR (~10 s, mostly loading its paraphrase table, which
    overlaps with computing the other four scores).

    Args:
        predictions: One generated text per MR.
        references: For each MR, its non-empty list of human references, in the order of
            ``predictions`` (see `group_references` to build it from the official CSV rows).

    Returns:
        ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` mapped to floats.

    Raises:
        DataError: The two lists differ in length, are empty, an MR has no references, a reference
            is blank, or an entry is not a string. Every problem is listed in one message.
        MissingExtraError: sacrebleu or pycocoevalcap is not installed (the ``eval`` extra).
        ScorerUnavailableError: Java is not on PATH, or a Java scorer failed. Nothing is
            dropped silently: there is no partial result.
    """
    predictions, references = _validate(predictions, references)
    require_extra("eval", "E2E scoring (lorakit.e2e.e2e_metrics)")  # before a JVM starts
    with _started_meteor() as meteor:
        # METEOR's JVM loads its paraphrase table (~10 s) while the other scores are computed.
        scores = {**_mteval_scores(predictions, references), **_coco_scores(predictions, references, meteor)}
    return {key: scores[key] for key in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")}


def mteval_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (0-100) and NIST as the E2E scorer's ``mteval-v13a-sig.pl`` computes them; no Java.

    Both lower-case ASCII letters and use mteval's 13a tokenisation (sacrebleu's ``Tokenizer13a``,
    a line-for-line copy of mteval's ``tokenization`` sub).

    BLEU is sacrebleu's corpus BLEU with variable references (missing ones passed as ``None``).

    NIST is a port of mteval's ``nist_score`` (no maintained library computes it:
    ``nltk.translate.nist_score.corpus_nist`` scores each segment against its single best reference
    instead of clipping n-gram counts against the maximum over all references, so with several
    references it is lower; with one reference per MR the two agree, and the tests check that):

    - information weight ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))`` over all
      reference segments of the corpus, with ``count()`` of the empty prefix = total reference words;
    - ``sum over n=1..5 of (info of matched n-grams, each clipped to its max count in any one
      reference) / (number of predicted n-grams, at least 1)``;
    - times ``exp(-beta * ln(ratio)^2)`` for ``ratio < 1``, where ``ratio`` = predicted words /
      (total reference words / R) and R is the largest number of references any MR has. R, not
      each MR's own count, is what the E2E scorer's padded reference sets make mteval use; it is
      why the penalty almost never applies on E2E. We keep it so NIST is comparable with the paper.

    Args:
        predictions: One generated text per MR.
        references: Each MR's non-empty list of references.

    Returns:
        ``{"BLEU": ..., "NIST": ...}``.

    Raises:
        DataError: The inputs are malformed (as for `e2e_metrics`).
        MissingExtraError: sacrebleu is not installed (the ``eval`` extra).
    """
    return _mteval_scores(*_validate(predictions, references))


def _mteval_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    # Imported here: sacrebleu is needed only for evaluation (the `eval` extra), not to train.
    require("sacrebleu", "eval", "E2E BLEU and NIST (lorakit.e2e.mteval_scores)")
    from sacrebleu.metrics import BLEU
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    hyps = [text.translate(_ASCII_LOWER) for text in predictions]
    refs = [[text.translate(_ASCII_LOWER) for text in group] for group in references]
    n_ref_sets = max(len(group) for group in refs)
    # sacrebleu wants one stream per reference position; an MR with fewer references gets None.
    streams = [[group[i] if i < len(group) else None for group in refs] for i in range(n_ref_sets)]
    # smooth_method="exp" is mteval-v13a's default smoothing (sacrebleu bleu.py compute_bleu).
    bleu = BLEU(lowercase=False, tokenize="13a", smooth_method="exp").corpus_score(hyps, streams)

    tokenize = Tokenizer13a()
    # sacrebleu's BLEU tokenises `text.rstrip()`; do the same so both metrics see identical tokens.
    hyp_tokens = [tokenize(text.rstrip()).split() for text in hyps]
    ref_tokens = [[tokenize(text.rstrip()).split() for text in group] for group in refs]
    return {"BLEU": float(bleu.score), "NIST": _mteval_nist(hyp_tokens, ref_tokens)}


def coco_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR 1.5 (0-100), ROUGE_L (0-100) and CIDEr as the E2E scorer gets them from the COCO code.

    Runs pycocoevalcap's PTB tokenizer once over references and predictions together, then its
    ``Meteor`` (one JVM for the whole corpus), ``Rouge`` (LCS F-measure, beta 1.2, best reference)
    and ``Cider`` (CIDEr-D, document frequencies from this corpus' references) scorers: the same
    calls ``COCOEvalCap.evaluate`` makes, minus Bleu and SPICE.

    The PTB tokenizer writes its input to a temporary file in pycocoevalcap's package folder (the
    library's choice), so that folder must be writable.

    Args:
        predictions: One generated text per MR.
        references: Each MR's non-empty list of references.

    Returns:
        ``{"METEOR": ..., "ROUGE_L": ..., "CIDEr": ...}``.

    Raises:
        DataError: The inputs are malformed (as for `e2e_metrics`).
        MissingExtraError: pycocoevalcap is not installed (the ``eval`` extra).
        ScorerUnavailableError: Java is not on PATH, or the tokenizer or METEOR jar failed.
    """
    predictions, references = _validate(predictions, references)
    with _started_meteor() as meteor:
        return _coco_scores(predictions, references, meteor)


def _coco_scores(predictions: list[str], references: list[list[str]], meteor: Meteor) -> dict[str, float]:
    # pycocoevalcap is importable: `_started_meteor` required it to start `meteor`.
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _ptb_tokenize(predictions, references)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {
        "METEOR": 100.0 * _meteor_score(meteor, gts, res),
        "ROUGE_L": 100.0 * float(rouge),
        "CIDEr": float(cider),
    }


def group_references(mrs: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Group reference rows by MR, as the official scorer groups the E2E CSV files.

    In the official layout (``devset.csv``, ``testset_w_refs.csv``) an MR's references are on
    consecutive rows, and then this equals the scorer's ``read_and_group_tsv``. Unlike it, rows of
    one MR that are not consecutive (``trainset.csv`` is shuffled) are merged into one group rather
    than opening a second group, so the result does not depend on row order beyond first appearance.

    Args:
        mrs: The ``mr`` column, one entry per row.
        refs: The ``ref`` column, aligned with ``mrs``.

    Returns:
        ``(unique_mrs, references)``: MRs in order of first appearance, and for each its references
        in row order; ready for `e2e_metrics` with one prediction per entry of ``unique_mrs``.

    Raises:
        DataError: ``mrs`` and ``refs`` differ in length.
    """
    if len(mrs) != len(refs):
        raise DataError(
            f"group_references: {len(mrs)} MRs but {len(refs)} references; pass the two columns of the same rows"
        )
    grouped: dict[str, list[str]] = {}
    for mr, ref in zip(mrs, refs, strict=True):
        grouped.setdefault(mr, []).append(ref)
    return list(grouped), list(grouped.values())


def _validate(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Check the corpus once, listing every problem; return copies with line breaks made spaces."""
    problems: list[str] = []
    if isinstance(predictions, str) or isinstance(references, str):
        raise DataError("predictions must be a list of strings and references a list of lists of strings")
    if len(predictions) != len(references):
        problems.append(
            f"{len(predictions)} predictions but {len(references)} reference groups; pass one "
            "prediction per MR (group_references() builds one group per MR)"
        )
    if not predictions or not references:
        problems.append("the corpus is empty")
    bad_preds = [i for i, text in enumerate(predictions) if not isinstance(text, str)]
    if bad_preds:
        problems.append(f"predictions that are not strings at indices {_head(bad_preds)}")
    no_refs = [
        i
        for i, group in enumerate(references)
        if not isinstance(group, Sequence) or isinstance(group, str) or not group
    ]
    if no_refs:
        problems.append(f"MRs without a list of references at indices {_head(no_refs)}")
    blank = [
        i
        for i, group in enumerate(references)
        if i not in no_refs and any(not isinstance(text, str) or not text.strip() for text in group)
    ]
    if blank:
        problems.append(f"blank or non-string references in the groups at indices {_head(blank)}")
    if problems:
        raise DataError("cannot score this corpus: " + "; ".join(problems))
    # A file-reading scorer would split a string at any line break; keep one entry per string.
    return (
        [" ".join(text.splitlines()) for text in predictions],
        [[" ".join(text.splitlines()) for text in group] for group in references],
    )


def _head(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" (and {len(indices) - limit} more)" if len(indices) > limit else "")


def _ngrams(tokens: list[str], max_n: int) -> Iterator[tuple[str, ...]]:
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - n + 1):
            yield tuple(tokens[start : start + n])


def _mteval_nist(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """mteval-v13a(-sig) system NIST over tokenised text (``score_segment`` + ``nist_score``)."""
    # compute_ngram_info: counts over every reference segment of the corpus.
    ref_counts: Counter[tuple[str, ...]] = Counter()
    total_ref_words = 0
    for group in refs:
        for ref in group:
            total_ref_words += len(ref)
            ref_counts.update(_ngrams(ref, _NIST_MAX_N))

    def info(ngram: tuple[str, ...]) -> float:
        prefix_count = ref_counts[ngram[:-1]] if len(ngram) > 1 else total_ref_words
        return math.log2(prefix_count / ref_counts[ngram])

    matched_info = [0.0] * _NIST_MAX_N
    hyp_ngram_count = [0] * _NIST_MAX_N
    for hyp, group in zip(hyps, refs, strict=True):
        # Counter `|` is the per-n-gram max over references, `&` the min with the prediction's
        # count: mteval's min($tst_ngrams{$ngram}, $ref_ngrams_max{$ngram}).
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in group:
            max_ref |= Counter(_ngrams(ref, _NIST_MAX_N))
        for ngram, count in (Counter(_ngrams(hyp, _NIST_MAX_N)) & max_ref).items():
            matched_info[len(ngram) - 1] += info(ngram) * count
        for n in range(_NIST_MAX_N):
            hyp_ngram_count[n] += max(len(hyp) - n, 0)
    score = sum(info / max(count, 1) for info, count in zip(matched_info, hyp_ngram_count, strict=True))
    # nist_score: ratio = tst words / (ref words / number of reference sets), see mteval_scores.
    n_ref_sets = max(len(group) for group in refs)
    if total_ref_words == 0:
        return 0.0
    ratio = hyp_ngram_count[0] / (total_ref_words / n_ref_sets)
    if ratio >= 1:
        return score
    if ratio <= 0:
        return 0.0
    return score * math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def _ptb_tokenize(
    predictions: list[str], references: list[list[str]]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Run the COCO PTB tokenizer once on both sides; return COCO's (gts, res) dicts keyed by MR index."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions: dict[tuple[str, int], list[dict[str, str]]] = {}
    for i, group in enumerate(references):
        captions["ref", i] = [{"caption": text} for text in group]
    for i, text in enumerate(predictions):
        captions["hyp", i] = [{"caption": text}]
    try:
        tokenized = PTBTokenizer().tokenize(captions)
    except OSError as exc:
        raise ScorerUnavailableError(f"the PTB tokenizer could not run ({exc}). {_JAVA_HINT}.") from exc
    # The wrapper zips its captions with the jar's output lines; a failed or short run would
    # silently drop or shift entries, so count them.
    if any(len(tokenized.get(key, ())) != len(value) for key, value in captions.items()):
        raise ScorerUnavailableError(
            "the PTB tokenizer (stanford-corenlp-3.4.1.jar) returned fewer lines than it was given; "
            f"see its message on stderr. {_JAVA_HINT}."
        )
    gts = {i: tokenized["ref", i] for i in range(len(references))}
    res = {i: tokenized["hyp", i] for i in range(len(predictions))}
    return gts, res


@contextlib.contextmanager
def _started_meteor() -> Iterator[Meteor]:
    """Start pycocoevalcap's METEOR JVM (one per call) and stop it on the way out, error or not."""
    require("pycocoevalcap", "eval", "E2E METEOR, ROUGE-L and CIDEr (lorakit.e2e.coco_scores)")
    if shutil.which("java") is None:
        raise ScorerUnavailableError(f"no `java` executable on PATH. {_JAVA_HINT}.")
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()  # Popen returns at once; the jar reads its paraphrase table meanwhile.
    except OSError as exc:
        raise ScorerUnavailableError(f"METEOR could not start ({exc}). {_JAVA_HINT}.") from exc
    try:
        yield scorer
    finally:
        _stop_meteor(scorer)


def _meteor_score(scorer: Meteor, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR 1.5 (0-1): ``compute_score`` sends every MR to the one JVM, then one EVAL line."""
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError) as exc:
        # The jar died (its empty output fails float()); its stderr says why.
        _stop_meteor(scorer)
        message = scorer.meteor_p.stderr.read().decode(errors="replace").strip()[-2000:]
        raise ScorerUnavailableError(f"METEOR (meteor-1.5.jar) failed: {message or exc}") from exc
    return float(score)


def _stop_meteor(scorer: Meteor) -> None:
    """End the METEOR JVM now rather than in ``Meteor.__del__``.

    ``compute_score`` keeps its lock when the jar dies mid-call, and ``__del__`` takes that lock
    first, so it would block forever; release it, then stop the process (both steps idempotent).
    """
    if scorer.lock.locked():
        scorer.lock.release()
    process = scorer.meteor_p
    with contextlib.suppress(OSError):
        process.stdin.close()
    if process.poll() is None:
        process.kill()
    process.wait()
