"""The native server's OpenAI client tests, run again against `leapserve serve --backend vllm`: the tests below are
test_server.py's own, collected here with this module's `server` (vLLM's engine) in place of the native one, error
shapes and client disconnects included. Where vLLM's server answers a bad request differently, the difference is
listed below and asserted (docs/vllm.md); left out are vLLM's refusal of n > 1 under greedy sampling and what only
leapserve's engine has (fault injection, the waiting-queue cap)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from test_server import (  # noqa: F401  (collected here, against this module's fixtures)
    API_KEY,
    CHAT,
    COMPLETION,
    IGNORE_EOS,
    INVALID_REQUESTS,
    MODEL,
    assert_error,
    client,
    post,
    test_api_key,
    test_chat_completion_and_stream,
    test_chat_max_tokens_and_n,
    test_client_disconnect_aborts_and_frees_kv_blocks,
    test_completion_usage_and_greedy_determinism,
    test_concurrent_streams_match_sequential_outputs,
    test_invalid_request_through_openai_client,
    test_malformed_json_gets_400,
    test_seeded_sampling_is_reproducible,
    test_stop_strings,
    test_unknown_model_gets_404,
    test_unknown_route_and_wrong_method,
    tokenizer,
)
from test_vllm import VLLM_BIN, leapserve_on_vllm

pytestmark = pytest.mark.skipif(
    not (VLLM_BIN / "vllm").exists(), reason="no .venv-vllm with vLLM's CPU build (`make setup-vllm` builds it)"
)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    with leapserve_on_vllm(tiny_model_dir, tmp_path_factory.mktemp("vllm-server"), None) as url:
        yield url


@pytest.fixture(scope="module")
def metrics_prefix() -> str:
    return "vllm:"


@pytest.fixture(scope="module")
def long_request() -> dict:
    """As long a completion as the tiny model's 256-token context allows: about 0.7 s of vLLM's engine here."""
    return {**COMPLETION, "max_tokens": 250, **IGNORE_EOS}


ACCEPTED_BY_VLLM = [  # bodies the native server refuses and vLLM serves
    {**COMPLETION, "n": 100},  # no cap on n
    {**COMPLETION, "prompt": [100] * 200, "max_tokens": 100},  # max_tokens clipped to the context left
    {**CHAT, "messages": [{"role": "wizard", "content": "Hi"}]},  # any role the chat template renders
]
UNNAMED_BY_VLLM = [  # 400s whose error names no field in vLLM
    {**COMPLETION, "stop": [""]},
    {**COMPLETION, "prompt": []},
    {**COMPLETION, "prompt": [10**9]},
    {**CHAT, "messages": []},
    {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    {**CHAT, "n": 0},
]


@pytest.mark.parametrize(("path", "body", "param"), INVALID_REQUESTS)
def test_invalid_requests_get_400(server, path, body, param):
    """test_server's bad requests: a 400 in OpenAI's error shape naming the field, except where listed above."""
    resp = post(server, path, body)
    if body in ACCEPTED_BY_VLLM:
        assert resp.status_code == 200, resp.text
    else:
        assert_error(resp, 400, param=None if body in UNNAMED_BY_VLLM else param)
