"""EAGLE-2 draft trees inside vLLM's CPU build, run for real from `.venv-vllm`: leapserve's tree worker
(`leapserve.vllm_plugin.tree_runner`) drafts per-request trees with an exported FSPAD drafter and verifies them in
one target forward through leapserve's tree attention. Greedy output equals vLLM without speculation token for
token (mixed prompt lengths, continuous batching, a request a tree cannot serve in the batch); sampling keeps the
target's distribution; the KV compaction moves slots in vLLM's cache layout; a tree vLLM cannot hold is refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from leapserve.decoding import LLM
from leapserve.decoding.model_loader import resolve_model
from leapserve.decoding.sampling_params import SamplingParams
from leapserve.prompts.handwritten import HANDWRITTEN
from leapserve.training.export import export_eagle
from test_speculative import VOCAB, _joint_first_two, _tiny_vocab_model, _tv_tolerance
from test_vllm import VLLM_BIN, VLLM_ENV, vllm_python
from test_vllm_backend import save_tiny_fspad

pytestmark = pytest.mark.skipif(
    not (VLLM_BIN / "vllm").exists(), reason="no .venv-vllm with vLLM's CPU build (`make setup-vllm` builds it)"
)
RUNNER = Path(__file__).with_name("vllm_tree_run.py")
SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "smollm2-135m-instruct-fspad"


def vllm_job(job: dict) -> subprocess.CompletedProcess:
    """`vllm_tree_run.py` on `job`, in .venv-vllm, its engine in that one process."""
    env = {**VLLM_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return subprocess.run(
        [VLLM_BIN / "python", RUNNER], input=json.dumps(job), capture_output=True, text=True, env=env, cwd="/",
        timeout=900,
    )  # fmt: skip


def run_vllm(model: Path, prompts: list[list[int]], params: list[dict], spec: dict | None = None, **job) -> dict:
    """Generate with one offline vLLM engine (tree worker when `spec` has a tree export); its output and counters."""
    done = vllm_job({"model": str(model), "speculative_config": spec, "prompts": prompts, "params": params, **job})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tree_export(target: Path, out: Path, tree: dict, drafter: Path | None = None) -> dict:
    """vLLM's speculative config for an FSPAD drafter of `target` (random if none given) exported with `tree`."""
    drafter = drafter or save_tiny_fspad(target, out.with_name(out.name + "-fspad"))
    export = export_eagle(drafter, str(target), out, tree)
    return {"method": "eagle", "model": str(export), "num_speculative_tokens": tree["total_tokens"]}


def test_moved_slots_hold_what_vllms_cpu_kernel_wrote():
    """`move_slots` compacts rows in vLLM's `vec` cache layout: K/V written by vLLM's own cache op, moved from
    scattered slots (across blocks, overlapping the destinations) to a contiguous run, read back in leapserve's
    layout; slots not moved are untouched."""
    done = vllm_python(
        "import torch\n"
        "from vllm import _custom_ops as ops\n"
        "from vllm.v1.attention.backends.cpu_attn import _get_attn_isa\n"
        "from leapserve.vllm_plugin.cpu_attention import leapserve_layout, move_slots\n"
        "D, H, B, T = 32, 2, 32, 64\n"
        "isa = _get_attn_isa(torch.float32, B, D, 'auto')\n"
        "kv = torch.zeros(2, H, B, 2 * D)\n"
        "kc, vc = kv.view(2, H, 2 * B, D).chunk(2, dim=2)\n"
        "k, v = torch.randn(T, H, D), torch.randn(T, H, D)\n"
        "ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(T), isa, k_scale=1.0, v_scale=1.0,"
        " kv_cache_dtype='auto')\n"
        "src, dst = torch.tensor([30, 33, 40, 41]), torch.tensor([30, 31, 32, 33])\n"
        "move_slots(kv, src, dst)\n"
        "K, V, table = leapserve_layout(kv, torch.tensor([[0, 1]]))\n"
        "flat = lambda c: torch.cat([c[table[0, 0]], c[table[0, 1]]])\n"
        "want_k, want_v = k.clone(), v.clone()\n"
        "want_k[dst], want_v[dst] = k[src], v[src]\n"
        "print(isa, torch.equal(flat(K), want_k), torch.equal(flat(V), want_v))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["vec", "True", "True"]


def test_greedy_trees_equal_vllm_without_speculation(tiny_model_dir, tmp_path):
    """Seven requests of 3 to 40 prompt tokens and 6 to 40 output tokens, at most three at a time (requests join
    as others finish), one with a repetition penalty (no tree for it: vLLM penalises drafts as one sequence):
    tree speculation's tokens equal vLLM's plain decoding and leapserve's autoregressive engine (held to
    transformers' generate by the engine tests), and the trees were drafted (24 nodes a draft)."""
    tree = {"depth": 5, "top_k": 8, "total_tokens": 24}
    spec = tree_export(tiny_model_dir, tmp_path / "export", tree)
    g = torch.Generator().manual_seed(0)
    lengths, outputs = [3, 40, 11, 25, 7, 33, 18], [40, 6, 25, 12, 33, 20, 9]
    prompts = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in lengths]
    params = [{"temperature": 0, "max_tokens": m, "ignore_eos": True} for m in outputs]
    params[3]["repetition_penalty"] = 1.2
    want = run_vllm(tiny_model_dir, prompts, params, max_num_seqs=3)
    got = run_vllm(tiny_model_dir, prompts, params, spec, tree_worker=True, max_num_seqs=3)
    assert got["tokens"] == want["tokens"]
    # and leapserve's autoregressive engine, which the engine tests hold to transformers' generate
    llm = LLM(str(tiny_model_dir), decoder="autoregressive", kv_cache_tokens=2048)
    native = llm.generate(prompts, [SamplingParams(**p) for p in params], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in native] == got["tokens"]
    counters = got["counters"]
    assert counters["num_drafts"] > 0 and counters["num_draft_tokens"] == 24 * counters["num_drafts"]


def test_chains_on_the_tree_worker_run_as_vllms_own(tiny_model_dir, tmp_path):
    """A drafter without `leapserve_tree` on the tree worker: the same tokens and the same draft and acceptance
    counts as on vLLM's own worker."""
    fspad = save_tiny_fspad(tiny_model_dir, tmp_path / "fspad")
    spec = {"method": "eagle", "model": str(export_eagle(fspad, str(tiny_model_dir), tmp_path / "chain")),
            "num_speculative_tokens": 3}  # fmt: skip
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [100, 200, 300]]
    params = [{"temperature": 0, "max_tokens": 24, "ignore_eos": True}] * 2
    stock = run_vllm(tiny_model_dir, prompts, params, spec)
    ours = run_vllm(tiny_model_dir, prompts, params, spec, tree_worker=True)
    assert ours == stock and stock["counters"]["num_drafts"] > 0


@pytest.mark.slow
def test_the_shipped_drafters_trees_in_vllm_accept_more_than_its_chain(tmp_path):
    """SmolLM2-135M-Instruct with the shipped FSPAD drafter on four hand-written chat prompts: greedy output with a
    24-node tree equals vLLM without speculation and with a 3-token chain, and the tree accepts more per draft."""
    target = Path(resolve_model("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(target)
    chats = [[{"role": "user", "content": p}] for p in HANDWRITTEN[:4]]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    params = [{"temperature": 0, "max_tokens": 48}] * len(prompts)
    tree = tree_export(target, tmp_path / "tree", {"depth": 5, "top_k": 8, "total_tokens": 24}, SHIPPED)
    chain = {"method": "eagle", "model": str(export_eagle(SHIPPED, str(target), tmp_path / "chain")),
             "num_speculative_tokens": 3}  # fmt: skip
    plain = run_vllm(target, prompts, params)
    chained = run_vllm(target, prompts, params, chain)
    treed = run_vllm(target, prompts, params, tree, tree_worker=True)
    assert treed["tokens"] == plain["tokens"] == chained["tokens"]

    def accepted_per_draft(run: dict) -> float:
        return run["counters"]["num_accepted_tokens"] / run["counters"]["num_drafts"]

    assert accepted_per_draft(treed) > accepted_per_draft(chained) + 0.2


def test_tree_sampling_keeps_the_targets_distribution(tmp_path):
    """Seeded requests over a 24-token vocabulary at temperature 0.8 / top-p 0.9: the law of the first two tokens
    drawn through trees (leapserve's recursive rejection across siblings) is the target's, within the 99.9%
    quantile of sampling noise; and drafts were accepted, so the rejection path ran."""
    draws = 3000
    target = _tiny_vocab_model(tmp_path / "target", seed=0)
    spec = tree_export(target, tmp_path / "export", {"depth": 3, "top_k": 3, "total_tokens": 6})
    prompt = [3, 5, 7, 3, 5, 7, 3]
    params = {"temperature": 0.8, "top_p": 0.9, "max_tokens": 3, "ignore_eos": True}
    exact = _joint_first_two(target, prompt, SamplingParams(temperature=0.8, top_p=0.9))
    run = run_vllm(target, [prompt] * draws, [{**params, "seed": i} for i in range(draws)], spec,
                   tree_worker=True, max_num_seqs=256)  # fmt: skip
    firsts = torch.tensor([t[:2] for t in run["tokens"]])
    counts = torch.bincount(firsts[:, 0] * VOCAB + firsts[:, 1], minlength=VOCAB * VOCAB).double()
    tv = 0.5 * float((counts / draws - exact.flatten()).abs().sum())
    tolerance = _tv_tolerance(exact, draws)
    assert tv < tolerance, f"TV {tv:.4f} >= {tolerance:.4f}"
    assert run["counters"]["num_accepted_tokens"] > draws // 10


def test_a_tree_vllm_cannot_reserve_is_refused(tiny_model_dir, tmp_path):
    """num_speculative_tokens must be the tree's node count: vLLM reserves slots and sizes its buffers by it."""
    spec = tree_export(tiny_model_dir, tmp_path / "export", {"depth": 3, "top_k": 2, "total_tokens": 6})
    job = {"model": str(tiny_model_dir), "speculative_config": {**spec, "num_speculative_tokens": 3},
           "tree_worker": True, "prompts": [[1, 2]], "params": [{"max_tokens": 2}]}  # fmt: skip
    done = vllm_job(job)
    assert done.returncode != 0
    assert "num_speculative_tokens must equal total_tokens (6)" in done.stderr
