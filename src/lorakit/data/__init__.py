"""Datasets: read records, render prompts, completions and conversations, tokenise with the labels that
train, count, preview, batch.

Sources (`lorakit.data.readers`): `.jsonl` (an object a line), `.json` (a list), `.csv` (a header,
string values), `.parquet` (pyarrow, the `cli` extra), a Hugging Face `datasets` folder written by
`save_to_disk` (the `datasets` extra, local files only), `.txt` (the LoRA repo's E2E lines
`<context>||<completion>`), and `"e2e"`, `"e2e-dev"` (the bundled E2E samples, `BUNDLED_DATASETS`).

Record formats, detected from each record's fields (`lorakit.data.formats`; `fields=` renames them):

| format | fields |
|---|---|
| OpenAI / TRL chat | `messages` (roles system, user, assistant, tool; any number of turns) |
| ShareGPT | `conversations` (`from` system/human/gpt, `value`) |
| TRL conversational prompt/completion | `prompt` and `completion`, both message lists |
| Alpaca | `instruction`, `output`, optional `input`, `system` (rendered as a user/assistant chat) |
| plain prompt/completion | `prompt` and `completion`, strings |
| E2E | `mr` and `ref` |
| text | `text` |

Conversations are rendered with the tokenizer's own chat template, and the tokens that train come
from the template (`{% generation %}` blocks, or rendering each prefix; `lorakit.data.chat`):
`train_on="assistant"` (every assistant turn), `"last"` or `"all"`; `train_on_eos` trains the token
that ends a turn. Examples longer than `seq_len` keep their start (or, `truncate="left"`, their
end); an example left with nothing to train is dropped and counted (`TokenizedDataset.drops`).

E2E follows the LoRA paper's pipeline (`lorakit.e2e.text`): the context is
`name : The Vaults | Type : pub | price : more than £ 30 | ...` and values and references are
tokenised Moses-style. For a non-GPT-2 tokenizer the separator and EOS are text: prompt = context +
" ||", completion = " " + reference, and `tokenize_examples` appends EOS.

Classification data (GLUE TSVs) has its own loader, `load_classification`.

Modules: `examples` (`Example`), `readers` (files to records), `formats` (records to examples),
`chat` (chat templates and their masks), `tokenize` (causal-LM tokenisation, truncation),
`stats` (the numbers), `preview` (`lorakit data preview`), `batching` (holdout split, batches),
`padding` (right-padded batch tensors), `classification` (GLUE).
"""

from lorakit.data.batching import iterate_batches, num_batches, split_holdout
from lorakit.data.chat import TRAIN_ON, encode_conversations
from lorakit.data.classification import ClassificationDataset, load_classification, tokenize_classification
from lorakit.data.examples import Example
from lorakit.data.formats import BUNDLED_DATASETS, FIELDS, check_fields, e2e_example, load_examples, resolve_source
from lorakit.data.preview import Preview, preview
from lorakit.data.stats import DataStats, data_stats, stats_lines
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedDataset, encode_prompt, tokenize_examples

__all__ = [
    "BUNDLED_DATASETS",
    "FIELDS",
    "IGNORE_INDEX",
    "TRAIN_ON",
    "ClassificationDataset",
    "DataStats",
    "Example",
    "Preview",
    "TokenizedDataset",
    "check_fields",
    "data_stats",
    "e2e_example",
    "encode_conversations",
    "encode_prompt",
    "iterate_batches",
    "load_classification",
    "load_examples",
    "num_batches",
    "preview",
    "resolve_source",
    "split_holdout",
    "stats_lines",
    "tokenize_classification",
    "tokenize_examples",
]
