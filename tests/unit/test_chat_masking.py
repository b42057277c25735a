"""Which tokens of a conversation train, checked against masks written out by hand.

Every test renders a conversation with a real tokenizer (the packaged SmolLM2-135M-Instruct's, or a
copy of it with another chat template and, for Llama 3, its special tokens added), runs
`lorakit.data` on it, and compares the decoded trained spans with the strings written in the test.
The templates are short, faithful versions of the models' own.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import lorakit.data as data
import lorakit.models as models
from lorakit.data import Example, encode_conversations
from lorakit.errors import ConfigError, DataError

IM_END = "<|im_end|>"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5-Instruct's template without the tools preamble: a default system prompt when the
# conversation has none, tool calls as <tool_call> JSON, tool results inside a user turn.
QWEN = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# ChatML whose assistant text is marked with {% generation %}, and whose first line counts the
# messages: not prefix-stable (a longer conversation changes its first line), so only the marks
# can say which tokens are the assistant's.
COUNTED = (
    "{{ '<|im_start|>system\nA conversation of ' + messages|length|string + ' messages.<|im_end|>\n' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's way with reasoning: an earlier assistant message loses its <think> block once more follows.
DROPS_PAST_REASONING = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ message['content'].split('</think>')[-1] }}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TWO_TURNS = (
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
)


@pytest.fixture(scope="module")
def smol():
    """The packaged SmolLM2-135M-Instruct tokenizer: ChatML with a default system prompt."""
    return models.load_tokenizer("smollm2-135m")


def with_template(tokenizer, template: str, *special: str, bos: str | None = None):
    """A copy of `tokenizer` with another chat template (and those special tokens added)."""
    tok = copy.deepcopy(tokenizer)
    if special or bos:
        tok.add_special_tokens(
            {**({"bos_token": bos} if bos else {}), **({"additional_special_tokens": list(special)} if special else {})}
        )
    tok.chat_template = template
    return tok


def encode(tokenizer, messages, **options) -> tuple[list[int], list[int]]:
    ((ids, labels),) = encode_conversations([Example("", "", messages=tuple(messages))], tokenizer, **options)
    assert len(ids) == len(labels)
    assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))
    return ids, labels


def trained(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, run = [], []
    for token, label in zip([*ids, None], [*labels, -100], strict=True):
        if label != -100:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def untrained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])


# ----------------------------------------------------------------------------- templates


def test_smollm2_template_trains_every_assistant_turn_and_its_end_token(smol):
    ids, labels = encode(smol, TWO_TURNS)
    assert smol.decode(ids) == smol.apply_chat_template(list(TWO_TURNS), tokenize=False)
    assert trained(smol, ids, labels) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    # The default system prompt the template injects, the headers, the user turns and the newline
    # after each <|im_end|> stay untrained.
    assert untrained_text(smol, ids, labels) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_chatml_template_with_a_system_message(smol):
    tok = with_template(smol, CHATML)
    messages = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    ids, labels = encode(tok, messages)
    assert trained(tok, ids, labels) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    assert untrained_text(tok, ids, labels).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")


def test_llama3_template_trains_up_to_eot(smol):
    tok = with_template(smol, LLAMA3, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", bos="<|begin_of_text|>")
    messages = [*TWO_TURNS[:3], {"role": "assistant", "content": "  Paris.\n"}]  # the template trims content
    ids, labels = encode(tok, messages)
    assert trained(tok, ids, labels) == ["Hello!<|eot_id|>", "Paris.<|eot_id|>"]
    assert untrained_text(tok, ids, labels) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids, labels = encode(tok, messages, train_on_eos=False)
    assert trained(tok, ids, labels) == ["Hello!", "Paris."]


def test_qwen_template_injects_a_system_prompt_and_a_tool_turn_is_not_trained(smol):
    tok = with_template(smol, QWEN)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "18°C, sunny"},
        {"role": "assistant", "content": "It is 18°C and sunny in Paris."},
    ]
    ids, labels = encode(tok, messages)
    assert trained(tok, ids, labels) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18°C and sunny in Paris.<|im_end|>",
    ]
    assert untrained_text(tok, ids, labels) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_a_tool_turn_with_smollm2s_template(smol):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": 'get_weather(city="Paris")'},
        {"role": "tool", "content": "18°C, sunny"},
        {"role": "assistant", "content": "18°C and sunny."},
    ]
    ids, labels = encode(smol, messages)
    assert trained(smol, ids, labels) == ['get_weather(city="Paris")<|im_end|>', "18°C and sunny.<|im_end|>"]
    assert "<|im_start|>tool\n18°C, sunny<|im_end|>" in untrained_text(smol, ids, labels)


def test_a_conversation_ending_with_a_user_turn_does_not_train_it(smol):
    messages = [*TWO_TURNS[:2], {"role": "user", "content": "Thanks, bye."}]
    ids, labels = encode(smol, messages)
    assert trained(smol, ids, labels) == ["Hello!<|im_end|>"]
    assert untrained_text(smol, ids, labels).endswith("\n<|im_start|>user\nThanks, bye.<|im_end|>\n")
    assert labels[-5:] == [-100] * 5


def test_generation_blocks_give_the_mask_where_prefixes_cannot(smol):
    tok = with_template(smol, COUNTED)
    assert data.chat.has_generation_blocks(tok)
    ids, labels = encode(tok, TWO_TURNS)
    assert tok.decode(ids).startswith("<|im_start|>system\nA conversation of 4 messages.<|im_end|>")
    assert trained(tok, ids, labels) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    assert trained(tok, *encode(tok, TWO_TURNS, train_on="last")) == ["Paris.<|im_end|>"]
    assert trained(tok, *encode(tok, TWO_TURNS, train_on_eos=False)) == ["Hello!", "Paris."]
    # Without the marks, prefix rendering finds the first line changed and refuses to guess.
    unmarked = with_template(smol, COUNTED.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    with pytest.raises(DataError, match="not prefix-stable") as info:
        encode_conversations([Example("", "", messages=TWO_TURNS, origin="chat.jsonl, line 7")], unmarked)
    assert str(info.value).startswith("chat.jsonl, line 7: ")
    assert "'2 messages." in str(info.value)  # where the renderings part


def test_a_generation_block_that_stops_before_the_end_token_still_trains_it(smol):
    template = CHATML.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}"
        "{{ '<|im_end|>\n' }}",
    )
    tok = with_template(smol, template)
    assert trained(tok, *encode(tok, TWO_TURNS)) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    assert trained(tok, *encode(tok, TWO_TURNS, train_on_eos=False)) == ["Hello!", "Paris."]


def test_a_template_that_rewrites_past_turns_is_refused(smol):
    tok = with_template(smol, DROPS_PAST_REASONING)
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>Two and two.</think>4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>Three and three.</think>6"},
    ]
    with pytest.raises(DataError, match=r"not prefix-stable.*assistant message 2"):
        encode(tok, messages)
    # The last turn alone is prefix-stable: the conversation up to it renders as the whole one starts.
    assert trained(tok, *encode(tok, messages, train_on="last")) == ["<think>Three and three.</think>6<|im_end|>"]


def test_a_token_across_the_start_of_a_reply_is_refused(smol):
    # The generation prompt ends in letters the reply continues: BPE cuts "Replying" as "Rep" + "lying".
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
        "{% else %}{{ 'Reply' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Reply' }}{% endif %}"
    )
    tok = with_template(smol, template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ing now"}]
    assert tok.tokenize("Replying now")[:2] == ["Rep", "lying"]
    with pytest.raises(DataError, match="crosses the start of an assistant reply"):
        encode(tok, messages)


# ----------------------------------------------------------------------------- what trains


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ["Hello!<|im_end|>", "Paris.<|im_end|>"]),
        ({"train_on": "last"}, ["Paris.<|im_end|>"]),
        ({"train_on_eos": False}, ["Hello!", "Paris."]),
        ({"train_on": "last", "train_on_eos": False}, ["Paris."]),
    ],
    ids=["assistant", "last", "no-eos", "last-no-eos"],
)
def test_train_on_and_train_on_eos(smol, options, expected):
    assert trained(smol, *encode(smol, TWO_TURNS, **options)) == expected


def test_train_on_all_trains_every_token(smol):
    ids, labels = encode(smol, TWO_TURNS, train_on="all")
    assert labels == ids
    assert smol.decode(ids) == smol.apply_chat_template(list(TWO_TURNS), tokenize=False)


def test_an_unknown_train_on_is_a_config_error(smol):
    with pytest.raises(ConfigError, match="train_on must be one of assistant, last, all; got 'everything'"):
        encode(smol, TWO_TURNS, train_on="everything")
    with pytest.raises(ConfigError, match="train_on"):
        data.tokenize_examples([Example("", "x")], smol, 16, train_on="everything")


def test_trl_conversational_prompt_completion_trains_only_the_completion(tmp_path, smol):
    record = {
        "prompt": [
            {"role": "user", "content": "Say A."},
            {"role": "assistant", "content": "A."},  # a few-shot turn: context, not trained
            {"role": "user", "content": "Say B."},
        ],
        "completion": [{"role": "assistant", "content": "B."}],
    }
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (example,) = data.load_examples(path, tokenizer=smol)
    assert example.prompt_messages == 3 and len(example.messages) == 4
    ((ids, labels),) = encode_conversations([example], smol)
    assert trained(smol, ids, labels) == ["B.<|im_end|>"]
    ((ids, labels),) = encode_conversations([example], smol, train_on="all")
    assert labels == ids


# ----------------------------------------------------------------------------- tokenize_examples


def test_tokenize_examples_masks_conversations_and_plain_rows_together(tmp_path, smol):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"messages": list(TWO_TURNS)},
        {"prompt": "Q: 2+2?", "completion": " 4"},
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = data.load_examples(path, tokenizer=smol)
    dataset = data.tokenize_examples(examples, smol, 256)
    assert len(dataset) == 3 and dataset.dropped == dataset.truncated == 0
    assert trained(smol, dataset.input_ids[0], dataset.labels[0]) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    assert trained(smol, dataset.input_ids[1], dataset.labels[1]) == [" 4<|im_end|>"]  # EOS is <|im_end|>
    assert trained(smol, dataset.input_ids[2], dataset.labels[2]) == ["4<|im_end|>"]
    assert "<|im_start|>user\nAdd.\n\n2 and 2<|im_end|>" in smol.decode(dataset.input_ids[2])
    plain_all = data.tokenize_examples(examples[1:2], smol, 256, train_on="all")
    assert plain_all.labels[0] == plain_all.input_ids[0]
    no_eos = data.tokenize_examples(examples[1:2], smol, 256, train_on_eos=False)
    assert trained(smol, no_eos.input_ids[0], no_eos.labels[0]) == [" 4"]
    assert no_eos.input_ids[0][-1] == smol.eos_token_id  # still in the row, only not trained


def test_truncation_keeps_the_start_or_the_end_and_drops_untrained_rows(smol):
    long_reply = {"role": "assistant", "content": " ".join(["word"] * 40)}
    early = Example("", "", messages=(TWO_TURNS[0], long_reply, TWO_TURNS[2], TWO_TURNS[3]))
    late = Example("", "", messages=(*TWO_TURNS[:3], long_reply))
    early_ids, early_labels = encode(smol, early.messages)
    late_ids, _ = encode(smol, late.messages)
    reply_end = max(i for i, label in enumerate(early_labels) if label != -100 and i < len(early_ids) - 10) + 1
    seq_len = reply_end + 1  # the long reply and its <|im_end|> fit, "Paris." does not
    assert len(early_ids) > seq_len and len(late_ids) > seq_len
    with pytest.warns(UserWarning, match="cut at the end"):
        right = data.tokenize_examples([early, late], smol, seq_len)
    assert right.truncated == 2 and len(right) == 2
    assert all(len(ids) == seq_len for ids in right.input_ids)
    assert trained(smol, right.input_ids[0], right.labels[0]) == [long_reply["content"] + IM_END]
    assert right.input_ids[1] == late_ids[:seq_len]
    with pytest.warns(UserWarning, match="cut at the start"):
        left = data.tokenize_examples([early, late], smol, seq_len, truncate="left")
    assert left.input_ids[1] == late_ids[-seq_len:]
    assert trained(smol, left.input_ids[1], left.labels[1])[-1] == long_reply["content"] + IM_END
    assert trained(smol, left.input_ids[0], left.labels[0])[-1] == "Paris." + IM_END
    # Kept short enough, the start holds no reply: the row is dropped and counted, never trained on.
    header = next(i for i, label in enumerate(early_labels) if label != -100)  # the tokens before the first reply
    with pytest.warns(UserWarning, match="1 kept no trained token"):
        cut = data.tokenize_examples([early, Example("Q:", " A")], smol, header)
    assert len(cut) == 1 and cut.drops == {"truncated": 1} and cut.examples == 2
    with pytest.raises(ConfigError, match="truncate must be"):
        data.tokenize_examples([early], smol, seq_len, truncate="middle")


def test_nothing_to_train_names_the_source_and_why(smol):
    empty = Example("", "", messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}))
    with pytest.raises(DataError) as info:
        data.tokenize_examples([empty, empty], smol, 64, train_on_eos=False, source="chat.jsonl")
    assert str(info.value) == (
        "chat.jsonl: no example is left to train on: all 2 examples had no token to train (an empty completion "
        "or reply)"
    )


def test_stats_count_what_tokenize_kept(smol):
    examples = [Example("", "", messages=TWO_TURNS), Example("Q:", " A")]
    dataset = data.tokenize_examples(examples, smol, 256)
    stats = data.data_stats(dataset)
    assert (stats.examples, stats.rows, stats.dropped, stats.truncated) == (2, 2, 0, 0)
    assert stats.tokens == sum(len(ids) for ids in dataset.input_ids)
    # Two trained runs in the conversation, one in the prompt/completion row.
    assert [len(trained(smol, i, lab)) for i, lab in zip(dataset.input_ids, dataset.labels, strict=True)] == [2, 1]
    assert stats.trained == sum(1 for labels in dataset.labels for label in labels if label != -100)
    lines = data.stats_lines(dataset)
    assert lines[0] == (
        f"data: 2 examples -> 2 rows; {stats.tokens:,} tokens, {stats.trained} trained "
        f"({100 * stats.trained / stats.tokens:.1f}%)"
    )
    assert lines[1] == "  row lengths (tokens):"
    counts = [int(line.split()[-2].replace(",", "")) for line in lines[2:]]
    assert sum(counts) == 2


def test_alpaca_file_renders_as_chat(smol, tmp_path):
    source = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca" / "alpaca_5000.json"
    records = json.loads(source.read_text(encoding="utf-8"))[:200]
    path = tmp_path / "alpaca200.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    examples = data.load_examples(path, tokenizer=smol)
    dataset = data.tokenize_examples(examples, smol, 512)
    assert len(dataset) == 200
    for record, ids, labels in zip(records, dataset.input_ids, dataset.labels, strict=True):
        assert trained(smol, ids, labels) == [record["output"] + IM_END]
        user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
        assert f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n" in smol.decode(ids)
