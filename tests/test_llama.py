"""leapserve's own Llama-family decoder (`decoding/llama.py`, eager and compiled) against transformers' modules:
prepacked GEMMs equal plain ones within rounding, logits within a stated tolerance, greedy output equal to
transformers' `generate` on the suite's prompts, architectures it covers (biases, Qwen2) and refuses, and
speculative decoding on the compiled path equal to plain decoding on it, token for token."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.kv_cache import PagedKVCache
from leapserve.decoding.model_loader import cache_dir, resolve_model
from leapserve.decoding.runner import ModelRunner, SeqChunk
from leapserve.decoding.step_buffers import StepBuffers
from leapserve.kernels import cpu_ops
from leapserve.kernels.packed_linear import PackedLinear, packable
from test_speculative import PROMPTS, SMOLLM2

# |logit difference| bound between leapserve's Llama and transformers' modules, relative to the largest |logit|:
# fused, prepacked fp32 GEMMs sum in another order (measured 2-4e-6 relative on SmolLM2)
LOGIT_RTOL = 1e-4


@pytest.mark.skipif(not packable(torch.zeros(2, 2)), reason="no oneDNN on this CPU build")
@pytest.mark.parametrize("rows", [1, 3, 16, 33, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(rows, bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(96, 80), torch.randn(rows, 80)
    b = torch.randn(96) if bias else None
    lin = PackedLinear(weight, b)
    copy, k_major = cpu_ops.packed_copy(lin.handle)
    assert copy is lin.packed and k_major == lin.k_major
    torch.testing.assert_close(lin(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    shared = PackedLinear(lin.weight)  # a weight shared by two models is packed once, freed with its last user
    handle, packed = lin.handle, lin.packed
    assert shared.handle == handle and shared.packed is packed and shared.k_major == lin.k_major
    del lin
    assert cpu_ops.packed_copy(handle)[0] is packed
    torch.testing.assert_close(shared(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    del shared
    assert cpu_ops.packed_copy(handle) is None


def test_step_buffers_hand_out_views_of_kept_buffers_and_grow():
    buffers = StepBuffers(torch.device("cpu"), capacity=4)
    first = buffers.put("ids", [3, 1, 2], torch.int64)
    assert first.tolist() == [3, 1, 2] and first.dtype == torch.int64
    again = buffers.put("ids", [7], torch.int64)
    assert again.tolist() == [7] and again.data_ptr() == first.data_ptr()  # the same memory, rewritten
    table = buffers.put("tables", list(range(6)), torch.int32, (2, 3))
    assert table.tolist() == [[0, 1, 2], [3, 4, 5]] and table.dtype == torch.int32 and table.is_contiguous()
    grown = buffers.put("ids", list(range(9)), torch.int64)  # beyond capacity: a larger buffer
    assert grown.tolist() == list(range(9))
    assert buffers.put("ids", [], torch.int64).numel() == 0


def runner_logits(model, impl: str, prompts: list[list[int]], compile: bool = False) -> torch.Tensor:
    """Last-position logits of a one-step prefill of `prompts` (then of one more token each), through the runner."""
    c = model.config
    cache = PagedKVCache(c.num_hidden_layers, 64, 16, c.num_key_value_heads, c.head_dim, torch.float32, "cpu")
    runner = ModelRunner(model, cache, torch.device("cpu"), model_impl=impl, compile=compile)
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    prefill = runner.execute([SeqChunk(t, 0, p, [len(p) - 1]) for t, p in zip(tables, prompts)])
    decode = runner.execute([SeqChunk(t, len(p), [p[0]], [0]) for t, p in zip(tables, prompts)])
    return torch.cat([prefill, decode])


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got - want).abs().max() <= LOGIT_RTOL * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    """A loader of fresh SmolLM2 models (runners rewire the one they run), and the suite's prompts as ids."""
    path = resolve_model(SMOLLM2)
    return (lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()), [
        smollm2_tokenizer.encode(p) for p in PROMPTS
    ]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_smollm2_logits_within_tolerance(smollm2, compile):
    load, prompts = smollm2
    want = runner_logits(load(), "transformers", prompts)
    assert_logits_close(runner_logits(load(), "leapserve", prompts, compile), want)


@pytest.mark.parametrize(
    "impl", ["transformers", "leapserve", pytest.param("leapserve-compiled", marks=pytest.mark.slow)]
)
def test_greedy_equals_transformers_generate(smollm2, impl):
    """On every prompt of the suite, 24 greedy tokens equal transformers' generate: exactly by construction for
    transformers' modules, and on these prompts for leapserve's Llama (docs/compile.md says where a token could
    differ)."""
    load, prompts = smollm2
    model = load()
    llm = LLM(
        SMOLLM2, decoder="autoregressive", model_impl=impl.split("-")[0], enforce_eager=not impl.endswith("compiled")
    )
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for ids, g in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0, min_new_tokens=24
            )
        assert out[0, len(ids) :].tolist() == g


def tiny(cls, config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **extra,
    )  # fmt: skip
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny(LlamaForCausalLM, LlamaConfig),
        lambda: tiny(LlamaForCausalLM, LlamaConfig, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
        lambda: tiny(LlamaForCausalLM, LlamaConfig, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        lambda: tiny(Qwen2ForCausalLM, Qwen2Config),
    ],
    ids=["llama", "llama-biases", "llama-linear-rope", "qwen2"],
)
def test_architectures_it_covers(build):
    prompts = [[5, 17, 200, 3, 9], [250, 1], [7] * 30]
    want = runner_logits(build(), "transformers", prompts)
    assert_logits_close(runner_logits(build(), "leapserve", prompts), want)


def test_what_it_does_not_cover_runs_on_transformers_modules():
    model = tiny(LlamaForCausalLM, LlamaConfig, hidden_act="gelu")
    c = model.config
    cache = PagedKVCache(c.num_hidden_layers, 8, 16, c.num_key_value_heads, c.head_dim, torch.float32, "cpu")
    assert ModelRunner(model, cache, torch.device("cpu"), model_impl="auto").llama is None
    with pytest.raises(ValueError, match="activation gelu"):
        ModelRunner(model, cache, torch.device("cpu"), model_impl="leapserve")


@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
def test_speculation_equals_plain_decoding_on_the_same_path(tiny_model_dir, eager):
    """The lossless guarantee where it is defined: speculative == plain decoding of the same engine, token for
    token, on leapserve's Llama compiled and eager."""
    prompts = PROMPTS[:4]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(str(tiny_model_dir), enforce_eager=eager, kv_cache_tokens=2048)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    spec = {"method": "draft_model", "model": str(tiny_model_dir), "tree": [2, 2, 1], "adaptive": False}
    fast = LLM(str(tiny_model_dir), enforce_eager=eager, kv_cache_tokens=2048, speculative_config=spec)
    runner = fast.engine.runner
    assert runner.llama is not None and (runner._llama_forward is runner.llama) == eager
    outs = fast.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert sum(o.metrics.accepted_tokens for o in outs) > 0


def own_gemm_rows(dtype: torch.dtype) -> int:
    """The most rows of `dtype` SmolLM2's GEMMs run through the C++ op's own code (every row count alike)."""
    cpu_ops.load(cache_dir() / "extensions")
    return cpu_ops.own_rows(dtype, 576, 1536)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_draft_trees_nodes_get_the_bits_of_tokens_decoded_one_at_a_time(dtype):
    """Compiled SmolLM2: the tokens of a draft tree's path, verified at once with their siblings (nine tokens: the
    CPU tree of eight), give the logits they give decoded one at a time, bit for bit. So greedy speculation commits
    what plain decoding would, even where logits tie (bf16 ties often): in fp32, and in bf16 where the GEMMs' own
    code takes nine rows (AMX)."""
    if own_gemm_rows(dtype) < 9:
        pytest.skip(f"{dtype}: nine rows go through oneDNN here, whose sums depend on the row count")
    llm = LLM(SMOLLM2, decoder="autoregressive", dtype=str(dtype).removeprefix("torch."), kv_cache_tokens=512)
    runner = llm.engine.runner
    prompt = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it ran " * 4)
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 6]  # node i's parent; the path 0 -> 1 -> 3 -> 6 -> 8
    tokens, path = [284, 253, 1513, 30, 357, 2341, 4033, 314, 9], [0, 1, 3, 6, 8]
    depth, mask = [0] * 9, torch.eye(9, dtype=torch.bool)
    for i in range(1, 9):
        depth[i], mask[i] = depth[parents[i]] + 1, mask[i] | mask[parents[i]]
    n = len(prompt)
    tables: list[list[int]] = [[], []]
    for table in tables:
        assert runner.cache.grow(table, n + 9)
        runner.execute([SeqChunk(table, 0, prompt, [n - 1])])
    alone = [runner.execute([SeqChunk(tables[0], n + i, [tokens[node]], [0])]) for i, node in enumerate(path)]
    tree = SeqChunk(tables[1], n, tokens, list(range(9)), positions=[n + d for d in depth], tree_mask=mask)
    verified = runner.execute([tree])
    for row, node in zip(alone, path):
        assert torch.equal(row[0], verified[node])


def test_the_fspad_drafter_is_compiled_as_its_target_and_drafts_the_same():
    """On the compiled path the FSPAD drafter's layer runs compiled too; its logits and features equal the eager
    drafter's within the compiled fp32 path's tolerance, on a chunk with context in its cache. (In fp32: a bf16
    drafter, the default under an fp32 target on CPUs with bf16 matmuls, rounds differently compiled and eager.)"""
    from test_shipped_drafters import FSPAD

    tree = {"depth": 2, "top_k": 2, "total_tokens": 4}
    spec = {"method": "fspad", "model": str(FSPAD), "tree": tree, "dtype": "float32"}
    engines = [
        LLM(SMOLLM2, enforce_eager=eager, kv_cache_tokens=512, speculative_config=spec).engine
        for eager in (False, True)
    ]
    drafters = [engine.decoder.drafter for engine in engines]
    assert not isinstance(drafters[0]._forward, functools.partial) and isinstance(
        drafters[1]._forward, functools.partial
    )
    # the LM heads, applied outside the graph, run the graph's op where the model is compiled
    assert drafters[0].head.through_op and engines[0].runner.llama.head.through_op
    assert not drafters[1].head.through_op and not engines[1].runner.llama.head.through_op
    torch.manual_seed(0)
    features = torch.randn(7, 576)
    outs = []
    for drafter in drafters:
        drafter._run([SeqChunk([1], 0, [5, 6, 7, 8, 9], [4], extra={"features": features[:5]})])  # context
        outs.append(drafter._run([SeqChunk([1], 5, [10, 11], [0, 1], extra={"features": features[5:]})]))
    (logits, feats), (want_logits, want_feats) = outs
    assert_logits_close(logits, want_logits)
    assert torch.allclose(feats, want_feats, atol=1e-4, rtol=1e-4)


def test_compiled_models_pick_their_graphs_by_the_inputs_alone(tiny_model_dir):
    """Compiled models keep Dynamo's guards on their inputs only (`runner.input_guards`): steps of one token, of
    several, then of one again each run the graph made for them at start-up, without recompiling, and two models of
    different shapes compiled in one process each run their own graph; every step gives the eager model's logits.
    The graphs read the models' floats (RMSNorm eps) as constants: a compiled call builds no tensor before it runs
    the graph (`runner.capture_settings`)."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    models = [
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval(),
        tiny(LlamaForCausalLM, LlamaConfig, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    ]
    runners = []
    for model in models:
        c = model.config
        cache = PagedKVCache(c.num_hidden_layers, 16, 16, c.num_key_value_heads, c.head_dim, torch.float32, "cpu")
        runners.append(ModelRunner(model, cache, torch.device("cpu"), model_impl="leapserve", compile=True))
    compiled = counters["stats"]["unique_graphs"]
    steps = [SeqChunk([1], 0, [5, 6, 7, 8, 9], [4]), SeqChunk([1], 5, [10], [0]), SeqChunk([1], 6, [11, 12], [0, 1])]
    steps.append(SeqChunk([1], 8, [13], [0]))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = [[runner.execute([chunk]) for runner in runners] for chunk in steps]  # the models in turn
    assert counters["stats"]["unique_graphs"] == compiled
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0  # the compile cache keys on every option given
    pregraph = [e for e in prof.events() if e.name == "Pregraph bytecode"]
    assert len(pregraph) == len(steps) * len(runners)
    assert not [c.name for e in pregraph for c in e.cpu_children if c.name == "aten::lift_fresh"]
    for i, runner in enumerate(runners):
        runner._llama_forward = runner.llama  # the same model, eager, over the same cache
        want = [runner.execute([chunk]) for chunk in steps]
        for g, w in zip([g[i] for g in got], want, strict=True):
            assert_logits_close(g, w)
