"""`lorakit serve` run for real and called with the `openai` client: every endpoint, streaming and
not, greedy outputs token-identical to `lorakit generate` for three adapters and the base while
requests for all of them share batches, hot load/unload under traffic, and each error status."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lorakit.models import load_tokenizer
from tests.serve.conftest import (
    ADAPTERS,
    API_KEY,
    ENV,
    LORAKIT,
    MAX_TOKENS,
    PROMPTS,
    client,
    post,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.integration  # a real `lorakit serve` process

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def metric(server, name: str) -> float:
    text = server.get("/metrics")[1]
    values = [float(v) for v in re.findall(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, flags=re.M)]
    assert values, f"{name} not in /metrics"
    return values[0]


def test_models_lists_the_base_and_each_adapter_with_its_parent(server, adapter_dir):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {BASE, *ADAPTERS}
    assert models[BASE].parent is None
    for name in ADAPTERS:
        assert models[name].parent == BASE
        assert models[name].root == str(adapter_dir / name)


def test_greedy_outputs_equal_lorakit_generate_while_sharing_batches(server, reference, adapter_dir):
    # One real `lorakit generate` run pins the library reference to the command.
    cli = subprocess.run(
        [
            str(LORAKIT),
            "generate",
            "--adapter",
            str(adapter_dir / "dora"),
            "--prompt",
            PROMPTS[1],
            "--max-new-tokens",
            str(MAX_TOKENS),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == reference["dora", PROMPTS[1]]

    c = client(server)
    jobs = [(name, prompt, stream) for name in [None, *ADAPTERS] for prompt in PROMPTS for stream in (False, True)]

    def run(job):
        name, prompt, stream = job
        kwargs = dict(model=name or BASE, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        if not stream:
            r = c.completions.create(**kwargs)
            return r.choices[0].text, r.choices[0].finish_reason, r.usage
        chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return text, [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1], chunks[-1].usage

    with ThreadPoolExecutor(len(jobs)) as pool:  # 16 requests, 4 models, at once: they share batches
        results = list(pool.map(run, jobs))
    for (name, prompt, stream), (text, finish, usage) in zip(jobs, results, strict=True):
        assert text.strip() == reference[name, prompt], (name, prompt, stream)
        assert finish in ("stop", "length")
        assert (
            usage.completion_tokens <= MAX_TOKENS
            and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        )
    for name in ADAPTERS:  # each adapter changes the text: the rows did not all run the base
        assert any(reference[name, p] != reference[None, p] for p in PROMPTS), name
    assert metric(server, "lorakit_generation_tokens_total") > 0


def test_chat_renders_the_chat_template(server):
    tokenizer = load_tokenizer()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    c = client(server)
    chat = c.chat.completions.create(model="qv", messages=messages, max_tokens=10, temperature=0)
    raw = c.completions.create(model="qv", prompt=ids, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == raw.choices[0].text
    assert chat.usage.prompt_tokens == len(ids) == raw.usage.prompt_tokens

    chunks = list(c.chat.completions.create(model="qv", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stream_is_server_sent_events_ending_in_done(server):
    request = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(
            {"model": "mlp", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True}
        ).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_seed_and_several_prompts(server):
    c = client(server)
    full = c.completions.create(model="qv", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0).choices[0].text
    word = full.split()[2]
    cut = c.completions.create(
        model="qv", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=[word, "\u2603"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(word)]

    def sample():
        return c.completions.create(model="dora", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, top_p=0.9, seed=7)

    with ThreadPoolExecutor(4) as pool:  # the same seed gives the same text whatever shares the batch
        texts = {f.choices[0].text for f in pool.map(lambda _: sample(), range(4))}
    assert len(texts) == 1

    both = c.completions.create(model=BASE, prompt=PROMPTS, max_tokens=4, temperature=0)
    assert [ch.index for ch in both.choices] == [0, 1]
    singles = [c.completions.create(model=BASE, prompt=p, max_tokens=4, temperature=0).choices[0].text for p in PROMPTS]
    assert [ch.text for ch in both.choices] == singles


def test_load_and_unload_under_traffic(server, adapter_dir, reference):
    c = client(server)
    shutil.copytree(adapter_dir / "qv", adapter_dir / "qv-copy")
    status, body, _ = post(server, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": "qv-copy"})
    assert status == 200, body
    assert "hot" in {m.id for m in c.models.list().data}

    # Requests on `hot` are running when its unload is asked: they finish on it, nothing is lost.
    results: list = []
    started = threading.Event()

    def long_stream():
        pieces = []
        for chunk in c.completions.create(
            model="hot", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            started.set()
            pieces.append(chunk.choices[0].text)
        results.append("".join(pieces))

    threads = [threading.Thread(target=long_stream) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(120)
    unloading = threading.Thread(
        target=lambda: results.append(post(server, "/v1/unload_lora_adapter", {"lora_name": "hot"}))
    )
    unloading.start()
    deadline = time.monotonic() + 60
    while "hot" in {m.id for m in c.models.list().data}:  # until the server has taken the unload
        assert time.monotonic() < deadline, "the unload request was not taken in 60 s"
        time.sleep(0.02)
    served = []
    while unloading.is_alive():  # meanwhile, new requests for it are refused with a clear 404
        try:
            served.append(c.completions.create(model="hot", prompt="x", max_tokens=1).choices[0].text)
        except openai.NotFoundError as err:
            assert "hot" in err.message and ("unloaded" in err.message or "does not exist" in err.message)
        time.sleep(0.05)
    assert served == [], "a new request ran on an adapter being unloaded"
    for t in [*threads, unloading]:
        t.join(120)
    texts = [r for r in results if isinstance(r, str)]
    assert len(texts) == 3 and all(t.strip() == reference["qv", PROMPTS[1]] for t in texts)
    (unload,) = [r for r in results if isinstance(r, tuple)]
    assert unload[0] == 200, unload
    assert "hot" not in {m.id for m in c.models.list().data}
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="hot", prompt="x", max_tokens=1)
    # the name is free again, and the reloaded adapter gives the same output
    assert (
        post(server, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(adapter_dir / "qv-copy")})[0] == 200
    )
    again = c.completions.create(model="hot", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    assert again.choices[0].text.strip() == reference["qv", PROMPTS[1]]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "hot"})[0] == 200


def test_load_refuses_paths_outside_the_folder_pickles_and_too_many(server, adapter_dir, reference, tmp_path):
    before = {m.id for m in client(server).models.list().data}
    outside = tmp_path / "outside"
    shutil.copytree(adapter_dir / "qv", outside)
    (adapter_dir / "escape").symlink_to(outside)
    pickled = adapter_dir / "pickled"
    pickled.mkdir()
    shutil.copy(adapter_dir / "qv" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    corrupt = adapter_dir / "corrupt"
    shutil.copytree(adapter_dir / "qv", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage")
    cases = {
        "../outside": "outside the adapter folder",
        str(outside): "outside the adapter folder",
        "escape": "outside the adapter folder",
        "missing": "no PEFT adapter",
        "pickled": "pickle",
        "corrupt": "adapter_model.safetensors",
    }
    for path, message in cases.items():
        status, body, _ = post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
        assert status == 400, (path, body)
        assert message in body["error"]["message"], (path, body)
    status, body, _ = post(server, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": "mlp"})
    assert status == 400 and "already loaded" in body["error"]["message"]
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "fourth", "lora_path": "mlp"})[0] == 200
    status, body, _ = post(server, "/v1/load_lora_adapter", {"lora_name": "fifth", "lora_path": "mlp"})
    assert status == 400 and "--max-adapters 4" in body["error"]["message"]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "fourth"})[0] == 200
    status, body, _ = post(server, "/v1/unload_lora_adapter", {"lora_name": "fourth"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert {m.id for m in client(server).models.list().data} == before
    # the adapters that were there still answer, as before
    kept = client(server).completions.create(model="mlp", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    assert kept.choices[0].text.strip() == reference["mlp", PROMPTS[1]]


def test_error_statuses_are_openai_error_json(server):
    status, body, _ = post(server, "/v1/completions", {"model": "qv", "prompt": "x"}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client(server).completions.create(model="nope", prompt="x", max_tokens=2)
    assert "nope" in err.value.message and "qv" in err.value.message  # names what is served
    bad_bodies = [
        ({"model": "qv", "prompt": "x", "n": 2}, "n"),
        ({"model": "qv", "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": "qv"}, "prompt"),
        ({"model": "qv", "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
        ({"model": "qv", "prompt": [10**9]}, "prompt"),
        ({"model": "qv", "prompt": ""}, "prompt"),
        ({"model": "qv", "messages": []}, "messages"),
    ]
    for body, param in bad_bodies:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, reply, _ = post(server, path, body)
        assert status == 400, (body, reply)
        assert reply["error"]["type"] == "invalid_request_error" and param in reply["error"]["message"], reply
    status, reply, _ = post(server, "/v1/completions", b"{not json")
    assert status == 400 and "error" in reply
    assert server.get("/v1/nowhere")[0] in (401, 404)
    assert "Traceback" not in server.log.read_text()


def test_a_body_that_is_not_json_names_its_position_in_the_message_not_as_param(server):
    """Issue 24: a malformed body answered `"param": "50"`, the error position taken for a field."""
    body = b'{"model": "qv", "prompt": "The capital of France is", "max_tokens": 4,}'
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads(body)
    status, reply, _ = post(server, "/v1/completions", body)
    assert status == 400
    assert reply == {
        "error": {
            "message": f"invalid JSON at position {err.value.pos}: {err.value.msg}",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    # The other validation errors: a list index is part of the path in the message, never the
    # param; a body that is not an object concerns no field.
    status, reply, _ = post(server, "/v1/chat/completions", {"model": "qv", "messages": [{"role": "robot"}]})
    assert status == 400 and reply["error"]["param"] == "messages", reply
    assert reply["error"]["message"].startswith("invalid request: messages[0].role: "), reply
    status, reply, _ = post(server, "/v1/completions", [1, 2])
    assert status == 400 and reply["error"]["param"] is None, reply
    assert reply["error"]["message"].startswith("invalid request: body: "), reply


def test_a_client_that_goes_away_frees_its_row(server):
    request = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(
            {
                "model": "qv",
                "prompt": PROMPTS[0],
                "max_tokens": 2000,
                "temperature": 0,
                "stream": True,
                "stop": ["\u2603"],
            }
        ).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    cancelled = 'lorakit_generations_total{finish_reason="cancelled"}'

    def count() -> float:
        return metric(server, cancelled) if cancelled in server.get("/metrics")[1] else 0

    before = count()
    with urllib.request.urlopen(request, timeout=60) as r:
        r.readline()  # the first event arrived: the request is in the batch
    # The gauges are refreshed after each engine turn: wait for the cancellation to be counted.
    deadline = time.time() + 60
    while time.time() < deadline and count() == before:
        time.sleep(0.2)
    assert metric(server, cancelled) == before + 1
    while time.time() < deadline and metric(server, "lorakit_batch_rows") > 0:
        time.sleep(0.2)
    assert metric(server, "lorakit_batch_rows") == 0


def test_health_and_metrics(server):
    assert server.get("/health") == (200, '{"status":"ok"}')
    text = server.get("/metrics")[1]
    for name in (
        "lorakit_requests_total",
        "lorakit_queue_depth",
        "lorakit_batch_occupancy",
        "lorakit_request_latency_seconds_bucket",
        "lorakit_time_to_first_token_seconds_bucket",
        "lorakit_decode_step_seconds_bucket",
        "lorakit_adapters_loaded",
    ):
        assert name in text
    assert metric(server, "lorakit_adapters_loaded") == len(ADAPTERS)
    assert metric(server, "lorakit_request_latency_seconds_count") > 0


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    server = start_server(["--max-batch", "1", "--max-queue", "1", "--max-model-len", "256"], tmp_path / "small.log")
    try:
        body = {"model": BASE, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stop": ["\u2603"]}
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: post(server, "/v1/completions", body, key=None), range(6)))
        statuses = sorted(r[0] for r in replies)
        assert 200 in statuses and 429 in statuses, statuses  # the admitted ones finish, the rest are told to retry
        busy = next(r for r in replies if r[0] == 429)
        assert busy[2]["retry-after"] == "1" and busy[1]["error"]["code"] == "rate_limit_exceeded"
        assert server.alive()
    finally:
        stop_server(server)
