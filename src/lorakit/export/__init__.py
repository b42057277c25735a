"""Writing what an adapter made into files other tools read, one module per writer: a merged
transformers model directory (`merged`), a llama.cpp LoRA adapter as GGUF (`gguf_lora`), the merged
model as one GGUF file (`gguf_merged`). `gguf` is the GGUF entry point (`export_gguf`: checks the
request, loads an adapter directory, calls a writer); `gguf_layout` is what the GGUF writers share."""

from lorakit.export.gguf import GgufExport, export_gguf
from lorakit.export.merged import export_merged

__all__ = ["GgufExport", "export_gguf", "export_merged"]
