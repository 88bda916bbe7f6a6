"""The native server's OpenAI client tests, run again against `leapserve serve --backend vllm`: the tests below are
test_server.py's own, collected here with this module's `server` (vLLM's engine) in place of the native one. Left
out is what differs in vLLM's server (docs/vllm.md): its error bodies (`type` "BadRequestError" / "NotFoundError"
rather than OpenAI's "invalid_request_error", no `param`; a 401 and an unknown route not in OpenAI's error shape),
its refusal of n > 1 under greedy sampling, and what only leapserve's engine has (fault injection, its metric
names, the waiting-queue cap)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from test_server import (  # noqa: F401  (collected here, against this module's fixtures)
    API_KEY,
    MODEL,
    client,
    test_chat_completion_and_stream,
    test_chat_max_tokens_and_n,
    test_completion_usage_and_greedy_determinism,
    test_concurrent_streams_match_sequential_outputs,
    test_invalid_request_through_openai_client,
    test_seeded_sampling_is_reproducible,
    test_stop_strings,
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
