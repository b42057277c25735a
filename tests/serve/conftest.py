"""Real `lorakit serve` processes on the packaged SmolLM2-135M, three adapters on disk, and the
reference outputs `lorakit generate` gives for them (one real CLI run, the rest through the same
library call it makes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch

import lorakit
from lorakit.generate import Decoding, generate
from lorakit.models import ModelSource, load_model, load_source

LORAKIT = Path(sys.executable).with_name("lorakit")
ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
ENV.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
API_KEY = "test-key-0123"
PROMPTS = ["The capital of France is", "name : The Eagle | Type : coffee shop | food : French | area : riverside ||"]
MAX_TOKENS = 12
# name -> (targets, rank, DoRA): different layers and ranks, one DoRA adapter among them
ADAPTERS = {
    "qv": (["q_proj", "v_proj"], 8, False),
    "mlp": (["o_proj", "down_proj", "up_proj"], 4, False),
    "dora": (["q_proj", "k_proj", "v_proj"], 8, True),
}


def make_adapter(directory: Path, targets: list[str], r: int, use_dora: bool, seed: int) -> Path:
    """An adapter of the packaged model with random non-zero B (B = 0 would be the base model)."""
    model, _, _ = load_model(None)
    torch.manual_seed(seed)  # A's initialisation
    # lora_dropout 0.05, as the adapters `lorakit train` makes: a server must run no dropout (issue 24).
    cfg = lorakit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets, use_dora=use_dora)
    lorakit.inject(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return lorakit.save_adapter(model, directory)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, (targets, r, dora)) in enumerate(ADAPTERS.items()):
        make_adapter(root / name, targets, r, dora, seed)
    return root


@pytest.fixture(scope="session")
def reference(adapter_dir) -> dict[tuple[str | None, str], str]:
    """(adapter or None, prompt) -> the greedy completion `lorakit generate` gives."""
    out = {}
    for name in [None, *ADAPTERS]:
        source = ModelSource(adapter=str(adapter_dir / name) if name else None)
        model, tokenizer, _ = load_source(source)
        for prompt in PROMPTS:
            (out[name, prompt],) = generate(model, tokenizer, [prompt], Decoding(max_new_tokens=MAX_TOKENS))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def alive(self) -> bool:
        return self.process.poll() is None and self.get("/health")[0] == 200


def client(server: Server, key: str = API_KEY) -> openai.OpenAI:
    """The `openai` client of `server` (no retries)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def post(server: Server, path: str, body: dict | list | bytes, key: str | None = API_KEY) -> tuple[int, dict, dict]:
    """A raw POST (status, JSON body, headers), for what the openai client does not send."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def start_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    handle = log.open("w")
    process = subprocess.Popen(
        [str(LORAKIT), "serve", "--port", str(port), "--log-level", "warning", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**ENV, **(env or {})},
    )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lorakit serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if server.get("/health")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"lorakit serve did not come up in 120 s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def server(adapter_dir, tmp_path_factory) -> Iterator[Server]:
    """The server under test: three adapters, loading from `adapter_dir`, an API key."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = [f"--adapter={n}={adapter_dir / n}" for n in ADAPTERS]
    args += ["--adapter-dir", str(adapter_dir), "--max-batch", "6", "--max-adapters", "4", "--api-key-env", "LK_KEY"]
    s = start_server(args, log, env={"LK_KEY": API_KEY})
    yield s
    stop_server(s)
    assert "Traceback" not in log.read_text(), log.read_text()
