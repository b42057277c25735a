"""A property-based fuzz of the server's API from its own OpenAPI schema (schemathesis): valid and
invalid bodies for every operation, no 5xx, no crash, and the server still answers afterwards."""

from __future__ import annotations

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.serve.conftest import PROMPTS, start_server, stop_server

pytestmark = pytest.mark.integration  # a real `lorakit serve` process, fuzzed


def test_fuzzing_the_openapi_schema_never_gets_a_server_error(tmp_path):
    # A short context keeps every generated completion to a few tokens.
    server = start_server(
        ["--max-model-len", "48", "--default-max-tokens", "2", "--max-batch", "4"], tmp_path / "fuzz.log"
    )
    try:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
        seen: dict[int, int] = {}

        @settings(
            max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=cases, served=st.booleans())
        def call(case, served: bool) -> None:
            if served and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "smollm2-135m"  # half the requests reach the engine
            response = case.call(timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            if response.status_code >= 400:
                assert "error" in response.json(), response.text  # OpenAI's error JSON, not a traceback

        call()
        assert seen.get(200, 0) >= 10 and sum(n for s, n in seen.items() if 400 <= s < 500) > 0, seen
        assert server.alive()  # the process runs and /health answers 200

        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert c.completions.create(model="smollm2-135m", prompt=PROMPTS[0], max_tokens=2).usage.completion_tokens >= 1
        assert "Traceback" not in (tmp_path / "fuzz.log").read_text()
    finally:
        stop_server(server)
