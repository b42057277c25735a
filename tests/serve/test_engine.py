"""The engine in-process: the KV batch's splicing, text streaming with stop strings and split
characters, sampling, and continuous batching against `generate` on tiny and packaged models."""

from __future__ import annotations

import threading

import pytest
import torch

import lorakit
from lorakit.data import encode_prompt
from lorakit.generate import Decoding, generate
from lorakit.layers import BASE
from lorakit.models import load_model, load_tokenizer
from lorakit.serve.batch import KVBatch
from lorakit.serve.engine import Engine, Event, Job
from lorakit.serve.errors import Overloaded, Unavailable
from lorakit.serve.text import SamplingParams, TextStream, make_generator, next_token
from tests.serve.conftest import PROMPTS, make_adapter


def test_kv_batch_pads_joins_and_trims():
    batch = KVBatch()
    a = [(torch.full((1, 2, 3, 4), 1.0), torch.full((1, 2, 3, 4), -1.0))]
    b = [(torch.full((1, 2, 5, 4), 2.0), torch.full((1, 2, 5, 4), -2.0))]
    batch.join(a)
    batch.join(b)
    assert batch.layers[0][0].shape == (2, 2, 5, 4)
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert (batch.layers[0][0][0, :, :2] == 0).all() and (batch.layers[0][0][0, :, 2:] == 1).all()
    batch.keep([0])  # the long row leaves: the two columns only it used go too
    assert batch.mask.tolist() == [[1, 1, 1]]
    assert torch.equal(batch.layers[0][1], a[0][1])
    batch.keep([])
    assert batch.rows == 0


def test_text_stream_holds_back_stop_prefixes_and_split_characters():
    tok = load_tokenizer()
    ids = tok("Hello world, the end. More", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=("end.",))
    pieces = [stream.add(i) for i in ids]
    assert stream.stopped
    assert "".join(pieces) == "Hello world, the "
    assert not any("end" in p for p in pieces)
    snow = tok("☃☃", add_special_tokens=False)["input_ids"]  # byte-level BPE splits the character
    stream = TextStream(tok)
    pieces = [stream.add(i) for i in snow]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + stream.flush() == "☃☃"


def test_sampling_follows_temperature_top_p_and_the_seed():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    greedy = SamplingParams(temperature=0)
    assert next_token(logits, greedy, make_generator(0, torch.device("cpu"))) == 1
    assert next_token(logits, SamplingParams(temperature=1e-30), make_generator(0, torch.device("cpu"))) == 1
    narrow = SamplingParams(temperature=1.0, top_p=1e-300)  # only the top token survives
    assert {next_token(logits, narrow, make_generator(s, torch.device("cpu"))) for s in range(20)} == {1}
    nucleus = SamplingParams(temperature=1.0, top_p=0.6)  # tokens 1 and 3 hold the first 60%
    assert {next_token(logits, nucleus, make_generator(s, torch.device("cpu"))) for s in range(40)} == {1, 3}
    draws = [
        next_token(logits, SamplingParams(temperature=2.0), make_generator(7, torch.device("cpu"))) for _ in range(3)
    ]
    assert len(set(draws)) == 1  # the same seed, the same draw


def run_jobs(engine: Engine, jobs: list[tuple[list[int], str, SamplingParams]]) -> list[list[Event]]:
    events: list[list[Event]] = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            events[i].append(event)
            if event.finish_reason:
                done.release()

        return emit

    for i, (ids, adapter, params) in enumerate(jobs):
        engine.submit(Job(ids, adapter, params, emitter(i)))
    for _ in jobs:
        assert done.acquire(timeout=300)
    return events


@pytest.mark.parametrize("batching", ["mixed", "per_adapter"])
@pytest.mark.integration  # the serving engine end to end: the packaged model, loaded for each adapter, decoding
def test_continuous_batching_equals_generate_for_each_adapter(tmp_path, batching):
    names = {"qv": (["q_proj", "v_proj"], 8, False), "dora": (["k_proj", "down_proj"], 4, True)}
    for seed, (name, (targets, r, dora)) in enumerate(names.items()):
        make_adapter(tmp_path / name, targets, r, dora, seed)
    tok = load_tokenizer()
    prompts = [*PROMPTS, "def fib(n):", "Once upon a time"]
    expected = {}
    for name in [None, *names]:
        model, _, _ = load_model(None)
        if name:
            lorakit.load_adapter(model, tmp_path / name)
        expected[name] = generate(model, tok, prompts, Decoding(max_new_tokens=10), batch_size=1)
    model, _, _ = load_model(None)
    for name in names:
        lorakit.load_adapter(model, tmp_path / name, adapter_name=name)
    engine = Engine(model, tok, max_batch=3, batching=batching).start()  # fewer rows than requests: slots are reused
    try:
        cases = [(i, name) for i in range(len(prompts)) for name in [None, *names]]
        greedy = SamplingParams(max_tokens=10, temperature=0)
        events = run_jobs(engine, [(encode_prompt(tok, prompts[i]), name or BASE, greedy) for i, name in cases])
    finally:
        engine.close()
    for (i, name), evs in zip(cases, events, strict=True):
        assert "".join(e.text for e in evs).strip() == expected[name][i], (name, prompts[i])
        assert evs[-1].finish_reason in ("stop", "length") and evs[-1].completion_tokens <= 10
    assert engine.running == 0 and engine.waiting == 0


def test_a_full_queue_raises_overloaded_and_close_cancels_and_refuses():
    model, tok, _ = load_model(None)
    engine = Engine(model, tok, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    got: list[Event] = []
    for _ in range(2):
        engine.submit(Job([1, 2, 3], BASE, SamplingParams(max_tokens=4), got.append))
    with pytest.raises(Overloaded, match="2 requests waiting"):
        engine.submit(Job([1, 2, 3], BASE, SamplingParams(max_tokens=4), got.append))
    engine.start()
    engine.close()
    ends = [e.finish_reason for e in got if e.finish_reason]
    assert len(ends) == 2 and set(ends) <= {"cancelled", "length", "stop"}  # each job ends exactly once
    queued = engine.waiting
    with pytest.raises(Unavailable, match="stopping"):  # a closed engine queues nothing it would never run
        engine.submit(Job([1, 2, 3], BASE, SamplingParams(max_tokens=4), got.append))
    assert engine.waiting == queued


@pytest.mark.integration  # the serving engine end to end: the packaged model, loaded for each adapter, decoding
def test_adapters_on_an_nf4_base_equal_generate_on_it(tmp_path):
    make_adapter(tmp_path / "qv", ["q_proj", "v_proj"], 8, False, 0)
    tok = load_tokenizer()
    model, _, _ = load_model(None, quantize="nf4")
    lorakit.load_adapter(model, tmp_path / "qv", adapter_name="qv")
    expected = {}
    for name in ("qv", BASE):
        if name == BASE:
            with lorakit.disable_adapters(model):
                expected[name] = generate(model, tok, PROMPTS, Decoding(max_new_tokens=8), batch_size=1)
        else:
            expected[name] = generate(model, tok, PROMPTS, Decoding(max_new_tokens=8), batch_size=1)
    engine = Engine(model, tok, max_batch=4).start()
    try:
        greedy = SamplingParams(max_tokens=8, temperature=0)
        jobs = [(encode_prompt(tok, p), n, greedy) for n in ("qv", BASE) for p in PROMPTS]
        events = run_jobs(engine, jobs)
    finally:
        engine.close()
    for (_, name, _), evs, want in zip(jobs, events, [*expected["qv"], *expected[BASE]], strict=True):
        assert "".join(e.text for e in evs).strip() == want, name


def test_unload_waits_for_running_requests_and_refuses_new_ones(tmp_path):
    from lorakit.serve.errors import UnknownModel
    from lorakit.serve.registry import AdapterRegistry

    make_adapter(tmp_path / "qv", ["q_proj", "v_proj"], 8, False, 0)
    model, tok, name = load_model(None)
    engine = Engine(model, tok).start()
    try:
        registry = AdapterRegistry(engine, base_names=[name], adapter_dir=tmp_path, max_adapters=2)
        registry.load("qv", registry.resolve_path("qv")).result(60)
        assert registry.acquire("qv") == "qv"  # a request is running on it
        drained = registry.unload("qv")
        with pytest.raises(UnknownModel, match="being unloaded"):
            registry.acquire("qv")
        assert not drained.done() and lorakit.list_adapters(model) == ["qv"]
        registry.release("qv")  # the request finished: now it goes
        drained.result(60)
        assert lorakit.list_adapters(model) == [] and registry.ready() == []
        with pytest.raises(UnknownModel, match="does not exist"):
            registry.acquire("qv")
        assert registry.acquire(name) == BASE
    finally:
        engine.close()
