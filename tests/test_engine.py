"""The engine against transformers' generate: greedy outputs identical token for token, alone and batched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.config import DEFAULT_MODEL
from leapserve.decoding.model_loader import resolve_model
from leapserve.decoding.sampler import draw, nucleus

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
    "1, 2, 3,",
    "Explain why the sky is blue. The sky appears blue because sunlight is scattered by the molecules of the air, "
    "and shorter wavelengths scatter more strongly than longer ones, so",
]


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int, **generate_kwargs) -> list[int]:
    return hf_greedy_ids(model, tokenizer, tokenizer.encode(prompt), max_new_tokens, **generate_kwargs)


def hf_greedy_ids(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **generate_kwargs) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            **generate_kwargs,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), kv_cache_tokens=4096, max_model_len=512)


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_tiny_greedy_equals_transformers_alone_and_batched(tiny_llm, tiny_hf):
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = [hf_greedy(tiny_hf, tiny_llm.tokenizer, p, 24) for p in PROMPTS]
    for prompt, want in zip(PROMPTS, expected):
        assert tiny_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == want
    # All prompts together (different lengths, prefill mixed with decode), and with different max_tokens.
    batched = tiny_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == expected
    mixed = tiny_llm.generate(
        PROMPTS, [SamplingParams(temperature=0, max_tokens=4 + 5 * i) for i in range(5)], use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in mixed] == [e[: 4 + 5 * i] for i, e in enumerate(expected)]


def test_preemption_and_chunked_prefill_keep_outputs(tiny_model_dir, tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params, use_tqdm=False)]
    # 8 blocks of 16 tokens cannot hold five 50-90 token sequences at once: the scheduler must preempt.
    small = LLM(str(tiny_model_dir), kv_cache_tokens=128, max_model_len=128)
    small.engine.config.scheduler.max_num_batched_tokens = 7  # prompts are prefilled in chunks of <= 7 tokens
    got = small.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.cache.num_free_blocks == small.engine.cache.num_blocks


def test_seeded_sampling_is_reproducible_and_independent_of_batch(tiny_llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tiny_llm.generate(PROMPTS[0], p, use_tqdm=False)[0].outputs[0].token_ids
    again = tiny_llm.generate(PROMPTS[0], p, use_tqdm=False)[0].outputs[0].token_ids
    batched = tiny_llm.generate(PROMPTS, p, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert alone == again == batched
    assert tiny_llm.generate(PROMPTS[0], other, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_draw_keeps_the_distribution_and_never_draws_a_zero():
    """`draw` (the CDF inverted at one uniform): frequencies within five standard deviations of `probs`, which may
    be unnormalised (a residual is); tokens of probability 0, inside and at the end, never come; a seeded generator
    repeats its draws; a token of tiny mass beside a large one is drawn at its rate, not lost or crashed on."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0]) * 0.7
    g = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(n)]), minlength=len(probs)).double()
    assert counts[[0, 2, 5]].sum() == 0
    expected = (probs / probs.sum()).double()
    assert ((counts / n - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt()).all()
    seeded = [[draw(probs, gen) for _ in range(20)] for gen in (torch.Generator().manual_seed(3) for _ in range(2))]
    assert seeded[0] == seeded[1] and len(set(seeded[0])) > 1
    assert {draw(torch.tensor([0.0, 0.0, 1.0, 0.0]), g) for _ in range(50)} == {2}
    assert draw(torch.zeros(5), g) == draw(torch.full((5,), float("nan")), g) == 4  # nothing to draw: a valid id
    rare = torch.tensor([1.0, 1e-3] + [0.0] * 49_150)  # SmolLM2's vocabulary size
    rate = 1e-3 / 1.001
    hits = sum(draw(rare, g) == 1 for _ in range(n))
    assert abs(hits - n * rate) <= 5 * (n * rate * (1 - rate)) ** 0.5


def test_nucleus_keeps_what_a_whole_sort_keeps():
    """top-p over the likeliest tokens taken a few at a time keeps exactly the tokens (and probabilities) that a sort
    of the whole vocabulary keeps, for peaked and flat distributions, one row or several, whether the first batch of
    tokens holds the nucleus or it has to grow."""

    def by_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
        ordered, order = torch.sort(probs, descending=True)
        ordered[torch.cumsum(ordered, dim=-1) - ordered > top_p] = 0.0
        kept = torch.zeros_like(probs).scatter_(-1, order, ordered)
        return kept / kept.sum(dim=-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 2.0, 8.0):  # flat: thousands of tokens in the nucleus; peaked: a handful
        probs = torch.softmax(torch.randn(3, 4096, generator=g) * scale, dim=-1)
        for top_p in (0.05, 0.5, 0.9, 0.999):
            for first in (1, 64):
                assert torch.equal(nucleus(probs, top_p, first), by_sort(probs.clone(), top_p))
                assert torch.equal(nucleus(probs[1], top_p, first), by_sort(probs[1].clone(), top_p))
    one_hot = torch.zeros(100)
    one_hot[7] = 1.0
    assert torch.equal(nucleus(one_hot, 0.9), one_hot)


def test_n_stop_strings_stop_tokens_and_logprobs(tiny_llm):
    greedy = tiny_llm.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    # A stop string taken from the middle of the greedy text cuts the output right before it.
    stop = greedy.text[len(greedy.text) // 2 : len(greedy.text) // 2 + 3]
    cut = tiny_llm.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == greedy.text[: greedy.text.index(stop)]
    kept = tiny_llm.generate(
        PROMPTS[2],
        SamplingParams(temperature=0, max_tokens=30, stop=stop, ignore_eos=True, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == greedy.text[: greedy.text.index(stop) + len(stop)]
    # A stop token id ends generation with that token as the last one.
    token = greedy.token_ids[5]
    by_id = tiny_llm.generate(
        PROMPTS[2],
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[token], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert by_id.token_ids == greedy.token_ids[: greedy.token_ids.index(token) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == token
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 30
    # n > 1 with logprobs: n independent samples, each token's logprob and the top-3 alternatives.
    out = tiny_llm.generate(
        PROMPTS[0],
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=3, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 8
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert tok in lp and 3 <= len(lp) <= 4 and lp[tok].logprob <= 0
            assert sorted(v.rank for t, v in lp.items() if t != tok or v.rank <= 3)[:3] == [1, 2, 3]


def test_penalties_change_greedy_output(tiny_llm):
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = tiny_llm.generate(PROMPTS[3], base, use_tqdm=False)[0].outputs[0].token_ids
    pen = (
        tiny_llm.generate(
            PROMPTS[3],
            SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    assert len(set(pen)) >= len(set(plain)) and pen != plain


def test_repetition_penalty_and_logit_bias_equal_transformers_generate(tiny_llm, tiny_hf):
    """vLLM's `repetition_penalty` (over the prompt and the output, as transformers') and OpenAI's `logit_bias`
    (added to the raw logits: transformers' `sequence_bias` of one-token sequences), greedy, token for token."""
    tok = tiny_llm.tokenizer
    base = tiny_llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    first, second = base.outputs[0].token_ids[:2]
    bias = {first: -100.0, second: 100.0}  # the greedy first token never comes, the second comes every time
    cases = [
        ({"repetition_penalty": 1.3}, {"repetition_penalty": 1.3}),
        ({"logit_bias": bias}, {"sequence_bias": {(t,): b for t, b in bias.items()}}),
    ]
    for ours, theirs in cases:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **ours)
        got = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params, use_tqdm=False)]
        want = [hf_greedy(tiny_hf, tok, p, 12, **theirs) for p in PROMPTS]
        assert got == want, ours
    assert got[3] == [second] * 12


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(tiny_llm, tiny_model_dir):
    """Before `min_tokens`, a stop token is never sampled (masked as vLLM does) and a stop string does not end the
    sequence; after it both stop as usual; speculative decoding gives the same tokens."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    free = tiny_llm.generate(PROMPTS[3], params, use_tqdm=False)[0].outputs[0]
    stop = free.token_ids[1]
    stopped = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop])
    assert len(tiny_llm.generate(PROMPTS[3], stopped, use_tqdm=False)[0].outputs[0].token_ids) == 2
    held = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop], min_tokens=6)
    out = tiny_llm.generate(PROMPTS[3], held, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 6 and stop not in out.token_ids[:6]
    assert out.finish_reason == "length" or out.token_ids[-1] == stop
    text_stop = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[free.text[:3]], min_tokens=4)
    assert len(tiny_llm.generate(PROMPTS[3], text_stop, use_tqdm=False)[0].outputs[0].token_ids) >= 4
    spec = {"method": "draft_model", "model": str(tiny_model_dir), "tree": [2, 2, 1], "adaptive": False}
    fast = LLM(str(tiny_model_dir), kv_cache_tokens=2048, speculative_config=spec)
    got = fast.generate(PROMPTS[3], held, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == out.token_ids


def test_a_request_without_max_tokens_gets_the_default_budget(tiny_llm):
    """`default_max_tokens` bounds what a request that sets no max_tokens may generate (0: the context)."""
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    budgeted = LLM(config=dataclasses.replace(tiny_llm.engine.config, default_max_tokens=5))
    assert len(budgeted.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids) == 5
    asked = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    assert len(budgeted.generate(PROMPTS[0], asked, use_tqdm=False)[0].outputs[0].token_ids) == 9
    with pytest.raises(ValueError, match="default_max_tokens"):
        dataclasses.replace(tiny_llm.engine.config, default_max_tokens=-1)


def test_waiting_requests_are_admitted_in_arrival_order(tiny_model_dir):
    """First come, first served: a long prompt at the head of the queue, which does not fit while others run, is
    not overtaken by the short requests that arrived after it (each of which would fit), so a request waits only
    for the requests ahead of it, each bounded by its max_tokens."""
    llm = LLM(str(tiny_model_dir), kv_cache_tokens=256, max_model_len=200)  # 16 blocks of 16 tokens
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i in range(3):  # 4 blocks each by the end
        engine.add_request(f"running-{i}", [5] * 40, params)
    engine.step()
    engine.add_request("long", [7] * 150, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # 10 blocks
    for i in range(4):
        engine.add_request(f"short-{i}", [9] * 5, params)
    admitted: list[str] = []
    while engine.has_unfinished():
        engine.step()
        admitted += [s.request.request_id for s in engine.scheduler.running if s.request.request_id not in admitted]
    assert admitted[:3] == [f"running-{i}" for i in range(3)]
    assert admitted[3:] == ["long"] + [f"short-{i}" for i in range(4)]


def test_failing_request_does_not_harm_others(tiny_llm):
    def boom(prompt_ids, output_ids, logits):
        if len(output_ids) == 3:
            raise RuntimeError("processor exploded")
        return logits

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS[:3], params, use_tqdm=False)]
    bad = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logits_processors=[boom])
    got = tiny_llm.generate(PROMPTS[:3], [params, bad, params], use_tqdm=False)
    assert "processor exploded" in got[1].error
    assert got[0].outputs[0].token_ids == want[0] and got[2].outputs[0].token_ids == want[2]
    assert tiny_llm.engine.cache.num_free_blocks == tiny_llm.engine.cache.num_blocks


def test_incremental_detokenization_never_splits_characters(tiny_llm):
    tok = tiny_llm.tokenizer
    from leapserve.decoding.detokenizer import IncrementalDetokenizer

    text = "Grüße 👋🏽 — 日本語のテキスト, naïve café ✓"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:", add_special_tokens=False))
    pieces = [detok.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == tok.decode(ids)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers():
    llm = LLM(DEFAULT_MODEL, max_model_len=1024, kv_cache_tokens=4096)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(DEFAULT_MODEL), dtype=torch.float32).eval()
    prompts = PROMPTS[:3]
    expected = [hf_greedy(hf, llm.tokenizer, p, 20) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=20)
    assert [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts] == expected
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    chat = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=12),
        use_tqdm=False,
    )[0].outputs[0]
    assert "Paris" in chat.text


def test_min_tokens_equals_transformers_min_new_tokens():
    """On a chat whose greedy answer ends early, `min_tokens` holds back EOS as transformers' `min_new_tokens`
    does: the same tokens, past where the plain answer stopped."""
    llm = LLM(DEFAULT_MODEL, decoder="autoregressive", enforce_eager=True, kv_cache_tokens=2048)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(DEFAULT_MODEL), dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "Say hi."}]
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    short = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop"
    held = len(short.token_ids) + 6
    want = hf_greedy_ids(hf, llm.tokenizer, ids, held + 4, min_new_tokens=held)
    got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=held + 4, min_tokens=held), use_tqdm=False)
    assert got[0].outputs[0].token_ids == want and len(want) >= held


def test_async_engine_runs_all_torch_work_on_its_own_thread(tiny_model_dir):
    """The engine is built on the engine thread (not the caller's): a second thread running OpenMP work makes every
    CPU step pay OpenMP wake-ups. The injected clock, read while the engine is built, tells where that happened.
    Errors while building reach the caller."""
    import threading
    import time

    from leapserve.decoding import async_engine
    from leapserve.decoding.config import CacheConfig, EngineConfig, ModelConfig

    read_on = []

    def clock() -> float:
        read_on.append(threading.current_thread().name)
        return time.perf_counter()

    config = EngineConfig(model=ModelConfig(model=str(tiny_model_dir)), cache=CacheConfig(kv_cache_tokens=1024))
    engine = async_engine.AsyncLLMEngine(config, clock=clock)
    try:
        assert read_on and set(read_on) == {"leapserve-engine"} and engine.max_model_len > 0
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="unknown decoder"):
        async_engine.AsyncLLMEngine(EngineConfig(model=ModelConfig(model=str(tiny_model_dir)), decoder="nope"))


def test_prompt_logprobs_score_the_prompt_as_transformers_does(tiny_model_dir, tiny_llm, tiny_hf):
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, ignore_eos=True)
    out = tiny_llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, o in zip(PROMPTS, out):
        ids = tiny_llm.tokenizer.encode(prompt)
        assert o.prompt_token_ids == ids and len(o.prompt_logprobs) == len(ids) and o.prompt_logprobs[0] is None
        with torch.no_grad():
            want = torch.log_softmax(tiny_hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        for row, (token, entries) in enumerate(zip(ids[1:], o.prompt_logprobs[1:])):
            assert abs(entries[token].logprob - float(want[row, token])) < 1e-4
            top = torch.topk(want[row], 2).indices.tolist()
            assert [t for t, lp in sorted(entries.items(), key=lambda e: e[1].rank) if lp.rank <= 2] == top
    # chunked prefill, preemption, n = 2 and speculative decoding score each prompt once, the same
    spec = {"method": "draft_model", "model": str(tiny_model_dir), "tree": [2, 1], "adaptive": False}
    small = LLM(str(tiny_model_dir), kv_cache_tokens=128, max_model_len=96, speculative_config=spec)
    small.engine.config.scheduler.max_num_batched_tokens = 7
    got = small.generate(PROMPTS, dataclasses.replace(params, n=2, max_tokens=40), use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for g, o in zip(got, out):
        assert len(g.prompt_logprobs) == len(o.prompt_logprobs) and g.prompt_logprobs[0] is None
        for a, b in zip(g.prompt_logprobs[1:], o.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
