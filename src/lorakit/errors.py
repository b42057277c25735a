"""Typed errors. Each also subclasses the builtin a caller would catch without knowing lorakit."""

from __future__ import annotations

__all__ = [
    "AdapterFormatError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FileWriteError",
    "LorakitError",
    "MissingExtraError",
    "ModelLoadError",
    "RunLockedError",
    "ScorerUnavailableError",
    "ShapeMismatchError",
    "TargetNotFoundError",
    "TrainingError",
    "UnsupportedLayerError",
]


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A `LoraConfig` (or a CLI/TOML option) has invalid values; the message lists every problem."""


class TargetNotFoundError(LorakitError, ValueError):
    """A target pattern matched no adaptable module; the message lists the closest existing names."""


class UnsupportedLayerError(LorakitError, TypeError):
    """A target matched a module whose type lorakit cannot adapt."""


class AdapterFormatError(LorakitError, ValueError):
    """An adapter directory or file is missing, corrupt, not safetensors/JSON, or not a LoRA adapter."""


class ShapeMismatchError(LorakitError, ValueError):
    """A tensor's shape does not fit the model; the message names the tensor and both shapes."""


class ModelLoadError(LorakitError, OSError):
    """A base model could not be found or read (path, GGUF file or packaged alias)."""


class DataError(LorakitError, ValueError):
    """A dataset file is missing, empty or has the wrong columns."""


class ScorerUnavailableError(LorakitError, OSError):
    """An external scorer could not run: no Java for METEOR / the PTB tokenizer, or the jar failed."""


class MissingExtraError(LorakitError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (for example a NaN/inf loss); the last good checkpoint is kept."""


class CheckpointError(TrainingError):
    """No checkpoint of a run is complete: each one's missing or damaged file is named."""


class RunLockedError(LorakitError, RuntimeError):
    """Another live process is training into the same output directory; the message names its PID."""


class FileWriteError(LorakitError, OSError):
    """A file could not be written (a full disk, an I/O error): the message names the file and the OS
    error, and `errno` and `filename` are set. Whatever the write would have replaced is kept, and no
    temporary file is left (`lorakit.atomic`)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # the message, not OSError's "[Errno n] ...: file"
