"""Datasets: read records, render prompt/completion pairs, tokenise with completion-only labels, batch.

Record formats, detected from the file suffix and the field names (`load_examples`):

| source | records |
|---|---|
| `.jsonl` (object a line), `.json` (a list) | `text`; `prompt`+`completion`; chat `messages`; `mr`+`ref` |
| `.csv` with a header | `text`; or `prompt` + `completion`; or E2E official `mr,ref` |
| `.txt` | the LoRA repo's E2E lines `<context>||<completion> ` |
| `"e2e"`, `"e2e-dev"` | the bundled E2E samples (see `BUNDLED_DATASETS`) |

E2E follows the LoRA paper's pipeline (`lorakit.e2e.text`): the context is
`name : The Vaults | Type : pub | price : more than £ 30 | ...` and values and references are
tokenised Moses-style. For a non-GPT-2 tokenizer the separator and EOS are text: prompt = context +
" ||", completion = " " + reference, and `tokenize_examples` appends EOS.

Classification data (GLUE TSVs) has its own loader, `load_classification`.

Modules: `examples` (`Example`), `formats` (file readers), `tokenize` (causal-LM tokenisation),
`batching` (holdout split, batches), `padding` (right-padded batch tensors), `classification` (GLUE).
"""

from lorakit.data.batching import iterate_batches, num_batches, split_holdout
from lorakit.data.classification import ClassificationDataset, load_classification, tokenize_classification
from lorakit.data.examples import Example
from lorakit.data.formats import BUNDLED_DATASETS, e2e_example, load_examples, resolve_source
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedDataset, encode_prompt, tokenize_examples

__all__ = [
    "BUNDLED_DATASETS",
    "IGNORE_INDEX",
    "ClassificationDataset",
    "Example",
    "TokenizedDataset",
    "e2e_example",
    "encode_prompt",
    "iterate_batches",
    "load_classification",
    "load_examples",
    "num_batches",
    "resolve_source",
    "split_holdout",
    "tokenize_classification",
    "tokenize_examples",
]
