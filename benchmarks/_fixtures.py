"""What a benchmark measures on: the packaged base model (cut to `--layers`), seeded token ids, a LoRA
adapter from lorakit or PEFT with a random (trained-looking) B, the frozen-model floor, and the one
training step every row times.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _flags import ADAPTER_SETS, MODEL

B_STD = 0.01
"""B is drawn from N(0, B_STD²) instead of zeros, so the adapted model is not the base model."""


def torch_dtype(args: argparse.Namespace):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def model_spec(args: argparse.Namespace) -> str:
    """What `lorakit.models.load_model` loads for `args.model` (default the packaged SmolLM2-135M);
    a name of `_large_model.LARGE_MODELS` is fetched first."""
    import _large_model

    return _large_model.resolve(getattr(args, "model", None) or MODEL)


def load_base(args: argparse.Namespace):
    """`args.model` (default the packaged SmolLM2-135M) with real weights, cut to `args.layers`
    layers, on `args.device`.

    Returns:
        The causal LM (LLaMA layout: `model.model.layers`, `q_proj` ... `down_proj`), in eval mode,
        with `use_cache` off.
    """
    from lorakit.models import load_model

    spec = model_spec(args)
    model, _tok, _name = load_model(spec, dtype=torch_dtype(args))
    if not hasattr(getattr(model, "model", None), "layers"):  # the benchmarks assume the LLaMA layout
        raise SystemExit(f"expected a LLaMA-layout causal LM (model.model.layers) for {spec}: {type(model).__name__}")
    if args.layers is not None and args.layers < model.config.num_hidden_layers:
        # A truncated copy of the same architecture: the first N decoder blocks, same widths.
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    model.config.use_cache = False
    gc.collect()
    return model.to(args.device).eval()


def random_ids(args: argparse.Namespace, vocab: int, batch: int | None = None, seq: int | None = None):
    """Seeded random token ids, (batch, seq), on the device."""
    import torch

    g = torch.Generator().manual_seed(1234)
    shape = (batch or args.batch, seq or args.seq)
    return torch.randint(0, vocab, shape, generator=g).to(args.device)


def training_step(model: Any, ids: Any, lr: float = 1e-5) -> Callable[[], Any]:
    """One training step as `lorakit.train.fit` runs it (`lorakit.train.train_step`): forward,
    token-normalised loss, backward, gradient clipping at 1.0 and fused AdamW (`build_optimizer`)
    over whatever requires grad; a model with nothing to train (the floor) runs forward and
    backward only. Every row of a benchmark times this same step, whichever LoRA library it uses.

    The step function is the working tree's `train/step.py`, loaded by path, so a child that
    imports another revision's lorakit (`--baseline`) still times the same step.
    """
    import importlib.util

    from lorakit.train import TrainConfig, build_optimizer

    name = "_benchmarked_train_step"
    module = sys.modules.get(name)
    if module is None:
        path = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "train" / "step.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    cfg = TrainConfig(lr=lr)
    optimizer = build_optimizer(model, cfg) if any(p.requires_grad for p in model.parameters()) else None
    batch = {"input_ids": ids, "labels": ids}
    return lambda: module.train_step(model, [batch], optimizer, max_grad_norm=cfg.max_grad_norm)


def make_floor(model: Any) -> Any:
    """The floor: every weight frozen, the input embeddings' output made to require grad, so the
    backward still runs through every layer computing input gradients only. Returns the model."""
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return model


def add_lora(model: Any, lib: str, adapter_set: str, dropout: float, **options: Any) -> Any:
    """`model` with one LoRA adapter of `adapter_set` from `lib` ("peft" or "lorakit"), B drawn
    small and random (see `randomize_lora_B`); returns the model (PEFT wraps it) and that count.
    `options` go to the LoraConfig (e.g. `use_dora=True`)."""
    if lib == "peft":
        import peft

        model = peft.get_peft_model(model, lora_configs("peft", adapter_set, dropout, **options))
    else:
        import lorakit

        lorakit.inject(model, lora_configs("lorakit", adapter_set, dropout, **options))
    return model, randomize_lora_B(model)


def randomize_lora_B(model, std: float = B_STD, seed: int = 0) -> int:
    """Draw every LoRA B (lorakit's `...lora_B`, PEFT's `...lora_B.<name>.weight`) from N(0, std²).

    A fresh adapter has B = 0, and its branch may then be cheaper than a trained one (zeros, no
    denormals): benchmark what a trained adapter costs.

    Returns:
        How many B tensors were set (0 means the name pattern matched nothing: a bug).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name.split("."):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p))
                n += 1
    if n == 0:
        raise RuntimeError("no LoRA B parameter found to randomise")
    return n


def lora_configs(library: Any, adapter_set: str, dropout: float, **options: Any):
    """A LoraConfig for one of ADAPTER_SETS of `library`: "peft", "lorakit", or a lorakit module
    (another revision's, from `_baseline.load`); `options` are further LoraConfig fields."""
    r, alpha, targets = ADAPTER_SETS[adapter_set]
    if library == "peft":
        import peft

        module = peft
    elif library == "lorakit":
        import lorakit

        module = lorakit
    else:
        module = library
    return module.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), **options)
