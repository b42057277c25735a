"""Flags and TOML keys generated from the config dataclasses: every field settable, typed, one default."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

import pytest

import lorakit
from lorakit.cli import build_parser, commands
from lorakit.cli.flags import flag_help, parse_value
from lorakit.errors import ConfigError
from lorakit.evaluate import Evaluation
from lorakit.generate import Decoding
from lorakit.memory import Preflight
from lorakit.recipes import RECIPES, config_path
from lorakit.train import TrainConfig
from lorakit.train.run import TrainRun


def _options(*argv: str, toml: str | None = None, tmp_path=None):
    """The config instances `lorakit ARGV` would run with (optionally with a --config file)."""
    argv = list(argv)
    if toml is not None:
        path = tmp_path / "run.toml"
        path.write_text(toml)
        argv += ["--config", str(path)]
    args = build_parser().parse_args(argv)
    return commands()[args.command].options(args)


def test_without_flags_every_setting_has_the_dataclasses_own_default():
    run, lora, train = _options("train")
    assert (run, lora, train) == (TrainRun(), lorakit.LoraConfig(), TrainConfig())
    source, evaluation, decoding = _options("eval")
    assert (evaluation, decoding) == (Evaluation(), Decoding())
    assert source == lorakit.models.ModelSource()


def test_every_lora_and_train_field_is_a_flag_and_takes_its_type():
    run, lora, train = _options(
        "train",
        *("-r", "4", "--lora-alpha", "32", "--lora-dropout", "0.1", "--target", "q_proj,v_proj"),
        *("--exclude-modules", "o_proj", "--layers-to-transform", "0,1", "--layers-pattern", "layers"),
        *("--rank-pattern", "q_proj=16,v_proj=2", "--alpha-pattern", '{"q_proj": 64}', "--bias", "lora_only"),
        *("--modules-to-save", "lm_head", "--rslora", "--init-lora-weights", "gaussian"),
        *("--no-share-dropout-mask", "--base-model-name-or-path", "org/model"),
        *("--lr", "3e-4", "--weight-decay", "0", "--betas", "0.9,0.95", "--eps", "1e-6", "--warmup-steps", "5"),
        *("--schedule", "linear", "--max-steps", "7", "--epochs", "none", "--batch-size", "2", "--grad-accum", "3"),
        *("--max-grad-norm", "none", "--seed", "9", "--eval-every", "2", "--save-every", "none"),
        *("--keep-checkpoints", "4", "--loraplus-lr-ratio", "16", "--label-smoothing", "0.1"),
        *("--grad-checkpointing", "--log-every", "3", "--loss", "full"),
        *("--data", "x.jsonl", "--task", "classification", "--num-labels", "3", "--seq-len", "64", "-o", "runs/y"),
    )
    assert lora == lorakit.LoraConfig(
        r=4,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["o_proj"],
        layers_to_transform=[0, 1],
        layers_pattern=["layers"],
        rank_pattern={"q_proj": 16, "v_proj": 2},
        alpha_pattern={"q_proj": 64},
        bias="lora_only",
        modules_to_save=["lm_head"],
        use_rslora=True,
        init_lora_weights="gaussian",
        share_dropout_mask=False,
        base_model_name_or_path="org/model",
    )
    assert train == TrainConfig(
        lr=3e-4,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        eps=1e-6,
        warmup_steps=5,
        schedule="linear",
        max_steps=7,
        epochs=None,
        batch_size=2,
        grad_accum=3,
        max_grad_norm=None,
        seed=9,
        eval_every=2,
        save_every=None,
        keep_checkpoints=4,
        loraplus_lr_ratio=16.0,
        label_smoothing=0.1,
        grad_checkpointing=True,
        log_every=3,
        loss="full",
    )
    assert (run.data, run.task, run.num_labels, run.seq_len, run.out) == ("x.jsonl", "classification", 3, 64, "runs/y")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("all-linear", "all-linear"),
        (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),  # a regex is one string
        ("[qv]_proj", "[qv]_proj"),  # not JSON: a regex
        ('["q_proj", "v_proj"]', ["q_proj", "v_proj"]),
        ("q_proj", ["q_proj"]),
        ("none", None),
    ],
)
def test_target_modules_reads_suffix_lists_regexes_and_json(text, expected):
    assert parse_value(typing.get_type_hints(lorakit.LoraConfig)["target_modules"], text) == expected


def test_fused_slices_and_a_single_layer_index():
    _, lora, _ = _options("train", "--fused-slices", '{"c_attn": [true, false, true]}', "--layers-to-transform", "3")
    assert lora.fused_slices == {"c_attn": [True, False, True]} and lora.layers_to_transform == 3
    _, lora, _ = _options("train", "--init-lora-weights", "false")
    assert lora.init_lora_weights is False


@pytest.mark.parametrize(
    "argv, words",
    [
        (("--schedule", "cosinus"), ("--schedule", "cosine, linear, constant", "'cosinus'")),
        (("--bias", "some"), ("--bias", "none, all, lora_only")),
        (("--loss", "fused"), ("--loss", "chunked, full", "'fused'")),
        (("--task", "regression"), ("--task", "causal-lm, classification")),
        (("--init-lora-weights", "olora"), ("--init-lora-weights", "true, false, gaussian, pissa")),
        (("-r", "four"), ("-r", "'four'")),
        (("--betas", "0.9"), ("--betas", "expected 2 comma-separated values")),
        (("--rank-pattern", "q_proj"), ("--rank-pattern", "key=value")),
    ],
)
def test_a_bad_flag_value_names_the_flag_and_the_choices(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lorakit train: error: argument "), err
    for word in words:
        assert word in err, (word, err)


def test_values_the_config_refuses_are_listed_at_once():
    with pytest.raises(ConfigError, match=r"(?s)r must be a positive integer.*lora_dropout must be in \[0, 1\)"):
        _options("train", "-r", "0", "--lora-dropout", "1.5")


def test_toml_sets_any_field_and_flags_win(tmp_path):
    toml = """
target = "q_proj,k_proj"      # the old key and a comma list, read as the flag is
rslora = true
rank_pattern = { q_proj = 16 }
exclude_modules = ["layers.0.self_attn.k_proj"]
betas = [0.9, 0.98]
max_grad_norm = 0.5
lr = 5e-4
keep_checkpoints = 1
log_every = 5
seq_len = 40
"""
    run, lora, train = _options("train", "--lr", "1e-3", toml=toml, tmp_path=tmp_path)
    assert lora.target_modules == ["q_proj", "k_proj"] and lora.use_rslora is True
    assert lora.rank_pattern == {"q_proj": 16} and lora.exclude_modules == ["layers.0.self_attn.k_proj"]
    assert train.betas == (0.9, 0.98) and train.max_grad_norm == 0.5
    assert (train.keep_checkpoints, train.log_every, run.seq_len) == (1, 5, 40)
    assert train.lr == 1e-3  # the flag wins over the file


def test_toml_problems_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key.*learning_rate.*known keys"):
        _options("train", toml="learning_rate = 0.1\n", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"schedule.*choose from cosine, linear, constant"):
        _options("train", toml='schedule = "cosinus"\n', tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="not valid TOML"):
        _options("train", toml="lr = = 1\n", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        _options("train", toml="r = 0\n", tmp_path=tmp_path)


def test_the_quickstart_recipe_is_a_packaged_config():
    assert "quickstart" in RECIPES
    run, lora, train = _options("train", "--config", "quickstart", "--max-steps", "3")
    assert train.max_steps == 3 and train.lr == 1e-3 and lora.lora_alpha == 16 and run.seq_len == 96
    assert run.eval_max_rows == 100
    defaults = TrainRun()
    assert dataclasses.replace(run, seq_len=defaults.seq_len, eval_max_rows=defaults.eval_max_rows) == defaults
    with pytest.raises(ConfigError, match=r"'quick': no such file, and not a packaged recipe \(quickstart"):
        config_path("quick")


def test_each_command_has_its_own_flags():
    _, prompt, decoding = _options("generate", "--prompt", "hi", "--num-beams", "4", "--do-sample")
    assert prompt.prompt == "hi" and decoding == Decoding(num_beams=4, do_sample=True)
    _, lora, preflight = _options(
        "inspect", "--target", "all-linear", "-r", "2", "--quantize", "nf4", "--seq-len", "64"
    )
    assert lora.target_modules == "all-linear" and lora.r == 2
    assert preflight == Preflight(quantize="nf4", seq_len=64)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--task", "classification"])  # not a generate flag


def test_a_dict_flag_given_twice_merges_its_pairs(tmp_path):
    (tmp_path / "a").mkdir()
    _, config = _options("serve", "--adapter", "e2e=runs/x", "--adapter", "sql=runs/y,chat=runs/z")
    assert config.adapter == {"e2e": "runs/x", "sql": "runs/y", "chat": "runs/z"}
    _, config = _options("serve", "--adapter-dir", str(tmp_path / "a"), "--max-batch", "4")
    assert config.adapter == {} and config.max_batch == 4
    with pytest.raises(ConfigError, match="max_batch must be an integer >= 1"):
        _options("serve", "--max-batch", "0")
    with pytest.raises(ConfigError, match=r"adapter_dir .* is not a folder"):
        _options("serve", "--adapter-dir", str(tmp_path / "missing"))


@pytest.mark.parametrize("command", ["analyze", "compress", "merge", "export", "eval", "generate"])
def test_the_adapter_may_be_given_as_the_positional_argument(command, tmp_path):
    by_flag = _options(command, "--adapter", "runs/x")
    by_position = _options(command, "runs/x")
    assert by_position == by_flag
    assert any(getattr(o, "adapter", None) == "runs/x" for o in by_position)
    # The positional argument also wins over a --config file's key, as a flag does.
    assert _options(command, "runs/x", toml='adapter = "runs/y"', tmp_path=tmp_path) == by_flag


@pytest.mark.parametrize("command", ["analyze", "eval"])
def test_an_adapter_given_twice_differently_is_refused(command):
    with pytest.raises(ConfigError, match=r"ADAPTER given twice: 'runs/x' and --adapter 'runs/y'"):
        _options(command, "runs/x", "--adapter", "runs/y")
    assert _options(command, "runs/x", "--adapter", "runs/x") == _options(command, "--adapter", "runs/x")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["merge", "-o", "m"],
            r"^ADAPTER \(or --adapter\) is required: adapter directory \(PEFT format\), or a training run's output dir",
        ),
        (
            ["export"],
            r"^ADAPTER \(or --adapter\) and --out are required: adapter directory .*; the \.gguf file to write",
        ),
        (["export", "runs/x"], r"^--out is required: the \.gguf file to write \(replaced atomically if it exists\)$"),
        (["analyze", "--adapter", ""], r"^ADAPTER \(or --adapter\) is required: the adapter directory"),
        (["compress", "--adapter", "runs/x"], r"^--out is required: directory for the compressed adapter"),
    ],
    ids=["merge", "export-both", "export-out", "analyze-empty", "compress"],
)
def test_a_command_refuses_to_run_without_what_it_requires(argv, message):
    """`Command.requires`: one check for every command, every missing field named, before anything runs."""
    args = build_parser().parse_args(argv)
    command = commands()[args.command]
    ran = []
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(command, run=lambda *a, **k: ran.append(a))(args)
    assert ran == []


def test_commands_without_an_adapter_take_no_positional_argument(capsys):
    for command in ("train", "inspect", "serve"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "runs/x"])
        assert "unrecognized arguments: runs/x" in capsys.readouterr().err


def _flag_helps() -> dict[tuple[str, str], str]:
    """(command, field) -> the `--help` text of the field's flag, for every field of every command."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, command in commands().items():
        actions = {a.dest: a for a in sub.choices[name]._actions}
        for spec in command.specs:
            for f in spec.fields():
                out[name, f.name] = actions[f.name].help
    return out


@pytest.mark.parametrize(
    ("command", "field", "shown"),
    [
        ("train", "model", "(default: `smollm2-135m`)"),  # issue 24: was "(default: none)"
        ("train", "target_modules", "(default: the paper's choice, the attention query and value projections"),
        ("train", "threads", "(default: torch's choice)"),
        ("train", "eval_data", "(default: `e2e-dev` for `e2e`, else a held-out fraction of the training data)"),
        ("train", "base_model_name_or_path", "(default: the base model's name"),
        ("inspect", "layers_to_transform", "(default: every layer)"),
        ("generate", "model", "(default: the one the adapter records, else `smollm2-135m`)"),
        ("eval", "max_rows", "(default: every row)"),
        ("export", "base_gguf", "(default: the packaged model's file, or the `.gguf` the model was loaded from)"),
        ("serve", "max_model_len", "(default: the model's context length, `max_position_embeddings`"),
        ("train", "r", "(default: 8)"),  # a plain dataclass default
        ("train", "quantize", "(default: none)"),
        ("serve", "adapter", "(default: {})"),
    ],
)
def test_help_shows_the_effective_default(command, field, shown):
    assert shown in _flag_helps()[command, field]


def test_every_flag_states_one_default_in_one_form():
    """Exactly one `(default: ...)` per flag (none for a required one), and no other wording of a
    default: a docstring that says what a None resolves to says it in the form `--help` shows."""
    for (command, field), text in _flag_helps().items():
        where = f"lorakit {command} --{field.replace('_', '-')}: {text!r}"
        required = re.search(r"\brequired\.?$", text) is not None
        assert text.count("(default: ") == (0 if required else 1), where
        assert "default" not in re.sub(r"\(default: [^)]*\)", "", text), where
    helps = _flag_helps()
    for command, field in [("merge", "out"), ("export", "out"), ("analyze", "adapter"), ("compress", "out")]:
        assert "(default" not in helps[command, field] and helps[command, field].endswith("required.")


def test_flag_help_appends_the_dataclass_default_unless_the_docstring_states_one():
    assert flag_help("steps to run.", None) == "steps to run. (default: none)"
    assert flag_help("targets.", ["q_proj"]) == 'targets. (default: ["q_proj"])'
    assert flag_help("threads (default: torch's).", None) == "threads (default: torch's)."
    assert flag_help("the output directory; required.", None) == "the output directory; required."
