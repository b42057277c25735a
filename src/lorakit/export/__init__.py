"""Writing what an adapter made into files other tools read: a merged transformers model directory."""

from lorakit.export.merged import export_merged

__all__ = ["export_merged"]
