"""Everything lorakit does only for speed or memory, behind one switch.

The reference is `lorakit.layers` + `lorakit.functional`: plain tensor operations under autograd,
a layer's forward in a dozen lines. Each path here computes the same values and gradients (to
float rounding) with less memory kept for the backward or fewer passes over memory, applies only
where its eligibility function says so, and otherwise leaves the reference to run.
`with lorakit.kernels.disabled():` (or `LORAKIT_KERNELS=0` in the environment) runs the reference
everywhere; `disabled("gated_mlp")` turns off one path; `forced()` lets every path run again (for
what pins or measures a path itself).

Kernels see records, not layers: each path takes the base layer, the input, the adapter records
(`lorakit.records`) and, for mixed batches, the `RowRouting`, and reads only public record fields.
Every path accepts a record through one predicate, `guards.computes`: plain LoRA, or a variant
(`lorakit.variants`) of a form the path declares — so a new variant runs the reference until a path
is taught it, and is never computed as plain LoRA.

The paths (name · module · eligibility function: what it saves; when it applies):

- `fused_linear` · `linear` · `fused_applies`: one autograd node per branch keeps x itself, the
  dropout mask as positions or bits and the (N, r) product, not a float copy of dropout(x) per
  layer, and adds the branch into the base output in place; a variant whose output rescales the
  plain one (`Variant.rescales_sum`: DoRA) applies its own `rescale` to the node's output. Every
  unsliced adapter of a `LoraLinear`, in training and inference, under torch.compile too; not
  under `torch.autocast` (no `LoraLinear` path runs there: the reference follows autocast).
- `masked_input` · `dropout` · `masked_applies`: in training with dropout, the branches the node
  does not cover (fused slices, conv) keep their input's mask as positions or bits
  (`MaskedInput`), not a float factor. The reference is `functional.dropout`, plain autograd.
- `merged_weight` · `merged_weight` · `weight`: without gradients, one x·(W0 + s·B·A)ᵀ instead of
  the branches: one pass over W instead of two over the output. `nn.Linear` base without hooks, no
  dropout in effect, enough rows to be cheaper.
- `stacked_rows` · `rows` · `stacks`: `adapter_per_row` without gradients: every plain adapter of
  the layer stacked once (kept until one changes); up to 64 tokens (a decode step) two dense
  products over all of them with each row's own columns selected, more tokens each row's (A, s·B)
  gathered and one `bmm` pair — any number of adapters for about the cost of one. Rows on variant or
  fused-slice adapters, or adapters of mixed dtypes, take the reference.
- `nf4_dequant` · `nf4` · `dequantize`: an NF4 base weight back to dense in three passes (a
  byte-pair table gather, an in-place scale) instead of torchao's eight: the same numbers, 2.8×
  faster on CPU; a QLoRA step dequantizes every base weight twice.
- `nf4_quant` · `nf4` · `quantize`: a weight to NF4 (the streaming load, `quantize`) in chunks of
  4,096 blocks with a binary search over the levels, instead of torchao's `to_nf4` (a whole-weight
  scaled copy and a (2^20, 16) distance matrix): the same bits, about 3× faster, a few MB of
  temporaries. Contiguous weights whose size the blocks divide.
- `gated_mlp` · `gated_mlp` · `plan`: a LLaMA-style MLP with LoRA as one node that keeps e and u
  and recomputes act(e)·u: less than even the frozen MLP keeps. Training, outside compile and
  autocast, `nn.Linear` projections with one unmerged adapter each.

`recompute` is not a path but the gated-MLP node's side of gradient checkpointing: in a checkpointed
block's recomputation that throws its output away, the node skips the down projection's base
product (`lorakit.train.checkpointing` decides per run; the gradients are the same bits).

What is not a switchable path: dropout masks are drawn by `dropout.draw_mask` on both paths (a
sparse sampler on CPU, dense elsewhere) and shared by layers reading the same tensor as
`LoraConfig.share_dropout_mask` says, so the switch changes how a mask is kept and applied, never
which elements drop.

How each is checked: `tests/kernels/` pins the internals (what a node keeps, how often a masked
input is rebuilt, mask statistics, eligibility); the spec tests (`tests/parity`, `tests/unit`,
`tests/property`) run with the kernels on and with them disabled, and both agree with PEFT and the
hand computations; `tests/kernels/test_switch.py` trains a model both ways, dropout on, and compares
every gradient.
"""

from lorakit.kernels.switch import PATHS, disabled, enabled, forced

__all__ = ["PATHS", "disabled", "enabled", "forced"]
