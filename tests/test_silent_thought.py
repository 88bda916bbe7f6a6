"""The silent-thought decoder on tiny random Llamas with random ST vectors and REMs: against transformers' modules fed
the same input embeddings (uncached, the whole sequence every step), against autoregressive decoding for the `direct`
and `cot` pathways, batched and chunked, jacobi against a direct re-implementation, the checkpoint format, errors,
and the HTTP API."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import httpx
import openai
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import save_tiny_llama
from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from leapserve.decoding.errors import InvalidRequestError
from leapserve.decoding.silent_thought import (
    SilentThought,
    SilentThoughtConfig,
    load_silent_thought,
    save_silent_thought,
    st_positions,
)
from test_server import API_KEY, MODEL, _free_port, served

K, HIDDEN, LAYERS = 4, 64, 2
SEP, ANSWER = "\n", " The answer is:"
PROMPTS = ["Q: Tom has 3 apples and buys 5 more. How many?", "Hello", "2 + 2 * 3 = ?"]
N = 8


def save_st_checkpoint(
    path: Path, tokenizer, *, rem_mode: str = "layer_adapter", zero_rem: bool = False, iterations: int = 0
) -> Path:
    """A tiny random Llama plus random ST vectors and REM (`up` left at zero with `zero_rem`)."""
    save_tiny_llama(path, tokenizer)
    config = SilentThoughtConfig(K, SEP, ANSWER, rem_mode=rem_mode, rem_rank=8, jacobi_iterations=iterations)
    torch.manual_seed(1)
    module = SilentThought(config, HIDDEN, LAYERS)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 2 and not (zero_rem and name.endswith("up.weight")):
                p.normal_(0, 0.2)
    save_silent_thought(path, module, config)
    return path


@pytest.fixture(scope="module")
def zero_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_st_checkpoint(tmp_path_factory.mktemp("st-zero"), smollm2_tokenizer, zero_rem=True)


@pytest.fixture(scope="module")
def rem_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_st_checkpoint(tmp_path_factory.mktemp("st-rem"), smollm2_tokenizer)


@pytest.fixture(scope="module")
def jacobi_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_st_checkpoint(tmp_path_factory.mktemp("st-jacobi"), smollm2_tokenizer, rem_mode="jacobi", iterations=2)


def make_llm(path: Path, decoder: str = "silent-thought", max_num_batched_tokens: int = 2048) -> LLM:
    return LLM(
        config=EngineConfig(
            model=ModelConfig(model=str(path), model_impl="transformers", enforce_eager=True),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens),
            decoder=decoder,
        )
    )


def greedy(reasoning: str | None = None, **kw) -> SamplingParams:
    extra = None if reasoning is None else {"reasoning": reasoning}
    return SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, extra_args=extra, **kw)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def question(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens as `LLM.generate` encodes it, then the separator's (each on its own)."""
    return tokenizer.encode(prompt) + ids(tokenizer, SEP)


class Reference:
    """transformers' model (eager attention) with the checkpoint's ST module installed, decoding greedily by
    re-running the whole sequence from input embeddings every step."""

    def __init__(self, path: Path):
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model.set_attn_implementation("eager")
        loaded = load_silent_thought(path, HIDDEN, LAYERS, "cpu", torch.float32)
        assert loaded is not None
        self.config, self.st = loaded
        self.st.install(self.model)

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor(token_ids))

    def st_prefix(self, tokenizer, prompt: str, z: torch.Tensor | None = None) -> torch.Tensor:
        """`[L, d]`: the question and separator's embeddings, the ST vectors (or `z`), the answer prompt's."""
        z = self.st.embeddings if z is None else z
        return torch.cat([self.embed(question(tokenizer, prompt)), z, self.embed(ids(tokenizer, ANSWER))])

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor, st_rows: range | None) -> torch.Tensor:
        """Last-position logits `[V]` of the whole sequence `embeds` `[L, d]`, REM hooks on at `st_rows`."""
        mask = torch.zeros(1, len(embeds), dtype=torch.bool)
        if st_rows is not None:
            mask[0, list(st_rows)] = True
        with st_positions(mask) if st_rows is not None else nullcontext():
            return self.model(inputs_embeds=embeds[None]).logits[0, -1]

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, st_rows: range | None, n: int = N) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            out.append(int(self.logits(embeds, st_rows).argmax()))
            embeds = torch.cat([embeds, self.embed(out[-1:])])
        return out


def st_rows(tokenizer, prompt: str) -> range:
    start = len(question(tokenizer, prompt))
    return range(start, start + K)


def test_config_validation_and_checkpoint_round_trip(rem_dir, tiny_model_dir):
    config = SilentThoughtConfig(6, "\n", " The answer is:", rem_layers=[0, 3])
    assert SilentThoughtConfig.from_dict(config.to_dict()) == config
    for bad, message in (
        ({"num_thoughts": 0}, "num_thoughts"),
        ({"rem_mode": "lstm"}, "rem_mode"),
        ({"rem_mode": "jacobi"}, "jacobi_iterations"),
        ({"jacobi_iterations": 2}, "jacobi_iterations"),
        ({"rem_layers": []}, "rem_layers"),
        ({"reasoning": "think"}, "reasoning"),
        ({"rem_norm": "batchnorm"}, "rem_norm"),
        ({"colour": 1}, "unknown keys"),
    ):
        with pytest.raises(ValueError, match=message):
            SilentThoughtConfig.from_dict({**config.to_dict(), **bad})
    with pytest.raises(ValueError, match="missing keys"):
        SilentThoughtConfig.from_dict({"num_thoughts": 4})
    with pytest.raises(ValueError, match="exceed"):
        SilentThought(config, HIDDEN, 2)

    loaded = load_silent_thought(rem_dir / "config.json", HIDDEN, LAYERS, "cpu", torch.float32)
    assert loaded is not None
    st_config, module = loaded
    assert st_config == SilentThoughtConfig(K, SEP, ANSWER, rem_rank=8)
    assert set(module.adapters) == {"0", "1"} and module.jacobi is None
    assert json.loads((rem_dir / "config.json").read_text())["silent_thought"] == st_config.to_dict()
    assert load_silent_thought(tiny_model_dir, HIDDEN, LAYERS, "cpu", torch.float32) is None
    with pytest.raises(ValueError, match="built for"):
        save_silent_thought(rem_dir, module, SilentThoughtConfig(K + 1, SEP, ANSWER, rem_rank=8))


def test_adapter_hook_acts_at_st_positions_only():
    """`h + up(gelu(down(norm(h))))` on the masked rows of a layer's output; other rows and an unmasked forward are
    untouched; a fresh module (up = 0) is the identity."""

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Identity(), nn.Identity()])

    config = SilentThoughtConfig(2, "", "", rem_rank=4, rem_layers=[1])
    module, model = SilentThought(config, 8, 2), Layers()
    handles = module.install(model)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1], mask[1, 3] = True, True
    with st_positions(mask):
        assert torch.equal(model.layers[1](x), x)  # up = 0
        nn.init.normal_(module.adapters["1"].up.weight)
        out = model.layers[1](x)
        assert torch.equal(model.layers[0](x), x)  # no adapter on layer 0
    adapter = module.adapters["1"]
    expected = x.clone()
    expected[mask] = x[mask] + adapter.up(nn.functional.gelu(adapter.down(adapter.norm(x[mask]))))
    torch.testing.assert_close(out, expected)
    assert torch.equal(model.layers[1](x), x)  # outside st_positions
    for h in handles:
        h.remove()


def test_zero_rem_equals_base_model_fed_the_same_embeddings(zero_dir, smollm2_tokenizer):
    llm = make_llm(zero_dir)
    base = AutoModelForCausalLM.from_pretrained(zero_dir, dtype=torch.float32).eval()  # no hooks
    ref = Reference(zero_dir)
    for prompt in PROMPTS:
        out = llm.generate(prompt, greedy(logprobs=5), use_tqdm=False)[0]
        embeds = ref.st_prefix(smollm2_tokenizer, prompt)
        with torch.no_grad():
            logp = torch.log_softmax(base(inputs_embeds=embeds[None]).logits[0, -1], -1)
        first = out.outputs[0].logprobs[0]
        assert set(first) >= set(logp.topk(5).indices.tolist())
        for token, lp in first.items():
            assert lp.logprob == pytest.approx(float(logp[token]), abs=1e-4)
        assert out.outputs[0].token_ids == ref.greedy(embeds, None)
        assert len(out.prompt_token_ids) == len(embeds)


def test_rem_prefill_then_cached_decoding_equals_uncached_forwards(rem_dir, smollm2_tokenizer):
    """With a non-zero REM, greedy tokens equal the uncached reference (whole sequence, REM at the ST rows) token for
    token, alone, batched, and with chunked prefill (3 tokens a step: the ST region split across steps)."""
    ref = Reference(rem_dir)
    prefix = ref.st_prefix(smollm2_tokenizer, PROMPTS[0])
    rows = st_rows(smollm2_tokenizer, PROMPTS[0])
    assert not torch.allclose(ref.logits(prefix, rows), ref.logits(prefix, None))  # the REM matters
    expected = [ref.greedy(ref.st_prefix(smollm2_tokenizer, p), st_rows(smollm2_tokenizer, p)) for p in PROMPTS]
    llm = make_llm(rem_dir)
    outs = [llm.generate(p, greedy(), use_tqdm=False)[0] for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert [o.metrics.sequential_forwards for o in outs] == [N] * len(PROMPTS)  # 1 prefill + N - 1 decode steps
    batched = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == expected
    chunked = make_llm(rem_dir, max_num_batched_tokens=3).generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in chunked] == expected


def test_mixed_pathways_batched_equal_alone_and_autoregressive(rem_dir, smollm2_tokenizer):
    """`direct` is autoregressive decoding of prompt + separator + answer prompt, `cot` of prompt + separator (the
    checkpoint's base model); a batch mixing all three pathways equals each request alone."""
    llm = make_llm(rem_dir)
    work = [(p, r) for p in PROMPTS for r in ("st", "cot", "direct")]
    alone = [llm.generate(p, greedy(r), use_tqdm=False)[0].outputs[0].token_ids for p, r in work]
    batched = llm.generate([p for p, _ in work], [greedy(r) for _, r in work], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == alone
    assert llm.generate(PROMPTS[0], greedy(), use_tqdm=False)[0].outputs[0].token_ids == alone[0]  # default: st

    ar = make_llm(rem_dir, decoder="autoregressive")
    tok = smollm2_tokenizer
    for (p, r), tokens in zip(work, alone):
        if r == "st":
            continue
        prompt = question(tok, p) + (ids(tok, ANSWER) if r == "direct" else [])
        assert ar.generate(prompt, greedy(), use_tqdm=False)[0].outputs[0].token_ids == tokens, (p, r)
        assert llm.generate(p, greedy(r), use_tqdm=False)[0].prompt_token_ids == prompt


def test_jacobi_equals_a_direct_reimplementation(jacobi_dir, smollm2_tokenizer):
    """R = 2: z_1 = z_0 + mlp(h_0), z_2 = z_0 + mlp(h_1) from the final-norm hidden states at the ST positions of
    the question, separator and ST vectors; then the answer prompt and greedy decoding over z_2. Alone, batched with
    other pathways, and chunked (3 tokens a step, so the ST region is computed over several steps)."""
    ref = Reference(jacobi_dir)
    tok = smollm2_tokenizer
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            q = ref.embed(question(tok, p))
            z0 = ref.st.embeddings
            z = z0
            for _ in range(2):
                h = ref.model.model(inputs_embeds=torch.cat([q, z])[None]).last_hidden_state[0, len(q) :]
                z = z0 + ref.st.jacobi(h)
            expected.append(ref.greedy(torch.cat([q, z, ref.embed(ids(tok, ANSWER))]), None))
    llm = make_llm(jacobi_dir)
    outs = [llm.generate(p, greedy(), use_tqdm=False)[0] for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in outs] == expected
    # the prefill step: the prompt, 2 passes of the ST positions, the answer prompt; then N - 1 decode steps
    assert [o.metrics.sequential_forwards for o in outs] == [N + 3] * len(PROMPTS)
    batched = llm.generate(PROMPTS * 2, [greedy("st")] * 3 + [greedy("direct")] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched[:3]] == expected
    direct = [llm.generate(p, greedy("direct"), use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in batched[3:]] == direct
    chunked = make_llm(jacobi_dir, max_num_batched_tokens=3).generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in chunked] == expected


@pytest.mark.parametrize("checkpoint", ["rem_dir", "jacobi_dir"])
def test_preempted_requests_recompute_the_same_tokens(request, checkpoint):
    """A KV cache too small for the batch (preemption drops a sequence's cache; it is recomputed, ST region and
    jacobi passes included) and 3-token prefill chunks: the tokens of each request alone."""
    path = request.getfixturevalue(checkpoint)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [make_llm(path).generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    llm = LLM(
        config=EngineConfig(
            model=ModelConfig(model=str(path), enforce_eager=True),
            cache=CacheConfig(kv_cache_tokens=96),
            scheduler=SchedulerConfig(max_num_batched_tokens=3),
            decoder="silent-thought",
        )
    )
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.scheduler.num_preemptions > 0


def test_errors(rem_dir, tiny_model_dir):
    llm = make_llm(rem_dir)
    for params, param in (
        (SamplingParams(extra_args={"reasoning": "think"}), "reasoning"),
        (SamplingParams(extra_args={"reasoning": 1}), "reasoning"),
        (SamplingParams(prompt_logprobs=1), "prompt_logprobs"),
    ):
        with pytest.raises(InvalidRequestError) as e:
            llm.engine.add_request("r", [1, 2, 3], params)
        assert e.value.param == param
    with pytest.raises(InvalidRequestError, match="maximum context length") as e:  # the expanded prompt counts
        llm.engine.validate_prompt([1] * (1024 - K - 2), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="needs a silent-thought checkpoint"):
        make_llm(tiny_model_dir)
    with pytest.raises(ValueError, match="--model-impl transformers"):
        LLM(str(rem_dir), decoder="silent-thought", model_impl="leapserve")


def test_http_api_with_streaming(rem_dir, tmp_path):
    llm = make_llm(rem_dir)
    expected = llm.generate(PROMPTS[0], greedy(), use_tqdm=False)[0].outputs[0]
    direct = llm.generate(PROMPTS[0], greedy("direct"), use_tqdm=False)[0].outputs[0]
    assert expected.text != direct.text
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "leapserve.cli", "serve", "--model", str(rem_dir), "--served-model-name", MODEL]
    cmd += ["--port", str(port), "--api-key", API_KEY, "--decoder", "silent-thought", "--enforce-eager"]
    with served(
        cmd, port, tmp_path / "server.log", env=dict(os.environ), cwd=Path(__file__).parent, startup_timeout=120
    ):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
        body = {"ignore_eos": True}
        out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=N, temperature=0, extra_body=body)
        assert out.choices[0].text == expected.text and out.usage.completion_tokens == N
        stream = client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=N, temperature=0, stream=True, extra_body=body
        )
        pieces = [c.choices[0].text for c in stream if c.choices]
        assert "".join(pieces) == expected.text and len(pieces) > 1
        out = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=N,
            temperature=0,
            extra_body={**body, "vllm_xargs": {"reasoning": "direct"}},
        )
        assert out.choices[0].text == direct.text
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "vllm_xargs": {"reasoning": "think"}},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning", r.text
