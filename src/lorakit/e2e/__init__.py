"""The E2E NLG task (Novikova et al., 2017) as the LoRA paper runs it: text rendering and the scores.

- `lorakit.e2e.text`: meaning representations and references rendered as the LoRA repository's
  E2E files (`e2e_mr_to_context`, `e2e_tokenize`; `lorakit.data.e2e_example` makes an `Example`).
- `lorakit.e2e.metrics`: BLEU, NIST, METEOR, ROUGE-L and CIDEr as the challenge's official scorer
  computes them (`e2e_metrics`, `mteval_scores`, `coco_scores`, `group_references`). They need the
  ``eval`` extra (sacrebleu, pycocoevalcap; METEOR and the PTB tokenizer also need Java), which is
  imported only when a score is computed.

Reading E2E files (official CSV, LoRA `.txt`, the bundled samples) is `lorakit.data.load_examples`.
"""

from lorakit.e2e.metrics import ScorerUnavailableError, coco_scores, e2e_metrics, group_references, mteval_scores
from lorakit.e2e.text import E2E_SEPARATOR, e2e_mr_to_context, e2e_tokenize

__all__ = [
    "E2E_SEPARATOR",
    "ScorerUnavailableError",
    "coco_scores",
    "e2e_metrics",
    "e2e_mr_to_context",
    "e2e_tokenize",
    "group_references",
    "mteval_scores",
]
