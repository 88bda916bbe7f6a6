"""A property-based fuzzer against the real server (a `leapserve serve` subprocess on the tiny model): hypothesis
draws bodies for both generating endpoints, the tokenizer endpoints included, mixing the parameters the server knows
with values in and out of range, wrong types, non-finite floats, lone surrogates, nested junk and unknown fields.
Every answer must be a 200 or a 4xx in OpenAI's error shape, never a 5xx, a stream must carry no server error, and
the server must go on serving. Bounded: a fixed number of examples per endpoint, derandomized so CI is repeatable."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server import API_KEY, COMPLETION, MODEL, client, server, tokenizer  # noqa: F401  (this module's server)

EXAMPLES = 200
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

text = st.text(max_size=24)  # any code points, lone surrogates among them
clean_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
number = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -1, 2, 0.5, 1e-9])
)
junk = st.recursive(
    st.none() | st.booleans() | number | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
# values at and past the edges every check must hold: 64-bit limits, huge and non-finite floats, empty and wrong types
EXTREMES = st.sampled_from(
    [2**63, -(2**63) - 1, 2**80, -1, 0, 10**6, 1e308, -1e308, float("nan"), float("inf"), "", "\ud800", [], {}, None]
)
token_id = st.integers(min_value=0, max_value=49_151)
unit = st.floats(min_value=0, max_value=1)

# each parameter's valid values (what a well-behaved client sends); a body is drawn valid, then 0-2 of its fields
# are replaced by anything (junk, out of range, a wrong type), so the fuzzer reaches the engine as well as the checks
SAMPLING = {
    "n": st.integers(min_value=1, max_value=3),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "top_k": st.integers(min_value=-1, max_value=100),
    "min_p": unit,
    "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "stop": clean_text.filter(bool) | st.lists(clean_text.filter(bool), max_size=3),
    "stop_token_ids": st.lists(token_id, max_size=3),
    "logit_bias": st.dictionaries(token_id.map(str), st.floats(min_value=-100, max_value=100), max_size=3),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "repetition_penalty": st.floats(min_value=0.5, max_value=2),
    "min_tokens": st.integers(min_value=0, max_value=2),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": clean_text,
}
COMPLETION_FIELDS = {
    **SAMPLING,
    "logprobs": st.integers(min_value=0, max_value=5),
    "echo": st.booleans(),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"])},
    optional={"content": clean_text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": clean_text}))},
)
CHAT_FIELDS = {
    **SAMPLING,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=5),
}
TOKENIZE_FIELDS = {"add_special_tokens": st.booleans(), "return_token_strs": st.booleans()}


@st.composite
def bodies(draw: st.DrawFn, required: dict, optional: dict) -> dict:
    """A valid body (`required` fields, some of `optional`), then up to two fields, known or not, set to an extreme
    value or anything at all."""
    body = draw(st.fixed_dictionaries(required, optional=optional))
    names = st.sampled_from([*required, *optional, "frobnicate", "response_format", "tools", "best_of"])
    body.update(draw(st.dictionaries(names, EXTREMES | junk, max_size=2)))
    return body


PROMPT = clean_text.filter(bool) | st.lists(token_id, min_size=1, max_size=8)
COMPLETION_BODY = bodies(
    {"model": st.just(MODEL), "prompt": PROMPT, "max_tokens": st.integers(1, 4)}, COMPLETION_FIELDS
)
CHAT_BODY = bodies(
    {
        "model": st.just(MODEL),
        "messages": st.lists(MESSAGE, min_size=1, max_size=3),
        "max_completion_tokens": st.integers(1, 4),
    },
    CHAT_FIELDS,
)
TOKENIZE_BODY = bodies({"prompt": clean_text}, TOKENIZE_FIELDS) | bodies(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=2)}, TOKENIZE_FIELDS
)
DETOKENIZE_BODY = bodies({"tokens": st.lists(token_id, max_size=6)}, {})


def encode(body: object) -> bytes:
    """JSON as Python writes it: NaN and Infinity as bare words, lone surrogates as \\ud800 escapes."""
    return json.dumps(body).encode()


def check(url: str, path: str, body: object) -> None:
    resp = httpx.post(
        url + path,
        content=encode(body),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    print("STATUS", path, resp.status_code, resp.headers["content-type"][:12])
    assert resp.status_code < 500, (path, body, resp.text)
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], resp.text
        return
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", resp.text
        for event in events[:-1]:
            assert "error" not in json.loads(event), (path, body, event)


@pytest.mark.parametrize(
    ("path", "bodies"),
    [
        ("/v1/completions", COMPLETION_BODY),
        ("/v1/chat/completions", CHAT_BODY),
        ("/tokenize", TOKENIZE_BODY),
        ("/detokenize", DETOKENIZE_BODY),
    ],
)
def test_fuzzed_requests_never_get_a_5xx(server, path, bodies):  # noqa: F811
    @FUZZ
    @given(body=bodies)
    def fuzz(body: dict) -> None:
        check(server, path, body)

    fuzz()
    # still serving: a plain request answers as before
    resp = httpx.post(
        server + "/v1/completions",
        json={**COMPLETION, "max_tokens": 2},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
