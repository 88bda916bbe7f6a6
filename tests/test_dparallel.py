"""The dparallel decoder on tiny random masked diffusion LMs: against direct re-implementations of LLaDA's published
`generate` loop and dParallel's entropy rule (run on transformers' modules, bidirectionally), batching, preemption,
per-request settings, stop conditions, the HTTP API and its errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from conftest import save_tiny_llama
from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.diffusion import DiffusionConfig
from test_server import API_KEY, MODEL, _free_port, served

GEN, BLOCK = 16, 4
PROMPTS = ["The quick brown fox", "Hello", "Diffusion models decode in parallel, they say"]


def save_tiny_mdm(path: Path, tokenizer, *, logits_shift: bool = False, seed: int = 0) -> Path:
    """A tiny random Llama marked as a masked diffusion LM (its last vocabulary id is the mask)."""
    save_tiny_llama(path, tokenizer, seed=seed)
    config = json.loads((path / "config.json").read_text())
    config["diffusion_lm"] = {"mask_token_id": config["vocab_size"] - 1, "logits_shift": logits_shift}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def mdm_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_tiny_mdm(tmp_path_factory.mktemp("tiny-mdm"), smollm2_tokenizer)


@pytest.fixture(scope="module")
def shifted_mdm_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_tiny_mdm(tmp_path_factory.mktemp("tiny-mdm-shift"), smollm2_tokenizer, logits_shift=True, seed=1)


@pytest.fixture(scope="module")
def hf_mdm(mdm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mdm_dir, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    return model


def bidirectional_logits(model, x: torch.Tensor) -> torch.Tensor:
    """`[n, V]` logits of transformers' model over `x` `[n]` with nothing masked (an all-zero additive mask)."""
    n = len(x)
    with torch.no_grad():
        return model(x[None], attention_mask=torch.zeros(1, 1, n, n)).logits[0].float()


def llada_generate(model, prompt: list[int], steps: int, gen_length: int, block_length: int, mask_id: int):
    """LLaDA's published `generate` (greedy, low-confidence remasking, no classifier-free guidance), restated."""
    x = torch.tensor(prompt + [mask_id] * gen_length)
    num_blocks = gen_length // block_length
    steps //= num_blocks
    for b in range(num_blocks):
        block_masked = (x[len(prompt) + b * block_length : len(prompt) + (b + 1) * block_length] == mask_id).sum()
        base, rem = divmod(int(block_masked), steps)
        counts = [base + (i < rem) for i in range(steps)]
        for i in range(steps):
            mask_index = x == mask_id
            logits = bidirectional_logits(model, x)
            x0 = logits.argmax(-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = p.gather(-1, x0[:, None])[:, 0]
            x0_p[len(prompt) + (b + 1) * block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-np.inf))
            select = torch.topk(confidence, k=counts[i]).indices
            x[select] = x0[select]
    return x[len(prompt) :].tolist()


def entropy_generate(model, prompt: list[int], gen_length: int, block_length: int, mask_id: int, threshold: float):
    """dParallel's rule restated: per step, commit the lowest-entropy masked token of the block and every one with
    entropy <= threshold. Returns the canvas and the number of steps."""
    x = torch.tensor(prompt + [mask_id] * gen_length)
    steps = 0
    for b in range(gen_length // block_length):
        lo = len(prompt) + b * block_length
        while (block := (x[lo : lo + block_length] == mask_id).nonzero()[:, 0] + lo).numel():
            logits = bidirectional_logits(model, x)[block].double()
            p = torch.softmax(logits, -1)
            h = -(p * p.clamp_min(1e-300).log()).sum(-1)
            commit = (h <= threshold) | (h == h.min())
            x[block[commit]] = logits.argmax(-1)[commit]
            steps += 1
    return x[len(prompt) :].tolist(), steps


def make_llm(model_dir: Path, **diffusion) -> LLM:
    return LLM(
        str(model_dir),
        decoder="dparallel",
        diffusion_config={"gen_length": GEN, "block_length": BLOCK, **diffusion},
        enforce_eager=True,
        model_impl="transformers",
    )


def full_canvas(**extra) -> SamplingParams:
    return SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True, extra_args=extra or None)


def test_confidence_rule_equals_llada_generate(mdm_dir, hf_mdm, smollm2_tokenizer):
    llm = make_llm(mdm_dir, rule="confidence")
    mask_id = llm.engine.decoder.spec.mask_token_id
    for steps in (GEN, GEN // 2):
        outs = llm.generate(PROMPTS, full_canvas(diffusion_steps=steps), use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            ids = smollm2_tokenizer(prompt)["input_ids"]
            assert out.outputs[0].token_ids == llada_generate(hf_mdm, ids, steps, GEN, BLOCK, mask_id)
            assert out.metrics.denoising_steps == steps


@pytest.mark.parametrize("threshold", [0.0, 9.5, 20.0])
def test_entropy_rule_equals_the_rule_restated(mdm_dir, hf_mdm, smollm2_tokenizer, threshold):
    llm = make_llm(mdm_dir, rule="entropy", threshold=threshold)
    mask_id = llm.engine.decoder.spec.mask_token_id
    outs = llm.generate(PROMPTS, full_canvas(), use_tqdm=False)
    all_steps = []
    for prompt, out in zip(PROMPTS, outs):
        canvas, steps = entropy_generate(hf_mdm, smollm2_tokenizer(prompt)["input_ids"], GEN, BLOCK, mask_id, threshold)
        assert out.outputs[0].token_ids == canvas
        assert out.metrics.denoising_steps == steps
        all_steps.append(steps)
    if threshold == 0.0:  # one token per step
        assert all_steps == [GEN] * len(PROMPTS)
    if threshold == 20.0:  # above log(V): a block per step
        assert all_steps == [GEN // BLOCK] * len(PROMPTS)


def test_shifted_logits_read_the_previous_row(shifted_mdm_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shifted_mdm_dir, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    llm = make_llm(shifted_mdm_dir, rule="entropy", threshold=0.0)
    mask_id = llm.engine.decoder.spec.mask_token_id

    class Shifted(torch.nn.Module):  # Dream's convention applied to the reference: row j - 1 predicts position j
        def forward(self, x, attention_mask):
            logits = model(x, attention_mask=attention_mask).logits
            return type("Out", (), {"logits": torch.cat([logits[:, :1], logits[:, :-1]], dim=1)})

    out = llm.generate(PROMPTS[:2], full_canvas(), use_tqdm=False)
    for prompt, o in zip(PROMPTS[:2], out):
        canvas, _ = entropy_generate(Shifted(), smollm2_tokenizer(prompt)["input_ids"], GEN, BLOCK, mask_id, 0.0)
        assert o.outputs[0].token_ids == canvas


def test_batched_equals_one_at_a_time(mdm_dir):
    """Requests with their own settings decode together (continuous batching, each at its own block), also when a KV
    cache too small for all of them admits them as others finish; outputs equal each request decoded alone."""
    variants = [
        {},
        {"diffusion_rule": "fixed", "diffusion_k": 3},
        {"diffusion_threshold": 4.0},
        {"diffusion_cache": "prefix"},
    ]
    prompts = PROMPTS + ["One more prompt to decode"]
    llm = make_llm(mdm_dir, threshold=1.0)
    alone = [
        llm.generate(p, full_canvas(**v), use_tqdm=False)[0].outputs[0].token_ids for p, v in zip(prompts, variants)
    ]
    batched = llm.generate(prompts, [full_canvas(**v) for v in variants], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == alone
    small = LLM(
        str(mdm_dir),
        decoder="dparallel",
        diffusion_config={"gen_length": GEN, "block_length": BLOCK, "threshold": 1.0},
        enforce_eager=True,
        model_impl="transformers",
        kv_cache_tokens=96,
        block_size=16,
        max_model_len=48,
    )
    queued = small.generate(prompts, [full_canvas(**v) for v in variants], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in queued] == alone


def cached_generate(model, prompt: list[int], gen_length: int, block_length: int, mask_id: int, cache: str):
    """Fast-dLLM's caches restated on transformers' KV cache, one token per step by lowest entropy: each block starts
    with a full forward whose K/V are kept for the tokens before the block (`prefix`, later steps run the block and
    everything after it) or before and after it (`dual`, later steps run the block alone)."""
    from transformers import DynamicCache

    def run(ids, pos, past=None):
        n_past = 0 if past is None else past.get_seq_length()
        mask = torch.zeros(1, 1, len(ids), n_past + len(ids))
        with torch.no_grad():
            out = model(ids[None], position_ids=pos[None], cache=past, attention_mask=mask, use_cache=True)
        return out.logits[0].double(), out.past_key_values

    x, p, n = torch.tensor(prompt + [mask_id] * gen_length), len(prompt), len(prompt) + gen_length
    for s in range(p, n, block_length):
        e = s + block_length
        _, full = run(x, torch.arange(n))
        keep = list(range(s)) + (list(range(e, n)) if cache == "dual" else [])
        first = True
        while (masked := (x[s:e] == mask_id).nonzero()[:, 0] + s).numel():
            if first:  # the block's first step is the full forward
                logits, first = run(x, torch.arange(n))[0], False
                rows = logits[masked]
            else:
                past = DynamicCache()
                for i, layer in enumerate(full.layers):
                    past.update(layer.keys[:, :, keep], layer.values[:, :, keep], i)
                hi = e if cache == "dual" else n
                logits, _ = run(x[s:hi], torch.arange(s, hi), past)
                rows = logits[masked - s]
            prob = torch.softmax(rows, -1)
            entropy = -(prob * prob.clamp_min(1e-300).log()).sum(-1)
            i = int(entropy.argmin())
            x[masked[i]] = rows[i].argmax()
    return x[p:].tolist()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_decoding_equals_fast_dllm_caches(mdm_dir, hf_mdm, smollm2_tokenizer, cache):
    llm = make_llm(mdm_dir, threshold=0.0, cache=cache)
    mask_id = llm.engine.decoder.spec.mask_token_id
    outs = llm.generate(PROMPTS, full_canvas(), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = smollm2_tokenizer(prompt)["input_ids"]
        assert out.outputs[0].token_ids == cached_generate(hf_mdm, ids, GEN, BLOCK, mask_id, cache)
        assert out.metrics.denoising_steps == GEN


def test_stops_and_limits(mdm_dir, smollm2_tokenizer):
    llm = make_llm(mdm_dir, threshold=1.0)
    whole = llm.generate(PROMPTS[0], full_canvas(), use_tqdm=False)[0]
    full = whole.outputs[0]
    short = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert short[0].outputs[0].token_ids == full.token_ids[:5] and short[0].outputs[0].finish_reason == "length"
    assert short[0].metrics.denoising_steps < whole.metrics.denoising_steps  # decoding ends with the output
    long = llm.generate(PROMPTS[0], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), use_tqdm=False)
    assert long[0].outputs[0].token_ids == full.token_ids and long[0].outputs[0].finish_reason == "length"
    stop_id = full.token_ids[6]
    first = full.token_ids.index(stop_id)
    stopped = llm.generate(
        PROMPTS[0], SamplingParams(max_tokens=GEN, temperature=0, stop_token_ids=[stop_id]), use_tqdm=False
    )
    assert stopped[0].outputs[0].token_ids == full.token_ids[: first + 1]
    assert stopped[0].outputs[0].finish_reason == "stop"
    text = smollm2_tokenizer.decode(full.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    by_string = llm.generate(
        PROMPTS[0], SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True, stop=[stop]), use_tqdm=False
    )
    assert by_string[0].outputs[0].text == text[: text.index(stop)]


def test_sampling_is_seeded(mdm_dir):
    llm = make_llm(mdm_dir, threshold=1.0)
    params = [SamplingParams(max_tokens=GEN, temperature=1.0, ignore_eos=True, seed=s) for s in (1, 1, 2)]
    a, b, c = (o.outputs[0].token_ids for o in llm.generate([PROMPTS[0]] * 3, params, use_tqdm=False))
    greedy = llm.generate(PROMPTS[0], full_canvas(), use_tqdm=False)[0].outputs[0].token_ids
    assert a == b and a != c and greedy not in (a, c)


def test_configuration_errors(mdm_dir, tiny_model_dir):
    from leapserve.decoding.errors import InvalidRequestError

    with pytest.raises(ValueError, match="masked diffusion LM"):
        LLM(str(tiny_model_dir), decoder="dparallel", enforce_eager=True)
    with pytest.raises(ValueError, match="--decoder dparallel"):
        LLM(str(mdm_dir), decoder="autoregressive", enforce_eager=True)
    with pytest.raises(ValueError, match="multiple of block_length"):
        DiffusionConfig.from_dict({"gen_length": 10, "block_length": 4})
    with pytest.raises(ValueError, match="unknown keys"):
        DiffusionConfig.from_dict({"treshold": 0.5})
    llm = LLM(str(mdm_dir), diffusion_config={"gen_length": GEN, "block_length": BLOCK}, enforce_eager=True)
    assert llm.engine.decoder_name == "dparallel"  # the default decoder of a diffusion LM
    for params, param in (
        (SamplingParams(logprobs=2), "logprobs"),
        (SamplingParams(repetition_penalty=1.2), "repetition_penalty"),
        (SamplingParams(top_p=0.5), "top_p"),
        (SamplingParams(extra_args={"diffusion_gen_length": 2 * GEN}), "diffusion_gen_length"),
        (SamplingParams(extra_args={"diffusion_rule": "best"}), "diffusion_rule"),
        (SamplingParams(extra_args={"diffusion_foo": 1}), "diffusion_foo"),
    ):
        with pytest.raises(InvalidRequestError) as e:
            llm.engine.add_request("r", [1, 2, 3], params)
        assert e.value.param == param


def test_http_api_with_streaming(mdm_dir, tmp_path):
    config = json.dumps({"gen_length": GEN, "block_length": BLOCK, "threshold": 1.0})
    expected = make_llm(mdm_dir, threshold=1.0).generate(PROMPTS[0], full_canvas(), use_tqdm=False)[0].outputs[0]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "leapserve.cli", "serve", "--model", str(mdm_dir), "--served-model-name", MODEL]
    cmd += ["--port", str(port), "--api-key", API_KEY, "--diffusion-config", config, "--enforce-eager"]
    with served(
        cmd, port, tmp_path / "server.log", env=dict(os.environ), cwd=Path(__file__).parent, startup_timeout=120
    ):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
        out = client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=GEN, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].text == expected.text and out.usage.completion_tokens == GEN
        stream = client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=GEN, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        pieces = [c.choices[0].text for c in stream if c.choices]
        assert "".join(pieces) == expected.text and len(pieces) > 1
        one_step = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=GEN,
            temperature=0,
            extra_body={"ignore_eos": True, "vllm_xargs": {"diffusion_threshold": 0.0}},
        )
        assert one_step.choices[0].text != "" and one_step.usage.completion_tokens == GEN
        for body, param in (
            ({"vllm_xargs": {"diffusion_block_length": 3}}, "diffusion_gen_length"),
            ({"vllm_xargs": {"diffusion_rule": "x"}}, "diffusion_rule"),
            ({"logprobs": 2}, "logprobs"),
        ):
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 4, **body},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        metrics = httpx.get(f"{url}/metrics").text
        steps = [
            line for line in metrics.splitlines() if line.startswith("leapserve:diffusion_num_denoising_steps_total")
        ]
        committed = [
            line for line in metrics.splitlines() if line.startswith("leapserve:diffusion_num_committed_tokens_total")
        ]
        assert float(steps[0].split()[-1]) >= 3 and float(committed[0].split()[-1]) >= 3 * GEN


def test_checkpoint_decoding_defaults(tmp_path, smollm2_tokenizer):
    """A checkpoint's `diffusion_lm.decoding` is the server default; --diffusion-config overrides it key by key."""
    path = save_tiny_mdm(tmp_path / "mdm", smollm2_tokenizer)
    config = json.loads((path / "config.json").read_text())
    config["diffusion_lm"]["decoding"] = {"gen_length": 8, "block_length": 4, "threshold": 0.1}
    (path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(path), enforce_eager=True)
    assert llm.engine.decoder.diffusion == DiffusionConfig(gen_length=8, block_length=4, threshold=0.1)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
    llm = LLM(str(path), diffusion_config={"block_length": 2}, enforce_eager=True)
    assert llm.engine.decoder.diffusion == DiffusionConfig(gen_length=8, block_length=2, threshold=0.1)
