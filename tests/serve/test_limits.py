"""Request limits of a real `lorakit serve` process (issue 28), over raw sockets where the `openai`
client cannot misbehave enough: a body over `--max-request-bytes` is refused with 413 before it is
read, a prompt over `--max-model-len` or a `max_tokens` that does not fit is a 400 naming the
lengths, clients that stop sending mid-body hold no batch row, and an adapter folder caught while
it is being written is a 400 that says so while the server keeps serving."""

from __future__ import annotations

import http.client
import json
import select
import shutil
import socket
import threading
import time
from pathlib import Path

import openai
import pytest

from lorakit.data import encode_prompt
from lorakit.models import load_tokenizer
from tests.serve.conftest import API_KEY, MAX_TOKENS, PROMPTS, client, post

pytestmark = pytest.mark.integration  # a real `lorakit serve` process

LIMIT = 8 * 1024 * 1024  # --max-request-bytes' default


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def head(path: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: lorakit", "Content-Type: application/json"]
    lines += [f"Authorization: Bearer {API_KEY}", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response(sock: socket.socket) -> tuple[int, dict, dict]:
    """The HTTP response waiting on `sock`: (status, JSON body, lower-cased headers)."""
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    return reply.status, json.loads(reply.read()), {k.lower(): v for k, v in reply.getheaders()}


def closed(sock: socket.socket) -> bool:
    """The server closed the connection (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_declared_length_over_the_limit_is_refused_before_any_body_is_sent(server):
    with connect(server) as sock:
        sock.sendall(head("/v1/completions", content_length=str(100 * LIMIT)))  # and no body, ever
        status, body, headers = response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert body["error"]["type"] == "invalid_request_error"
        assert f"{LIMIT} bytes, --max-request-bytes" in body["error"]["message"]
        assert closed(sock)
    text = server.get("/metrics")[1]
    assert 'lorakit_requests_total{endpoint="/v1/completions",status="413"}' in text


def test_a_chunked_body_is_refused_once_it_passes_the_limit_and_one_under_it_is_served(server):
    piece = b" " * 65536
    frame = b"%x\r\n" % len(piece) + piece + b"\r\n"
    with connect(server) as sock:
        sock.sendall(head("/v1/completions", transfer_encoding="chunked"))
        sent = 0
        # Send up to 2 MiB past the limit, never the last chunk: the answer must come anyway.
        while sent <= LIMIT + 2 * 1024 * 1024 and not select.select([sock], [], [], 0)[0]:
            sock.sendall(frame)
            sent += len(piece)
        assert select.select([sock], [], [], 60)[0], "no answer to a body past the limit"
        status, body, headers = response(sock)
        assert status == 413 and headers["connection"] == "close", body
        assert f"{LIMIT} bytes" in body["error"]["message"]
        assert sent > LIMIT  # refused only once the limit was passed
    # The same kind of request just under the limit (padded with spaces, valid JSON) is served.
    request = json.dumps({"model": "qv", "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}).encode()
    padded = request[:-1] + b" " * (LIMIT - len(request) - 1) + b"}"
    assert len(padded) == LIMIT - 1
    status, reply, _ = post(server, "/v1/completions", padded)
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1, reply


def test_prompts_over_max_model_len_and_max_tokens_that_do_not_fit_are_400s_naming_the_lengths(server):
    c = client(server)
    context = c.models.list().data[0].max_model_len  # the model's max_position_embeddings by default
    tokenizer = load_tokenizer()
    long_text = "one two three four " * (context // 4 + 8)
    tokens = len(encode_prompt(tokenizer, long_text))
    assert tokens > context
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="qv", prompt=long_text, max_tokens=1)
    message = err.value.message
    assert f"the prompt has {tokens} tokens" in message and f"context is {context} tokens" in message
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="qv", messages=[{"role": "user", "content": long_text}], max_tokens=1)
    assert f"context is {context} tokens" in err.value.message and err.value.body["param"] == "messages"

    prompt = len(encode_prompt(tokenizer, PROMPTS[0]))
    too_many = context - prompt + 1
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="qv", prompt=PROMPTS[0], max_tokens=too_many)
    message = err.value.message
    assert f"max_tokens {too_many}" in message and f"prompt's {prompt} tokens" in message and str(context) in message
    assert err.value.body["param"] == "max_tokens"


def test_clients_that_stop_sending_mid_body_hold_no_batch_row(server, reference):
    body = json.dumps({"model": "qv", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    half = len(body) // 2
    stalled = [connect(server) for _ in range(7)]  # more than the server's --max-batch 6
    try:
        for sock in stalled:
            sock.sendall(head("/v1/completions", content_length=str(len(body))) + body[:half])
        # Sent after them, a request is served at once: none of the stalled ones holds a row.
        reply = client(server).completions.create(model="mlp", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].text.strip() == reference["mlp", PROMPTS[1]]
        # The stalled clients were only waiting in the HTTP layer: their requests run once sent.
        for sock in stalled:
            sock.sendall(body[half:])
        for sock in stalled:
            status, payload, _ = response(sock)
            assert status == 200 and payload["choices"][0]["text"].strip() == reference["qv", PROMPTS[1]]
    finally:
        for sock in stalled:
            sock.close()


def _load(server, name: str, path: str) -> tuple[int, dict]:
    status, body, _ = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
    return status, body


def _rewrite_in_place(path: Path, content: bytes, stop: threading.Event) -> None:
    """Write `content` into `path` again and again, in place: cut to nothing, half written for a
    moment, then whole for a few milliseconds (so a reader also finds it whole, then cut short)."""
    half = len(content) // 2
    while not stop.is_set():
        with path.open("r+b") as f:
            f.truncate(0)
            f.write(content[:half])
            f.flush()
            time.sleep(0.001)
            f.write(content[half:])
        time.sleep(0.003)


def test_an_adapter_folder_caught_mid_write_is_a_400_and_the_server_keeps_serving(server, adapter_dir, reference):
    source = adapter_dir / "qv"
    weights = (source / "adapter_model.safetensors").read_bytes()
    config = (source / "adapter_config.json").read_bytes()
    no_weights_yet = adapter_dir / "wip-no-weights"
    no_weights_yet.mkdir()
    (no_weights_yet / "adapter_config.json").write_bytes(config)
    half_weights = adapter_dir / "wip-half-weights"
    shutil.copytree(source, half_weights)
    (half_weights / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    half_config = adapter_dir / "wip-half-config"
    shutil.copytree(source, half_config)
    (half_config / "adapter_config.json").write_bytes(config[: len(config) // 2])
    for folder in (no_weights_yet, half_weights, half_config):
        status, body = _load(server, "wip", folder.name)
        assert status == 400, (folder.name, body)
        assert "incomplete" in body["error"]["message"] and body["error"]["param"] == "lora_path", body

    # A folder rewritten in place while the server reads it: each load is refused or complete.
    busy = adapter_dir / "wip-rewritten"
    shutil.copytree(source, busy)
    stop = threading.Event()
    writer = threading.Thread(target=_rewrite_in_place, args=(busy / "adapter_model.safetensors", weights, stop))
    writer.start()
    statuses = []
    try:
        for _ in range(30):
            status, body = _load(server, "wip", busy.name)
            statuses.append(status)
            assert status in (200, 400), body
            if status == 200:
                assert post(server, "/v1/unload_lora_adapter", {"lora_name": "wip"})[0] == 200
            else:
                message = body["error"]["message"]
                assert "incomplete or corrupt" in message or "changed while it was read" in message, message
    finally:
        stop.set()
        writer.join(30)
    assert 400 in statuses, statuses  # the writer was caught mid-write at least once
    assert server.alive()
    # Once written, the folder loads and serves the adapter's own output; the others still answer.
    assert _load(server, "wip", busy.name)[0] == 200
    c = client(server)
    done = c.completions.create(model="wip", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text.strip() == reference["qv", PROMPTS[1]]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "wip"})[0] == 200
    kept = c.completions.create(model="mlp", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    assert kept.choices[0].text.strip() == reference["mlp", PROMPTS[1]]
    assert "Traceback" not in server.log.read_text()
