"""Writing what an adapter made into files other tools read: a merged transformers model directory
(`merged`), a llama.cpp LoRA adapter or a merged model as GGUF (`gguf`)."""

from lorakit.export.gguf import GgufExport, export_gguf
from lorakit.export.merged import export_merged

__all__ = ["GgufExport", "export_gguf", "export_merged"]
