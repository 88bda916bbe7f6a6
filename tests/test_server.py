"""The OpenAI-compatible server, end to end: a real `leapserve serve` subprocess on a tiny random Llama,
spoken to with the `openai` client and raw httpx. One module (over 400 lines): the tests share one running server.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fault_injection import POISON_AFTER, POISON_PREFIX, SLOW_PREFIX, SLOW_SECONDS

TESTS_DIR = Path(__file__).resolve().parent
API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox"
IGNORE_EOS = {"ignore_eos": True}  # fixed-length completions from a random model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir: Path, log_path: Path, *extra_args: str, startup_timeout: float = 120) -> Iterator[str]:
    """`leapserve serve` in a subprocess; yields its base URL once /health answers, stops it afterwards."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "leapserve.cli",
        "serve",
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL,
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--log-level",
        "warning",
        "--logits-processors",
        "fault_injection:fail_if_poisoned,fault_injection:delay_if_slow",
        *extra_args,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))}
    with served(cmd, port, log_path, env=env, cwd=TESTS_DIR.parent, startup_timeout=startup_timeout):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def served(
    cmd: list, port: int, log_path: Path, *, env: dict, cwd: Path, startup_timeout: float, stop_timeout: float = 30
) -> Iterator[subprocess.Popen]:
    """A server command in a subprocess logging to `log_path`; yields the process once /health on `port` answers,
    then stops it (SIGTERM, then SIGKILL after `stop_timeout`); its exit status is in `returncode` afterwards."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            deadline = time.monotonic() + startup_timeout
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"server did not come up (exit code {proc.poll()}); log:\n{log_path.read_text()[-5000:]}"
                    )
                time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(
        tiny_model_dir, log, "--kv-cache-tokens", "16384", "--max-num-seqs", "32", "--max-waiting-requests", "64"
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def metrics_prefix() -> str:
    """The prefix of the server's Prometheus metric names."""
    return "leapserve:"


@pytest.fixture(scope="module")
def long_request() -> dict:
    """A completion that takes the server at least 4 s to finish (the fault-injection prefix slows each step)."""
    assert 200 * SLOW_SECONDS >= 4
    return {**COMPLETION, "prompt": SLOW_PREFIX + [100], "max_tokens": 200, **IGNORE_EOS}


def post(url: str, path: str, body: dict | bytes, *, key: str | None = API_KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(
            url + path, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=timeout
        )
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def assert_error(
    resp: httpx.Response,
    status: int,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type
    assert error["param"] == param
    assert error["code"] == code
    return error


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (whatever other labels the server adds)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def wait_until_idle(url: str, timeout: float, prefix: str = "leapserve:") -> dict:
    """Poll /metrics until no request runs or waits and the KV cache is empty; return the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if all(
            total(samples, f"{prefix}{name}") == 0
            for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        ):
            return samples
        assert time.monotonic() < deadline, f"engine still busy after {timeout} s: {samples}"
        time.sleep(0.05)


def sse_events(resp: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]


# ---------------------------------------------------------------- endpoints


def test_health_models_and_metrics_endpoints(server, client):
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed outside /v1
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    resp = httpx.get(f"{server}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    for name in (
        "request_success_total",
        "request_failure_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
    ):
        assert f"leapserve:{name}" in resp.text


def test_completion_usage_and_greedy_determinism(client, tokenizer):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0, extra_body=IGNORE_EOS)
    first = client.completions.create(**kwargs)
    (choice,) = first.choices
    assert first.object == "text_completion" and first.model == MODEL and first.id.startswith("cmpl-")
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert first.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert first.usage.completion_tokens == len(choice.logprobs.tokens) == 8
    assert first.usage.total_tokens == first.usage.prompt_tokens + 8
    assert client.completions.create(**kwargs).choices[0].text == choice.text


def test_prompt_forms_and_choice_indexing(client, tokenizer):
    other = "Once upon a time"
    greedy = dict(model=MODEL, max_tokens=6, temperature=0, extra_body=IGNORE_EOS)
    text_a = client.completions.create(prompt=PROMPT, **greedy).choices[0].text
    text_b = client.completions.create(prompt=other, **greedy).choices[0].text
    ids_a, ids_b = tokenizer.encode(PROMPT), tokenizer.encode(other)
    assert client.completions.create(prompt=ids_a, **greedy).choices[0].text == text_a
    for prompts in ([PROMPT, other], [ids_a, ids_b]):
        resp = client.completions.create(prompt=prompts, n=2, **greedy)
        assert [c.index for c in resp.choices] == [0, 1, 2, 3]  # prompt i, sample j -> i * n + j
        assert [c.text for c in resp.choices] == [text_a, text_a, text_b, text_b]
        assert resp.usage.prompt_tokens == len(ids_a) + len(ids_b)
        assert resp.usage.completion_tokens == 4 * 6


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=1234, n=3, extra_body=IGNORE_EOS
    )
    texts = [c.text for c in client.completions.create(**kwargs).choices]
    assert [c.text for c in client.completions.create(**kwargs).choices] == texts
    assert len(set(texts)) > 1  # each of the n samples draws its own tokens


def test_completion_stream_matches_non_streaming(client):
    kwargs = dict(
        model=MODEL, prompt=[PROMPT, "Hello"], n=2, max_tokens=7, temperature=0, logprobs=2, extra_body=IGNORE_EOS
    )
    full = client.completions.create(**kwargs)
    texts, tokens, offsets, finish = {}, {}, {}, {}
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        (c,) = chunk.choices
        texts[c.index] = texts.get(c.index, "") + c.text
        tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
        offsets.setdefault(c.index, []).extend(c.logprobs.text_offset)
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    for c in full.choices:
        assert texts[c.index] == c.text
        assert tokens[c.index] == c.logprobs.tokens
        assert offsets[c.index] == c.logprobs.text_offset
        assert finish[c.index] == c.finish_reason == "length"


def test_completion_logprobs(client):
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, extra_body=IGNORE_EOS
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) == 3
        assert top[token] == logprob == max(top.values())  # greedy picks the most likely token


def test_completion_echo_with_prompt_logprobs(client, tokenizer):
    """`echo` puts the prompt before the completion; with `logprobs`, each prompt token's logprob after the first
    (null, as OpenAI's), as lm-evaluation-harness reads them to score a continuation; streamed alike."""
    ids = tokenizer.encode(PROMPT)
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True, extra_body=IGNORE_EOS)
    resp = client.completions.create(**kwargs)
    plain = client.completions.create(**{**kwargs, "echo": False}).choices[0]
    (c,) = resp.choices
    assert c.text == PROMPT + plain.text
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 and len(top) in (2, 3) for x, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    assert lp.token_logprobs[len(ids) :] == plain.logprobs.token_logprobs
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # the prompt as token ids, streamed: the same text and logprobs
    chunks = list(client.completions.create(**{**kwargs, "prompt": ids, "stream": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    streamed = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    # without logprobs, only the text; with n = 2, before each sample
    bare = client.completions.create(**{**kwargs, "logprobs": None, "n": 2})
    assert [x.text for x in bare.choices] == [c.text] * 2 and bare.choices[0].logprobs is None


def _chat_prompt_len(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chat_completion_and_stream(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    kwargs = dict(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0, extra_body=IGNORE_EOS)
    full = client.chat.completions.create(**kwargs)
    (choice,) = full.choices
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert full.usage.prompt_tokens == _chat_prompt_len(tokenizer, messages)
    assert full.usage.completion_tokens == 8

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage

    as_parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    parts = client.chat.completions.create(**{**kwargs, "messages": as_parts})
    assert parts.choices[0].message.content == choice.message.content


def test_chat_max_tokens_and_n(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        n=2,
        temperature=0.8,
        seed=5,
        extra_body=IGNORE_EOS,
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 6


def test_chat_logprobs(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=IGNORE_EOS,
    )
    resp = client.chat.completions.create(**kwargs)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and t.logprob <= 0
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].token == t.token  # greedy
    streamed = [
        t
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices and chunk.choices[0].logprobs
        for t in chunk.choices[0].logprobs.content
    ]
    assert streamed == content


def test_stop_strings(client):
    greedy = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body=IGNORE_EOS)
    text = client.completions.create(**greedy).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.find(stop)
    resp = client.completions.create(stop=stop, **greedy)
    assert resp.choices[0].text == text[:cut] and resp.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        stop=["never-generated", stop], **{**greedy, "extra_body": {**IGNORE_EOS, "include_stop_str_in_output": True}}
    )
    assert kept.choices[0].text == text[: cut + len(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **greedy))
    assert streamed == text[:cut]


# ---------------------------------------------------------------- errors


LONG_PROMPT = [100] * (MAX_MODEL_LEN + 10)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": MODEL, "prompt": "Hi"}


INVALID_REQUESTS = [  # (path, body, the field the 400 names)
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": 2.5}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 100}, "n"),
    ("/v1/completions", {**COMPLETION, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
    ("/v1/completions", {**COMPLETION, "stream": "yes please"}, "stream"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [10**9]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": LONG_PROMPT}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [100] * 200, "max_tokens": 100}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": LONG_PROMPT, "stream": True}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages",
    ),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x " * 300}]}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1, "stream": True}, "temperature"),
]


@pytest.mark.parametrize(("path", "body", "param"), INVALID_REQUESTS)
def test_invalid_requests_get_400(server, path, body, param):
    assert_error(post(server, path, body), 400, param=param)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**COMPLETION, "seed": 2**80}, "seed"),
        ("/v1/completions", {**COMPLETION, "seed": -(2**63) - 1}, "seed"),
        ("/v1/completions", {**COMPLETION, "prompt": "Hi \ud800 there"}, "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi \udfff"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "stop": ["\ud800"]}, "stop"),
        ("/v1/completions", {**COMPLETION, "stop_token_ids": [10**20]}, "stop_token_ids"),
        ("/v1/completions", {**COMPLETION, "stop_token_ids": [-1]}, "stop_token_ids"),
        ("/v1/completions", {**COMPLETION, "stop": [f"s{i}" for i in range(1000)]}, "stop"),
    ],
)
def test_hostile_values_get_400_naming_the_field(server, path, body, param):
    """Values that once failed inside the engine or the tokenizer (a 500) or were silently accepted are refused up
    front; JSON's escapes carry the lone surrogates, which no UTF-8 body can."""
    assert_error(post(server, path, json.dumps(body).encode()), 400, param=param)
    paired = {**CHAT, "messages": [{"role": "user", "content": "Hi \ud83d\ude00"}], "max_tokens": 2}
    assert post(server, "/v1/chat/completions", json.dumps(paired).encode()).status_code == 200  # a valid pair


def test_a_huge_prompt_is_tokenized_without_holding_up_other_clients(server):
    """A prompt of several megabytes takes seconds to tokenize; that happens off the event loop, so a short
    request sent after it is answered first (and the huge one gets its 400 for length)."""
    huge = {**COMPLETION, "prompt": "all work and no play makes a dull model " * 200_000}  # 8 MB
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, server, "/v1/completions", huge)
        time.sleep(1.0)  # the huge body is received and its tokenization under way
        short = post(server, "/v1/completions", {**COMPLETION, "max_tokens": 2})
        assert short.status_code == 200 and not slow.done()
        assert_error(slow.result(), 400, param="prompt")


def test_bodies_over_the_size_limit_get_413_whether_declared_or_streamed(server):
    """`--max-request-bytes` (default 16 MiB): refused from the Content-Length header, or counted as a chunked
    body arrives; the server goes on serving."""
    from leapserve.server import DEFAULT_MAX_REQUEST_BYTES

    body = json.dumps({**COMPLETION, "prompt": "x" * (DEFAULT_MAX_REQUEST_BYTES + 1)}).encode()
    assert_error(post(server, "/v1/completions", body), 413)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + 1 << 20]

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    assert_error(httpx.post(server + "/v1/completions", content=chunks(), headers=headers, timeout=60), 413)
    assert post(server, "/v1/completions", {**COMPLETION, "max_tokens": 2}).status_code == 200


def test_over_deep_json_gets_400(server):
    """JSON nested deeper than the parser's recursion limit, as a whole body and inside a field."""
    deep = b"[" * 200_000 + b"]" * 200_000
    assert_error(post(server, "/v1/completions", deep), 400)
    inner = b'{"model": "tiny", "prompt": "Hi", "logit_bias": ' + b'{"1": ' * 50_000 + b"1" + b"}" * 50_001
    assert_error(post(server, "/v1/completions", inner), 400)
    assert post(server, "/v1/completions", {**COMPLETION, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "echo", True),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "suffix", "end"),
        ("/v1/completions", "prompt_logprobs", 1),
        ("/v1/chat/completions", "response_format", {"type": "yaml"}),  # not a format
        ("/v1/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "tool_choice", "required"),
        ("/v1/chat/completions", "guided_json", {"type": "nonsense"}),  # not a schema
        ("/v1/chat/completions", "reasoning_effort", "high"),
        ("/v1/chat/completions", "frobnicate", 1),  # no such parameter anywhere
    ],
)
def test_parameters_not_honoured_get_400_naming_them(server, path, field, value):
    body = {**(COMPLETION if path == "/v1/completions" else CHAT), field: value}
    assert_error(post(server, path, body), 400, param=field)


def test_parameters_that_ask_for_nothing_are_accepted(server):
    neutral = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "echo": False, "best_of": 1}
    metadata_only = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    resp = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 2, **neutral, **metadata_only})
    assert resp.status_code == 200, resp.text


def test_logit_bias_min_p_and_min_tokens_are_honoured(client, tokenizer):
    """`logit_bias` +100 makes one token the greedy choice everywhere; `min_p` 1 keeps only the most likely
    token, so sampling at temperature 1 gives the greedy output; `min_tokens` holds back a stop string."""
    forced = tokenizer.encode(" blue")[-1]
    kwargs = {"model": MODEL, "prompt": "The sky is", "max_tokens": 6}
    out = client.completions.create(**kwargs, temperature=0, logit_bias={str(forced): 100})
    assert out.choices[0].text == tokenizer.decode([forced] * 6)
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    for seed in range(3):
        sampled = client.completions.create(**kwargs, temperature=1.0, seed=seed, extra_body={"min_p": 1.0})
        assert sampled.choices[0].text == greedy
    stopped = client.completions.create(**kwargs, temperature=0, stop=[greedy[:2]])
    assert stopped.usage.completion_tokens < 6
    held = client.completions.create(**kwargs, temperature=0, stop=[greedy[:2]], extra_body={"min_tokens": 6})
    assert held.usage.completion_tokens == 6  # min_tokens: the stop string does not end it early


def test_tokenize_detokenize_and_version(server, client, tokenizer):
    """vLLM's routes: the token ids a completion and a chat completion are counted with, and back to text."""
    ids = post(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    usage = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).usage
    assert ids["count"] == len(ids["tokens"]) == usage.prompt_tokens and ids["tokens"] == tokenizer.encode(PROMPT)
    assert ids["token_strs"] == tokenizer.convert_ids_to_tokens(ids["tokens"]) and ids["max_model_len"] > 0
    chat = post(server, "/tokenize", {"messages": CHAT["messages"]}).json()
    usage = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    assert post(server, "/detokenize", {"tokens": ids["tokens"]}).json() == {"prompt": PROMPT}
    assert_error(post(server, "/detokenize", {"tokens": [-1]}), 400, param="tokens")
    assert_error(post(server, "/tokenize", {}), 400, param="prompt")
    assert_error(post(server, "/tokenize", {"prompt": PROMPT, "messages": CHAT["messages"]}), 400, param="messages")
    assert_error(post(server, "/tokenize", {"prompt": PROMPT, "nothing": 1}), 400, param="nothing")
    assert_error(
        post(server, "/tokenize", {"model": "nope", "prompt": PROMPT}), 404, param="model", code="model_not_found"
    )
    version = httpx.get(server + "/version").json()["version"]
    assert version and version[0].isdigit()


def test_malformed_json_gets_400(server):
    assert_error(post(server, "/v1/completions", b'{"model": "tiny", "prompt": '), 400)
    assert_error(post(server, "/v1/chat/completions", b"[1, 2]"), 400)


def test_invalid_request_through_openai_client(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=-1)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "max_tokens"


def test_api_key(server, client):
    for key in (None, "wrong-key"):
        assert_error(post(server, "/v1/completions", COMPLETION, key=key), 401, code="invalid_api_key")
        assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-key", max_retries=0).models.list()


def test_unknown_model_gets_404(server, client):
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        assert_error(post(server, path, {**body, "model": "gpt-4"}), 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hi")


def test_unknown_route_and_wrong_method(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert_error(httpx.get(f"{server}/v1/embeddings", headers=headers), 404)
    assert_error(httpx.get(f"{server}/nowhere"), 404)
    assert_error(httpx.get(f"{server}/v1/completions", headers=headers), 405)


def test_engine_failure_fails_only_that_request(server, client):
    """A request failing inside the engine gets a 500 (or an error event when streaming); others are unaffected."""
    poisoned = {**COMPLETION, "prompt": POISON_PREFIX + [100, 200], "max_tokens": 10, "temperature": 0}
    failures_before = metric(scrape(server), "leapserve:request_failure_total")

    def normal(i: int) -> str:
        return (
            client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=12, extra_body=IGNORE_EOS)
            .choices[0]
            .finish_reason
        )

    with ThreadPoolExecutor(6) as pool:
        normals = [pool.submit(normal, i) for i in range(4)]
        failed = pool.submit(post, server, "/v1/completions", poisoned)
        streamed = pool.submit(post, server, "/v1/completions", {**poisoned, "stream": True})
        assert [f.result() for f in normals] == ["length"] * 4
        assert_error(failed.result(), 500, type="server_error")
        stream = streamed.result()

    assert stream.status_code == 200  # the failure came after the stream had started
    events = sse_events(stream)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "poisoned" in error["message"]
    assert len(events) - 2 == POISON_AFTER  # the chunks sent before the failure
    with pytest.raises(openai.APIError, match="poisoned"):
        list(client.completions.create(model=MODEL, prompt=POISON_PREFIX + [5], max_tokens=10, stream=True))

    assert metric(scrape(server), "leapserve:request_failure_total") == failures_before + 3
    assert normal(99) == "length"  # still serving


# ---------------------------------------------------------------- load, disconnects, metrics


def test_queue_full_gets_503_with_retry_after(tiny_model_dir, tmp_path):
    with running_server(
        tiny_model_dir,
        tmp_path / "server.log",
        "--kv-cache-tokens",
        "4096",
        "--max-num-seqs",
        "1",
        "--max-waiting-requests",
        "1",
    ) as url:
        slow = {**COMPLETION, "prompt": SLOW_PREFIX + [100], "max_tokens": 25, **IGNORE_EOS}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(url, "/v1/completions", slow), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert_error(r, 503, type="server_error", code="queue_full")
                assert int(r.headers["Retry-After"]) >= 1
        assert post(url, "/v1/completions", {**COMPLETION, "max_tokens": 3}).status_code == 200


def test_client_disconnect_aborts_and_frees_kv_blocks(server, metrics_prefix, long_request):
    """Closing a stream (or a non-streaming request) early stops it in the engine: it generates fewer tokens than it
    asked for, the engine goes idle with its KV blocks freed, and leapserve counts it as aborted (vLLM 0.32 counts
    no aborted request, and its gauges lag a stats interval behind its steps)."""
    native = metrics_prefix == "leapserve:"
    aborted, generated = f"{metrics_prefix}request_success_total", f"{metrics_prefix}generation_tokens_total"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for stream in (True, False):
        before = scrape(server)
        if stream:
            with httpx.stream(
                "POST", f"{server}/v1/completions", json={**long_request, "stream": True}, headers=headers, timeout=30
            ) as resp:
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                busy = scrape(server)
                assert not native or total(busy, f"{metrics_prefix}num_requests_running") == 1
                assert not native or total(busy, f"{metrics_prefix}kv_cache_usage_perc") > 0
        else:
            with pytest.raises(httpx.ReadTimeout):
                post(server, "/v1/completions", long_request, timeout=0.2)
        after = wait_until_idle(server, timeout=2, prefix=metrics_prefix)  # the long request takes >= 4 s natively
        assert total(after, generated) - total(before, generated) < long_request["max_tokens"]
        if native:
            assert total(after, aborted, finished_reason="abort") == total(before, aborted, finished_reason="abort") + 1


def test_concurrent_streams_match_sequential_outputs(server):
    """32 concurrent greedy streams each equal the same request served alone, with correct usage."""
    prompts = [f"Story number {i}: once upon a time" for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    kwargs = dict(model=MODEL, max_tokens=12, temperature=0, extra_body=IGNORE_EOS)

    async def stream(prompt: str) -> tuple[str, openai.types.CompletionUsage]:
        chunks = [
            c
            async for c in await aclient.completions.create(
                prompt=prompt, stream=True, stream_options={"include_usage": True}, **kwargs
            )
        ]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage

    async def run_all() -> list:
        try:
            return await asyncio.gather(*(stream(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0) as client:
        for prompt, (text, usage) in zip(prompts, results):
            alone = client.completions.create(prompt=prompt, **kwargs)
            assert text == alone.choices[0].text
            assert usage == alone.usage and usage.completion_tokens == 12


def test_a_mixed_load_loses_nothing(server):
    """48 clients at once: streamed and whole completions and chats, streams dropped mid-way, requests abandoned
    by their clients, invalid requests. Every request kept to its end completes with its full usage, the greedy
    ones equal their output served alone, the invalid ones get their 400, and afterwards nothing runs or waits and
    every KV block is free."""
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def body(i: int) -> tuple[str, dict]:
        common = {"model": MODEL, "max_tokens": 4 + i % 13, "temperature": 0, "ignore_eos": True}
        if i % 3 == 2:
            return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"Load test {i}"}]}
        return "/v1/completions", {**common, "prompt": f"Load test {i}: once upon a time"}

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, str, int] | None:
        path, req = body(i)
        kind = i % 6
        if kind == 4:  # invalid: refused, and nothing else disturbed
            resp = await http.post(path, json={**req, "temperature": 9}, headers=headers)
            assert resp.status_code == 400, resp.text
            return None
        if kind == 5:  # abandoned by its client before the answer
            with pytest.raises(httpx.ReadTimeout):
                # only the wait for the answer is cut short: connecting among 48 clients may take longer
                await http.post(
                    path, json={**req, "max_tokens": 200}, headers=headers, timeout=httpx.Timeout(120, read=0.3)
                )
            return None
        if kind in (0, 3):  # streamed (kind 3 dropped after its first chunk)
            streamed = {**req, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", path, json=streamed, headers=headers) as resp:
                events = []
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[len("data: ") :]))
                        if kind == 3:
                            return None
            assert events[-1]["usage"]["completion_tokens"] == req["max_tokens"]
            choices = [e["choices"][0] for e in events if e["choices"]]
            text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)
            return i, text, req["max_tokens"]
        resp = await http.post(path, json=req, headers=headers)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        choice = answer["choices"][0]
        assert answer["usage"]["completion_tokens"] == req["max_tokens"]
        return i, choice.get("text") or choice["message"]["content"], req["max_tokens"]

    async def run_all() -> list:
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(48))), timeout=180)

    finished = [r for r in asyncio.run(run_all()) if r is not None]
    assert len(finished) == 24
    for i, text, _ in finished[::3]:  # greedy probes: what each got under load is what it gets alone
        path, req = body(i)
        alone = post(server, path, req).json()["choices"][0]
        assert text == (alone.get("text") or alone["message"]["content"]), i
    wait_until_idle(server, timeout=10)


def test_metrics_count_requests(server, client, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    before = scrape(server)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, extra_body=IGNORE_EOS)
    list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True, extra_body=IGNORE_EOS
        )
    )
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("leapserve:request_success_total", finished_reason="length") == 2
    assert delta("leapserve:prompt_tokens_total") == resp.usage.prompt_tokens + _chat_prompt_len(tokenizer, messages)
    assert delta("leapserve:generation_tokens_total") == 5 + 4
    assert delta("leapserve:time_to_first_token_seconds_count") == 2
    assert delta("leapserve:e2e_request_latency_seconds_count") == 2
    # one gap per new output: fewer than tokens - 1 if a decoder commits several tokens per step
    assert 0 < delta("leapserve:inter_token_latency_seconds_count") <= (5 - 1) + (4 - 1)
    assert delta("leapserve:request_failure_total") == 0
