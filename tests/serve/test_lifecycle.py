"""`lorakit serve` killed and stopped (issue 28), one story on real processes: SIGKILL mid-stream
leaves the client a closed connection (an error, not a hang) and every file under `--adapter-dir`
as it was; a restarted server serves again; SIGTERM then refuses new connections at once, lets a
running stream finish, cancels the one that outlives `--shutdown-timeout` (an error event, then
the stream's end), and exits 0."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.serve.conftest import API_KEY, MAX_TOKENS, PROMPTS, client, post, start_server

pytestmark = pytest.mark.integration  # real `lorakit serve` processes, killed

GRACE = 6  # --shutdown-timeout, seconds


def files_under(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under `root`: (sha256, mode, mtime in ns) by relative path."""
    state = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        state[str(path.relative_to(root))] = (digest, info.st_mode, info.st_mtime_ns)
    return state


def open_stream(server, model: str, prompt: str, max_tokens: int) -> http.client.HTTPResponse:
    """A streaming completion whose first event has arrived (so it holds a batch row)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    stream = urllib.request.urlopen(request, timeout=60)
    assert stream.readline().startswith(b"data: ")
    return stream


def read_to_end(stream: http.client.HTTPResponse) -> list[str]:
    """The stream's remaining server-sent events; raises if the connection closes before its end."""
    return [e for e in stream.read().decode().split("\n\n") if e]


def refused(server) -> bool:
    host, port = server.url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigkill_mid_stream_then_a_restart_then_sigterm_drains_and_exits_0(adapter_dir, reference, tmp_path):
    before = files_under(adapter_dir)
    args = [f"--adapter=qv={adapter_dir / 'qv'}", "--adapter-dir", str(adapter_dir), "--api-key-env", "LK_KEY"]
    args += ["--shutdown-timeout", str(GRACE)]
    env = {"LK_KEY": API_KEY}

    killed = start_server(args, tmp_path / "killed.log", env=env)
    try:
        assert post(killed, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": "mlp"})[0] == 200
        stream = open_stream(killed, "hot", PROMPTS[0], 4000)
    finally:
        killed.process.kill()
    assert killed.process.wait(30) == -signal.SIGKILL
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):  # a socket timeout would fail the test
        read_to_end(stream)
    assert files_under(adapter_dir) == before

    server = start_server(args, tmp_path / "restarted.log", env=env)
    try:
        served = client(server).completions.create(model="qv", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
        assert served.choices[0].text.strip() == reference["qv", PROMPTS[1]]

        short = open_stream(server, "qv", PROMPTS[1], 6)  # finishes within the grace period
        long = open_stream(server, "qv", PROMPTS[0], 4000)  # outlives it
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        deadline = sent + GRACE / 2
        while not refused(server):  # new connections are refused while the process still runs
            assert time.monotonic() < deadline, "new connections still accepted after SIGTERM"
            time.sleep(0.05)
        assert server.process.poll() is None

        events = read_to_end(short)
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 6
        cut = read_to_end(long)  # cancelled when the grace period ran out: told so, then the end
        assert cut[-1] == "data: [DONE]"
        assert json.loads(cut[-2][6:])["error"]["code"] == "server_stopping", cut[-2]
        assert server.process.wait(GRACE + 30) == 0
        took = time.monotonic() - sent
        assert GRACE - 1 < took < GRACE + 30, took  # waited for the long stream, then no longer
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log.read_text()
    assert "Traceback" not in log and "Traceback" not in killed.log.read_text(), log
    assert files_under(adapter_dir) == before
