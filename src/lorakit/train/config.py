"""`TrainConfig`: the hyper-parameters of one training run, validated in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lorakit.errors import ConfigError
from lorakit.train.preference import check_preference_options

__all__ = ["LOSSES", "METHODS", "REPORTERS", "SCHEDULES", "TrainConfig"]

Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES = ("cosine", "linear", "constant")
Loss = Literal["chunked", "full"]
LOSSES = ("chunked", "full")
Method = Literal["sft", "dpo", "ipo", "orpo"]
METHODS = ("sft", "dpo", "ipo", "orpo")
Reporter = Literal["tensorboard", "mlflow"]
REPORTERS = ("tensorboard", "mlflow")

# Fields that change only logging, checkpoint cadence or evaluation: a run may be resumed with
# other values for them and still follow the same trajectory.
# The strategy and FSDP's memory options change how the same step is computed, not what it computes.
RESUME_FREE_FIELDS = frozenset(
    {
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "strategy",
        "reshard_after_forward",
        "cpu_offload",
        # The chunked loss computes the full path's loss and gradients in another order (float
        # rounding only) and draws the same dropout masks, so either continues the other's run
        # (but for an output head only its per-chunk checkpoint computes, e.g. a DoRA lm_head,
        # whose dropout masks are drawn chunk by chunk).
        "loss",
        # Checkpointing recomputes each block with the forward's RNG state and masks: the same
        # gradients to the bit (tests/unit/test_grad_checkpointing.py), so a run may switch it to
        # fit in memory when it resumes.
        "grad_checkpointing",
        # Where the metrics are also written: what a step computes is the same.
        "report_to",
        # The reference's log-probabilities computed once before training or at every step: the same
        # eval-mode forward of the same pairs, batched differently (float rounding only).
        "precompute_ref",
    }
)


@dataclass
class TrainConfig:
    """Optimiser, schedule, batching and checkpointing of one `fit` run.

    Args:
        lr: peak learning rate of AdamW (after warmup).
        weight_decay: decoupled weight decay (AdamW); never applied to biases or norm weights
            (parameters with fewer than 2 dimensions).
        betas: AdamW's (β1, β2).
        eps: AdamW's ε.
        warmup_steps: optimizer steps of linear warmup from 0 to `lr`.
        schedule: after warmup, `"cosine"` decays to 0 at the last step, `"linear"` likewise in a
            straight line, `"constant"` keeps `lr`.
        max_steps: optimizer steps to run; if set it wins over `epochs`.
        epochs: passes over the data when `max_steps` is None.
        batch_size: rows of one batch as `train_batches_fn` yields it. It is the *global* batch:
            under DDP each of the W ranks takes rows `rank::W` of every batch, so a run on W ranks
            computes the same update as one process. With `packing`, packed rows (each holds
            several examples).
        grad_accum: batches per optimizer step (the gradient is accumulated over them and the loss
            normalised by their total number of target tokens, so 2 batches of 2 rows give the
            update of 1 batch of 4).
        max_grad_norm: clip the global gradient norm to this; None disables clipping.
        seed: seeds torch, `random` and numpy at the start of a fresh run (rank r uses seed + r).
        eval_every: call `eval_fn` every this many steps (and always at the end); None: only at
            the end.
        save_every: write a checkpoint every this many steps; None: none during the run (one is
            still written on Ctrl-C).
        keep_checkpoints: keep only the newest this many checkpoints; None keeps all.
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): the B matrices train with `lr × ratio`
            (the paper suggests 2-32; 16 is common). None: one learning rate.
        method: what the run optimises: `sft` (the cross entropy of the completions) or, on
            preference pairs (`prompt`, `chosen`, `rejected`), `dpo` (DPO's sigmoid loss; β),
            `ipo` (IPO's squared loss on length-normalised log-ratios; β) or `orpo` (the chosen
            answers' NLL plus λ times ORPO's odds-ratio term; no reference). DPO and IPO compare
            with a reference: the base model (the adapter switched off), or the `--init-adapter`
            loaded frozen. A batch then holds `batch_size` pairs (2 × `batch_size` sequences).
        beta: β of `dpo` and `ipo` (how far the policy may move from the reference; 0.1 as in TRL),
            λ of `orpo` (the weight of the odds-ratio term); > 0.
        precompute_ref: compute the reference's log-probabilities of every pair once before
            training (stored with the run, so a resumed run reuses them) instead of one reference
            forward per step (`dpo`, `ipo`).
        label_smoothing: label smoothing of the cross entropy, in [0, 1); for `dpo` the
            probability ε that a pair's preference is flipped (conservative DPO, TRL's
            `label_smoothing`), in [0, 0.5).
        loss: how a causal LM's loss is computed. `chunked` never holds the (tokens × vocabulary)
            logits: the model runs with its output head bypassed, positions without a target are
            dropped, and the head and cross entropy run over chunks of tokens
            (`lorakit.train.chunked_loss`); `full` takes the model's logits (the reference, for
            models the chunked path does not know). Same loss and gradients up to float rounding;
            classification always takes the logits.
        grad_checkpointing: keep only each decoder block's input and recompute the rest in the
            backward: less activation memory for about one more forward per step, the same gradients
            (dropout masks included); any base (fp32, bf16, NF4), with DDP and FSDP.
        autocast: `bf16` runs each forward under `torch.autocast` in bfloat16 (CPU and CUDA):
            matrix products in bf16, the adapters' weights and gradients stay in their own dtype;
            `none` computes in the model's dtype.
        packing: concatenate whole examples into rows of at most `seq_len` tokens (best-fit
            decreasing over each epoch's shuffled order; `lorakit.data.packing`), with position ids
            restarting at each example and attention kept within it (a block-diagonal mask through
            SDPA, or flash attention's varlen sequences; `lorakit.train.packed`): no padding
            between examples, the loss and gradients of the same examples unpacked. Causal LMs
            only; the model must keep packed examples apart (checked before training).
        group_by_length: without packing, batch rows of similar length (transformers'
            `LengthGroupedSampler`: each epoch's shuffled order sorted within mega-batches of 50
            batches), so batches carry little padding; the order still depends only on
            (seed, epoch). Packing already fills its rows, so the two are not combined.
        log_every: write a line to `metrics.jsonl` every this many steps.
        report_to: also write every `metrics.jsonl` line to these, as local files under the run's
            directory: `tensorboard` (event files in `tensorboard/`; the `tensorboard` extra),
            `mlflow` (an MLflow tracking store `mlflow.db`, SQLite; the `mlflow` extra). Comma-
            separated; empty: metrics.jsonl only.
        strategy: how several processes (torchrun) share the work; one process ignores it.
            `ddp` replicates the model on every rank and averages gradients; `fsdp` shards every
            parameter, the frozen base included, over the ranks (FSDP2, each decoder block its own
            unit), so each rank holds about 1/N of the model, and checkpoints are sharded.
        reshard_after_forward: with `fsdp`, free each block's gathered parameters after its forward
            and gather them again for the backward (less memory, more communication).
        cpu_offload: with `fsdp` on CUDA, keep the shards, gradients and optimizer state in CPU
            memory between uses.

    Raises:
        ConfigError: listing every invalid value at once.
    """

    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Schedule = "cosine"
    max_steps: int | None = None
    epochs: int | None = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = 200
    keep_checkpoints: int | None = 2
    loraplus_lr_ratio: float | None = None
    method: Method = "sft"
    beta: float = 0.1
    precompute_ref: bool = False
    label_smoothing: float = 0.0
    loss: Loss = "chunked"
    grad_checkpointing: bool = False
    autocast: Literal["none", "bf16"] = "none"
    packing: bool = False
    group_by_length: bool = False
    log_every: int = 1
    report_to: list[Reporter] = field(default_factory=list)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if isinstance(self.report_to, tuple):
            self.report_to = list(self.report_to)
        problems = self.problems()
        if problems:
            raise ConfigError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid value, as one message each (empty if the config is valid)."""
        out: list[str] = []

        def number(name: str, *, low: float, low_ok: bool, high: float | None = None, high_ok: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                out.append(f"{name} must be a number, got {value!r}")
                return
            bad_low = value < low if low_ok else value <= low
            bad_high = high is not None and (value > high if high_ok else value >= high)
            if bad_low or bad_high or value != value:
                lo = "[" if low_ok else "("
                hi = "" if high is None else (f"{high}]" if high_ok else f"{high})")
                out.append(f"{name} must be in {lo}{low}, {hi or '∞)'}, got {value!r}")

        def integer(name: str, *, minimum: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                none = " or None" if optional else ""
                out.append(f"{name} must be an integer >= {minimum}{none}, got {value!r}")

        number("lr", low=0, low_ok=False)
        number("weight_decay", low=0, low_ok=True)
        number("eps", low=0, low_ok=False)
        number("label_smoothing", low=0, low_ok=True, high=1)
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)
        ):
            out.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        integer("warmup_steps", minimum=0)
        if self.schedule not in SCHEDULES:
            out.append(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {self.schedule!r}")
        integer("max_steps", minimum=1, optional=True)
        integer("epochs", minimum=1, optional=True)
        if self.max_steps is None and self.epochs is None:
            out.append("set max_steps or epochs (both are None, so the run would have no length)")
        integer("batch_size", minimum=1)
        integer("grad_accum", minimum=1)
        if self.max_grad_norm is not None:
            number("max_grad_norm", low=0, low_ok=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            out.append(f"seed must be an integer, got {self.seed!r}")
        integer("eval_every", minimum=1, optional=True)
        integer("save_every", minimum=1, optional=True)
        integer("keep_checkpoints", minimum=1, optional=True)
        if self.loraplus_lr_ratio is not None:
            number("loraplus_lr_ratio", low=0, low_ok=False)
        if self.method not in METHODS:
            out.append(f"method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        elif self.method != "sft":
            try:
                check_preference_options(self.method, self.beta, self.label_smoothing)
            except ConfigError as err:
                out.append(str(err).replace("--beta", "beta").replace("--label-smoothing", "label_smoothing"))
        if not isinstance(self.precompute_ref, bool):
            out.append(f"precompute_ref must be True or False, got {self.precompute_ref!r}")
        elif self.precompute_ref and self.method not in ("dpo", "ipo"):
            out.append(f"precompute_ref applies to dpo and ipo (they compare with a reference), not {self.method}")
        if self.loss not in LOSSES:
            out.append(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {self.loss!r}")
        if not isinstance(self.grad_checkpointing, bool):
            out.append(f"grad_checkpointing must be True or False, got {self.grad_checkpointing!r}")
        integer("log_every", minimum=1)
        for name in ("packing", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.packing is True and self.group_by_length is True:
            out.append(
                "packing and group_by_length do not combine: group_by_length batches unpacked rows of similar "
                "length, and packing already fills every row to seq_len; choose one"
            )
        if not isinstance(self.report_to, list | tuple) or any(r not in REPORTERS for r in self.report_to):
            out.append(f"report_to must be a list of {', '.join(map(repr, REPORTERS))}, got {self.report_to!r}")
        elif len(set(self.report_to)) != len(self.report_to):
            out.append(f"report_to names a reporter twice: {self.report_to!r}")
        if self.autocast not in ("none", "bf16"):
            out.append(f"autocast must be 'none' or 'bf16', got {self.autocast!r}")
        if self.strategy not in ("ddp", "fsdp"):
            out.append(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        for name in ("reshard_after_forward", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.cpu_offload and self.strategy != "fsdp":
            out.append("cpu_offload needs strategy='fsdp' (it offloads FSDP's shards)")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (betas as a list)."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    def resume_differences(self, saved: dict[str, Any]) -> list[str]:
        """Fields that differ from a checkpoint's config and would change the trajectory."""
        now = self.to_dict()
        return [
            f"{name}: checkpoint {saved.get(name)!r}, now {now[name]!r}"
            for name in now
            if name not in RESUME_FREE_FIELDS and saved.get(name) != now[name]
        ]
