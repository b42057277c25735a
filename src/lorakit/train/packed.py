"""How a packed batch reaches the model: attention kept within each example.

A packed row (`lorakit.data.packing`) holds several examples end to end, with `position_ids` that
restart at 0 at each example and an `attention_mask` that marks the row's padding. transformers
(5.x) keeps such examples apart itself when it gets the form its attention implementation reads:

- SDPA, eager, flex attention (CPU and CUDA): `position_ids` and no 2-D `attention_mask`, without a
  KV cache. `masking_utils.create_causal_mask` then finds where the positions restart
  (`find_packed_sequence_indices`) and builds, once per forward for every layer, a causal mask that
  is also block-diagonal over the examples (SDPA: one (batch, 1, seq, seq) boolean mask); the
  padding after a row's last example continues its positions, so it is part of that example and is
  never read by a real token.
- flash attention (`attn_implementation="flash_attention_2"`/`_3` or a flash kernel, CUDA): the
  padding-free form. Its packed path takes one row only, so the rows are laid end to end without
  their padding into a (1, tokens) batch with `position_ids` and the varlen boundaries
  (`cu_seq_lens_q/k`, `max_length_q/k`, as transformers' `DataCollatorWithFlattening` writes them),
  and `flash_attn_varlen_func` attends within each example; the labels are laid out the same way
  (each example's first label is -100, so nothing is predicted across a boundary).

`model_inputs` is what `train_step` calls on every micro-batch; `check_packable` runs the model
once on two examples packed and one alone and refuses a model whose attention crosses the
boundary (one that ignores `position_ids`, an attention implementation transformers does not
mask, an older transformers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lorakit.errors import ConfigError
from lorakit.modes import evaluating
from lorakit.train.loss import logits_of

__all__ = [
    "attention_implementation",
    "check_packable",
    "flattened",
    "is_packed",
    "model_inputs",
    "uses_flash_attention",
]


def attention_implementation(model: nn.Module) -> str | None:
    """The model's attention implementation as its transformers config names it (None: not said)."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    config = getattr(inner, "config", None)
    name = getattr(config, "_attn_implementation", None)
    return name if isinstance(name, str) else None


def uses_flash_attention(model: nn.Module) -> bool:
    """Whether the model attends with a flash-attention kernel (transformers' rule: "flash" in its name)."""
    return "flash" in (attention_implementation(model) or "")


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether some row of `batch` holds more than one sequence: its `position_ids` restart (do not
    go up by one) between two tokens its 2-D `attention_mask` keeps."""
    positions, mask = batch.get("position_ids"), batch.get("attention_mask")
    if not (isinstance(positions, torch.Tensor) and isinstance(mask, torch.Tensor)):
        return False
    if positions.ndim != 2 or mask.shape != positions.shape or positions.shape[1] < 2:
        return False
    kept = mask.bool()
    restarts = (positions[:, 1:] != positions[:, :-1] + 1) & kept[:, 1:] & kept[:, :-1]
    return bool(restarts.any())


def model_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch in the form the model keeps packed examples apart in (see the module docstring).

    A batch that is not packed (`is_packed`) is returned as it is. Otherwise, for flash attention,
    its rows without padding in one row with the varlen boundaries; for any other attention, the
    batch without `attention_mask`. Either way with `use_cache=False` (transformers masks packed
    positions only without a cache).

    Args:
        model: the model (or its DDP wrapper) the batch is for.
        batch: `input_ids`, `attention_mask`, `position_ids`, `labels` (and whatever else the model
            takes), on the CPU or the model's device.

    Returns:
        A new dict; `labels` (if given) are laid out as the inputs.
    """
    if not is_packed(batch):
        return batch
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    out["use_cache"] = False
    return flattened(batch) if uses_flash_attention(model) else out


def flattened(batch: dict[str, Any]) -> dict[str, Any]:
    """A packed batch as flash attention's padding-free form: one row of every row's tokens.

    The rows' tokens (where `attention_mask` is 1) are laid end to end, with their `position_ids`
    and `labels`, into (1, tokens) tensors, and the boundaries of the sequences (where the positions
    restart) are given as `cu_seq_lens_q`/`cu_seq_lens_k` (int32, from 0 to the token count) and
    `max_length_q`/`max_length_k` (the longest sequence), so transformers calls
    `flash_attn_varlen_func` without reading the positions in every layer. Any other attention
    implementation of transformers reads the same row correctly from its `position_ids`.

    Args:
        batch: a packed batch (`is_packed`) with `input_ids`, `attention_mask`, `position_ids`
            and, optionally, `labels`.

    Returns:
        A new dict without `attention_mask`, with `use_cache=False`.
    """
    kept = batch["attention_mask"].bool()
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    out["use_cache"] = False
    for name in ("input_ids", "position_ids", "labels"):
        if isinstance(batch.get(name), torch.Tensor):
            out[name] = batch[name][kept][None]
    positions = out["position_ids"][0]
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([positions.numel()], device=positions.device)])
    cu_seq_lens = bounds.to(torch.int32)
    longest = int(bounds.diff().max())
    out.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest)
    return out


# The probe's tolerance on the logits of the example read alone and packed after another, relative to
# their largest magnitude: rounding differs only by the order of a sum (fp32: ~1e-6; bf16: ~1e-2),
# while attending across the boundary changes them outright.
_PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_PROBE_TOLERANCE_LOW = 5e-2


def check_packable(model: nn.Module) -> None:
    """Refuse a model that does not keep packed examples apart.

    Runs the model twice in eval mode without gradients (the RNG forked): on one row holding two
    examples of 3 tokens packed (`model_inputs`), and on the second example alone; the second's
    logits must agree (relative to their size; see `_PROBE_TOLERANCE`).

    Raises:
        ConfigError: the logits differ (the attention or the positions cross the boundary), or the
            model does not take `position_ids`; naming the model, its attention implementation and
            that training without packing works.
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    param = next(inner.parameters())
    vocab = _vocab(inner)
    first = torch.tensor([[1, 2, 3]]) % vocab
    second = torch.tensor([[4, 5, 6]]) % vocab
    packed = {
        "input_ids": torch.cat([first, second], dim=1),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]]),
    }
    alone = {"input_ids": second, "attention_mask": torch.ones(1, 3, dtype=torch.long), "use_cache": False}
    name = type(inner).__name__
    impl = attention_implementation(inner)
    devices = [param.device.index or 0] if param.device.type == "cuda" else []
    try:
        with evaluating(inner), torch.no_grad(), torch.random.fork_rng(devices=devices):
            expected = _logits(inner, alone, param.device)
            got = _logits(inner, model_inputs(inner, packed), param.device)[:, -3:]
    except TypeError as err:
        raise ConfigError(
            f"{name} cannot be trained packed: its forward does not take position_ids ({err}); train without packing"
        ) from None
    tolerance = _PROBE_TOLERANCE.get(expected.dtype, _PROBE_TOLERANCE_LOW)
    expected, got = expected.float(), got.float()
    scale = float(expected.abs().max()) or 1.0
    diff = float((got - expected).abs().max())
    if not diff <= tolerance * scale:
        raise ConfigError(
            f"{name} (attention implementation {impl!r}) does not keep packed examples apart: an example's "
            f"logits change by {diff / scale:.2g} of their size when another example is packed before it; "
            "packing needs a transformers causal LM (>= 5.0) that masks packed position_ids "
            "(sdpa, eager, flex or flash attention); train without packing"
        )


def _vocab(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(embed, "num_embeddings", 7))


def _logits(model: nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return logits_of(model(**inputs))
