"""`leapserve bench`: the metric arithmetic on synthetic timelines, the command-line parsing, and short real runs of
`bench offline` and `bench serve` on a tiny random Llama that write a valid JSON record and a PNG plot. One module
(over 400 lines): the harness's parts are tested together with the runs that use them."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_llama
from leapserve.benchmarks.bench_metrics import (
    OfflineRun,
    StreamedRequest,
    drafting_cost,
    mean_acceptance_length,
    offline_summary,
    percentile,
    serve_summary,
    spec_decode_stats,
    speedup,
    summary_ms,
)
from leapserve.benchmarks.bench_offline import kv_tokens_needed
from leapserve.benchmarks.bench_serve import request_body, spec_counters
from leapserve.benchmarks.decoder_specs import NAMED_CONFIGS, Decoder, decoder_list, split_top_level
from leapserve.cli.main import build_parser, main
from leapserve.decoding.observe import StepRecord
from test_server import API_KEY, MODEL, running_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- metric arithmetic -----------------------------------------------------------------------------------------


def test_streamed_request_latencies_follow_vllm_definitions():
    # Sent at t=10; chunks at +0.1 (first token), +0.15, +0.25, +0.3 carrying 6 tokens in all; stream ends at +0.32.
    r = StreamedRequest(start=10.0, end=10.32, token_times=[10.1, 10.15, 10.25, 10.3], output_tokens=6)
    assert r.ttft == pytest.approx(0.1)
    assert r.e2e == pytest.approx(0.32)
    assert r.tpot == pytest.approx((0.32 - 0.1) / 5)  # (e2e - ttft) / (output tokens - 1)
    assert r.itl == pytest.approx([0.05, 0.1, 0.05])  # gaps between chunks, not per token
    no_usage = StreamedRequest(start=10.0, end=10.32, token_times=[10.1, 10.15, 10.25, 10.3])
    assert no_usage.num_output_tokens == 4 and no_usage.tpot == pytest.approx(0.22 / 3)  # one token per chunk
    one = StreamedRequest(start=0.0, end=0.5, token_times=[0.4], output_tokens=1)
    assert (one.ttft, one.tpot, one.itl) == (pytest.approx(0.4), None, [])
    empty = StreamedRequest(start=0.0, end=0.5, output_tokens=0)
    assert (empty.ttft, empty.tpot) == (None, None)


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_is_in_milliseconds():
    assert summary_ms([0.1, 0.2, 0.3, 1.0]) == pytest.approx({"mean": 400.0, "median": 250.0, "p99": 979.0})
    assert summary_ms([]) == {"mean": None, "median": None, "p99": None}


def test_serve_summary_pools_successful_requests_and_counts_failures():
    requests = [
        StreamedRequest(start=0.0, end=1.0, token_times=[0.2, 0.5, 1.0], output_tokens=5),
        StreamedRequest(start=0.5, end=1.5, token_times=[0.9, 1.5], output_tokens=3),
        StreamedRequest(start=0.0, end=0.1, error="HTTP 400: too long"),
    ]
    s = serve_summary(requests, duration=2.0)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (2, 1, 8)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0
    assert s["ttft_ms"]["mean"] == pytest.approx(300.0)  # 0.2 and 0.4
    assert s["itl_ms"]["median"] == pytest.approx(500.0)  # gaps 0.3, 0.5, 0.6 pooled over requests
    assert s["tpot_ms"]["mean"] == pytest.approx(1e3 * ((0.8 / 4) + (0.6 / 2)) / 2)
    assert s["e2e_ms"]["p99"] == pytest.approx(1000.0)


def test_acceptance_from_counter_scrapes():
    before = {
        "spec_decode_num_drafts_total": 10,
        "spec_decode_num_draft_tokens_total": 40,
        "spec_decode_num_accepted_tokens_total": 20,
    }
    after = {
        "spec_decode_num_drafts_total": 30,
        "spec_decode_num_draft_tokens_total": 120,
        "spec_decode_num_accepted_tokens_total": 50,
    }
    stats = spec_decode_stats(before, after)
    assert stats["acceptance_rate"] == pytest.approx(30 / 80)
    assert stats["mean_acceptance_length"] == pytest.approx(1 + 30 / 20)  # vLLM: 1 + accepted / drafts
    assert spec_decode_stats({}, {}) is None  # a server without the counters
    idle = spec_decode_stats(after, after)
    assert idle["acceptance_rate"] is None and idle["mean_acceptance_length"] == 1.0
    assert mean_acceptance_length(0, 0) == 1.0


def test_serve_requests_carry_the_sampling_asked_for():
    """`--temperature` always, `--top-p` only below 1 (a server's own default otherwise), chats as one user turn."""
    parser = build_parser()
    base = ["bench", "serve", "--base-url", "http://127.0.0.1:1", "--model", "m"]
    body = request_body("Hi", parser.parse_args(base + ["--temperature", "0.8", "--top-p", "0.9"]))
    assert (body["temperature"], body["top_p"], body["messages"]) == (0.8, 0.9, [{"role": "user", "content": "Hi"}])
    assert "top_p" not in request_body("Hi", parser.parse_args(base))


def test_spec_counters_read_any_servers_prefix_and_sum_labels():
    text = "\n".join(
        [
            "# TYPE leapserve:spec_decode_num_drafts counter",
            "leapserve:spec_decode_num_drafts_total 7.0",
            "leapserve:spec_decode_num_drafts_created 1.7e9",
            "# TYPE vllm:spec_decode_num_accepted_tokens counter",
            'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 3.0',
            'vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="m"} 4.0',
            "# TYPE leapserve:generation_tokens counter",
            "leapserve:generation_tokens_total 99.0",
            "",
        ]
    )
    assert spec_counters(text) == {"spec_decode_num_drafts_total": 7.0, "spec_decode_num_accepted_tokens_total": 7.0}


def test_offline_summary_medians_and_ratios():
    # Batch 2: 20 forwards of the target per pass, each request in all of them.
    runs = [
        OfflineRun(
            output_tokens=100, elapsed=e, target_forwards=20, request_forwards=40, accepted_tokens=60, num_drafts=30
        )
        for e in (0.5, 0.25, 1.0)
    ]
    s = offline_summary(runs, weight_bytes=10**9)
    assert s["tokens_per_s"] == 200.0 and s["runs_tokens_per_s"] == [200.0, 400.0, 100.0]
    assert s["target_forwards_per_token"] == pytest.approx(0.4)
    assert s["mean_acceptance_length"] == pytest.approx(3.0)
    assert s["weight_GB_s"] == pytest.approx(40.0)  # 1 GB x 20 forwards / 0.5 s
    hf = offline_summary(
        [OfflineRun(output_tokens=10, elapsed=1.0, target_forwards=10, request_forwards=10)], weight_bytes=10**9
    )
    assert hf["mean_acceptance_length"] is None
    assert speedup(50.0, 25.0) == 2.0 and speedup(None, 25.0) is None and speedup(1.0, None) is None


def test_drafting_cost_prices_drafting_steps_by_the_same_passs_plain_steps():
    """Plain steps cost 50 ms + 10 ms per decoding sequence + 2 ms per prompt token. A drafting step of 8
    sequences committing 2.5 tokens each is worth 2.5 plain steps of 8 (325 ms); one with 100 prompt tokens
    committing 2 each, a plain step with that prompt plus one more plain step (460 ms)."""

    def plain(n: int, prompt: int) -> StepRecord:
        return StepRecord("plain", n, prompt, n, 1, 0, 0.05 + 0.01 * n + 0.002 * prompt)

    plains = [plain(n, p) for n in (4, 8, 16) for p in (0, 0, 100)]
    decode, prompt = StepRecord("draft", 8, 0, 20, 1, 4, 0.425), StepRecord("draft", 8, 100, 16, 1, 4, 0.46)
    steps = plains + [decode, decode, prompt]
    assert drafting_cost(steps) == pytest.approx(0.2 / sum(s.seconds for s in steps))  # 100 ms too much, twice
    paying = StepRecord("draft", 8, 0, 40, 1, 4, 0.4)  # 5 tokens each for 0.4 s: worth 0.65 s of plain decoding
    assert drafting_cost(plains + [paying]) == pytest.approx(-0.25 / (sum(s.seconds for s in plains) + 0.4))
    assert drafting_cost(plains) == 0.0  # no drafting, no cost
    assert drafting_cost([plain(4, 0), plain(4, 0), decode]) is None  # too few kinds of plain steps to price it
    prefills = [plain(n, p) for n in (4, 8, 16) for p in (60, 100)]
    assert drafting_cost(prefills + [decode]) is None  # no plain step that only decodes: nothing to price it by
    runs = [
        OfflineRun(output_tokens=10, elapsed=1.0, target_forwards=10, request_forwards=10, drafting_cost=c)
        for c in (0.01, -0.02, 0.03)
    ]
    assert offline_summary(runs, 10**9)["drafting_cost"] == 0.01


# ---- command line ----------------------------------------------------------------------------------------------


def test_decoder_specs():
    assert split_top_level('a, speculative:{"tree": [3, 2], "x": "a,b"},c') == [
        "a",
        'speculative:{"tree": [3, 2], "x": "a,b"}',
        "c",
    ]
    decoders = decoder_list(
        'speculative:ngram,padded=speculative:{"method": "ngram", "num_speculative_tokens": 3, '
        '"layout": "padded"},speculative:{"method": "draft_model", "model": "/m/draft", '
        '"tree": [2, 1]}'
    )
    assert decoders == [
        Decoder("autoregressive", None),  # the baseline is added, first
        Decoder("speculative:ngram", NAMED_CONFIGS["ngram"]),
        Decoder("padded", {"method": "ngram", "num_speculative_tokens": 3, "layout": "padded"}),
        Decoder(
            "speculative[draft_model draft tree=[2,1]]", {"method": "draft_model", "model": "/m/draft", "tree": [2, 1]}
        ),
    ]
    assert [d.label for d in decoder_list("speculative:ngram-padded,AR=autoregressive")] == [
        "AR",
        "speculative:ngram-padded",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["offline", "--decoders", "autoregressive,beam"], "unknown decoder 'beam'"),
        (["offline", "--decoders", "speculative:nope"], "not a known name"),
        (["offline", "--decoders", 'speculative:{"method": "ngram"}'], "num_speculative_tokens must be"),
        (["offline", "--decoders", "speculative:ngram,speculative:ngram"], "labels must differ"),
        (["offline", "--batch-sizes", "1,0"], "positive integers"),
        (["serve", "--concurrency", "1,four"], "positive integers"),
        (["offline", "--roofline", "10"], "expected MS,KNEE[,DRAFT_SHARE]"),
        (["offline", "--roofline", "10,0"], "KNEE at least 1"),
    ],
)
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_dparallel_decoder_specs():
    """dparallel decoders stay in the order given, the first being the baseline; unnamed ones are labelled from the
    config with its defaults filled in, a bare `dparallel` is the server's default config."""
    decoders = decoder_list(
        'one=dparallel:{"rule": "confidence"},dparallel:{"rule": "entropy", "threshold": 0.5},dparallel,'
        'dparallel:{"rule": "fixed", "k": 4, "gen_length": 64, "block_length": 16, "cache": "dual"},'
        'dparallel:{"rule": "confidence", "steps": 128}'
    )
    assert decoders == [
        Decoder("one", diffusion_config={"rule": "confidence"}),
        Decoder("dparallel[entropy 0.5 block 32]", diffusion_config={"rule": "entropy", "threshold": 0.5}),
        Decoder("dparallel", diffusion_config={}),
        Decoder(
            "dparallel[fixed k=4 block 16 gen 64 cache dual]",
            diffusion_config={"rule": "fixed", "k": 4, "gen_length": 64, "block_length": 16, "cache": "dual"},
        ),
        Decoder("dparallel[confidence steps 128 block 32]", diffusion_config={"rule": "confidence", "steps": 128}),
    ]
    assert {d.kind for d in decoders} == {"dparallel"}
    assert decoders[2].diffusion.gen_length == 256 and decoders[3].diffusion.gen_length == 64
    assert [d.kind for d in decoder_list("speculative:ngram")] == ["autoregressive", "speculative"]


def test_kv_cache_sizing_leaves_room_for_the_diffusion_canvas():
    """Each sequence reserves its whole canvas, however few tokens are asked for."""
    prompts = [[1] * 10, [1] * 30]
    assert kv_tokens_needed(prompts, 2, 8, canvas=256) == kv_tokens_needed(prompts, 2, 256) >= 2 * (30 + 256)
    assert kv_tokens_needed(prompts, 2, 300, canvas=256) == kv_tokens_needed(prompts, 2, 300)


@pytest.mark.parametrize(
    "decoders, message",
    [
        ("autoregressive,dparallel", "cannot be compared with autoregressive or speculative ones"),
        ('dparallel:{"rule": "fixed"},speculative:ngram', "cannot be compared with autoregressive or speculative ones"),
        ("dparallel:{rule: entropy}", "not valid JSON"),
        ("dparallel:[1]", "must be a JSON object"),
        ('dparallel:{"rules": "entropy"}', "unknown keys ['rules']"),
        ('dparallel:{"gen_length": 10, "block_length": 4}', "must be a multiple of block_length"),
        ('dparallel:{"rule": "greedy"}', "rule must be one of"),
        ("dparallel,dparallel", "labels must differ"),
    ],
)
def test_bad_dparallel_specs_are_argparse_errors(decoders, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "offline", "--decoders", decoders])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_offline_dparallel_has_no_hf_baseline():
    with pytest.raises(SystemExit) as exc:
        main(["bench", "offline", "--decoders", "dparallel", "--baselines", "hf"])
    assert "cannot decode a masked diffusion LM" in str(exc.value)


# ---- real runs on a tiny model ---------------------------------------------------------------------------------


def _run_cli(monkeypatch, argv: list[str]) -> None:
    """`leapserve ARGV` in-process, with sys.argv as the shell would set it (the record keeps the command)."""
    monkeypatch.setattr(sys, "argv", ["leapserve", *argv])
    main(argv)


def _bench_offline(monkeypatch, model_dir, decoders: str, options: str, *paths: str) -> None:
    """`leapserve bench offline` of `decoders` on the tiny model over `chat` prompts, EOS ignored, one repeat;
    `options` (space-separated) and `paths` follow."""
    argv = ["bench", "offline", "--model", str(model_dir), "--decoders", decoders, "--dataset", "chat"]
    _run_cli(monkeypatch, [*argv, "--ignore-eos", "--repeats", "1", *options.split(), *paths])


def _check_outputs(path: Path, kind: str) -> dict:
    record = json.loads(path.read_text())
    assert record["kind"] == kind and record["command"].startswith(f"leapserve bench {kind} ")
    assert {"timestamp", "machine", "versions", "options"} <= set(record) and "torch" in record["versions"]
    assert path.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    return record


def test_bench_offline_real_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "offline.json"
    draft = json.dumps(
        {"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 2, "adaptive": False}
    )  # adaptive speculation picks modes by timing: not deterministic
    _bench_offline(
        monkeypatch,
        tiny_model_dir,
        f"autoregressive,speculative:ngram,self-draft=speculative:{draft}",
        "--batch-sizes 1,2 --num-prompts 2 --max-tokens 8 --baselines hf",
        *("--output-json", str(out), "--output-md", str(tmp_path / "offline.md")),
    )
    record = _check_outputs(out, "offline")
    rows = {(r["decoder"], r["batch_size"]): r for r in record["results"]}
    assert set(rows) == {
        (d, b) for d in ("autoregressive", "speculative:ngram", "self-draft", "hf-generate") for b in (1, 2)
    } | {("hf-prompt-lookup", 1), ("hf-assisted", 1)}
    for (decoder, _), row in rows.items():
        assert row["output_tokens"] == 16 and row["tokens_per_s"] > 0
        assert row["identical_to_autoregressive"] or decoder.startswith("hf-")
    assert rows[("autoregressive", 1)]["speedup"] == 1.0
    for b in (1, 2):
        assert rows[("autoregressive", b)]["mean_acceptance_length"] == 1.0
        assert rows[("autoregressive", b)]["target_forwards_per_token"] == 1.0
        # The target drafts for itself: every draft token is accepted, 2 per verification but near the end.
        assert rows[("self-draft", b)]["mean_acceptance_length"] > 2.0
        assert rows[("self-draft", b)]["target_forwards_per_token"] <= 0.5
        assert rows[("autoregressive", b)]["drafting_cost"] is None  # only speculative decoders draft
    assert record["hf_generate_options"]["hf-assisted"]["assistant_model"] == str(tiny_model_dir)
    printed = capsys.readouterr().out
    assert "| decoder | batch | output tok/s |" in printed and "| self-draft | 2 |" in printed
    assert "drafting cost (same pass)" in printed
    # each pass is reported as it ends, so that a run cut short still tells what it measured
    assert "self-draft at batch 2: " in printed and "same output as the baseline's pass: yes" in printed
    assert (tmp_path / "offline.md").read_text().startswith("`leapserve bench offline")


@pytest.fixture(scope="module")
def tiny_mdm_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """The tiny random Llama marked as a masked diffusion LM, its last vocabulary id the mask (as test_dparallel's)."""
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-mdm"), smollm2_tokenizer)
    config = json.loads((path / "config.json").read_text())
    config["diffusion_lm"] = {"mask_token_id": config["vocab_size"] - 1, "logits_shift": False}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_bench_offline_dparallel(tiny_mdm_dir, tmp_path, monkeypatch, capsys):
    """Two dparallel decoders on a tiny diffusion LM, the first the baseline: one token per step under LLaDA's
    schedule (steps = gen_length) is 1.0 steps per token; the entropy rule takes at least a step per block."""
    out = tmp_path / "dparallel.json"
    canvas = '"gen_length": 8, "block_length": 4'
    _bench_offline(
        monkeypatch,
        tiny_mdm_dir,
        f'one=dparallel:{{"rule": "confidence", {canvas}}},dparallel:{{"rule": "entropy", "threshold": 0.5, {canvas}}}',
        "--batch-sizes 1,2 --num-prompts 2 --max-tokens 8",
        *("--output-json", str(out), "--output-md", str(tmp_path / "dparallel.md")),
    )
    record = _check_outputs(out, "offline")
    entropy = "dparallel[entropy 0.5 block 4 gen 8]"
    assert record["baseline"] == "one"
    assert record["decoders"]["one"] == {
        "gen_length": 8,
        "block_length": 4,
        "rule": "confidence",
        "threshold": 0.5,
        "steps": None,
        "k": 2,
        "cache": "none",
    }
    rows = {(r["decoder"], r["batch_size"]): r for r in record["results"]}
    assert set(rows) == {(d, b) for d in ("one", entropy) for b in (1, 2)}
    for row in rows.values():
        assert row["output_tokens"] == 16 and row["tokens_per_s"] > 0
        assert "identical_to_autoregressive" not in row and row["drafting_cost"] is None
    for b in (1, 2):
        assert rows[("one", b)]["target_forwards_per_token"] == 1.0 and rows[("one", b)]["identical_to_baseline"]
        assert 2 / 8 <= rows[(entropy, b)]["target_forwards_per_token"] <= 1.0  # 2 blocks of 4 tokens
    assert rows[("one", 1)]["speedup"] == 1.0
    printed = capsys.readouterr().out
    assert "| steps / token |" in printed and "| same output as one |" in printed
    assert "target forwards / token" not in printed and "mean acceptance length" not in printed
    assert "denoising steps" in printed and f"| {entropy} | 2 |" in printed


def test_bench_offline_continuous_batching(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """All prompts submitted at once, at most BATCH running: same outputs as autoregressive decoding, and the
    record and table say which batching ran."""
    out = tmp_path / "continuous.json"
    _bench_offline(
        monkeypatch,
        tiny_model_dir,
        "autoregressive,speculative:ngram",
        "--batch-sizes 2 --continuous --num-prompts 5 --max-tokens 8",
        *("--output-json", str(out)),
    )
    record = _check_outputs(out, "offline")
    assert record["batching"] == "continuous" and record["options"]["continuous"] is True
    for row in record["results"]:
        assert row["output_tokens"] == 40 and row["identical_to_autoregressive"]
    assert "continuous batching" in capsys.readouterr().out


def test_bench_offline_continuous_has_no_hf_baseline(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "offline", "--continuous", "--baselines", "hf"])
    assert "no continuous batching" in str(exc.value)


def test_bench_offline_roofline_cannot_time_transformers(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "offline", "--roofline", "10,128", "--baselines", "hf"])
    assert "--roofline times the engine's forwards only" in str(exc.value)


def test_bench_offline_on_a_modeled_accelerator(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`--roofline 10,1`: every forward token costs 10 ms of virtual time (the knee at one token), so plain decoding
    of 2 prompts x 8 tokens, one at a time, takes 10 ms x (the prompts' tokens + 2 x 7 decode steps) whatever this
    machine does meanwhile; drafters are charged too, and the mode choice runs on the same clock."""
    out = tmp_path / "roofline.json"
    draft = json.dumps({"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 2})
    _bench_offline(
        monkeypatch,
        tiny_model_dir,
        f"autoregressive,self-draft=speculative:{draft}",
        "--batch-sizes 1 --num-prompts 2 --max-tokens 8 --roofline 10,1",
        *("--output-json", str(out)),
    )
    record = _check_outputs(out, "offline")
    assert record["roofline"] == {"forward_ms": 10.0, "knee_tokens": 1, "draft_share": 0.1}
    rows = {r["decoder"]: r for r in record["results"]}
    seconds = 0.010 * (2 * record["mean_prompt_tokens"] + 2 * 7)
    assert rows["autoregressive"]["tokens_per_s"] == pytest.approx(16 / seconds, rel=1e-6)
    assert rows["self-draft"]["identical_to_autoregressive"] and rows["self-draft"]["drafting_cost"] is not None
    assert "virtual time on a modeled accelerator" in capsys.readouterr().out


def test_bench_offline_profile_splits_a_step(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`--profile`: each engine row gets a decode step's breakdown whose parts took time and add up to the step,
    found from the profiler's operators and the engine's named ranges."""
    out = tmp_path / "profile.json"
    _bench_offline(
        monkeypatch,
        tiny_model_dir,
        "autoregressive",
        "--batch-sizes 2 --num-prompts 2 --max-tokens 4 --profile",
        *("--output-json", str(out)),
    )
    (row,) = json.loads(out.read_text())["results"]
    split = row["step_breakdown"]
    parts = ("matmul_ms", "attention_ms", "rest_of_model_ms", "bookkeeping_ms")
    assert all(split[part] > 0 for part in parts)
    assert sum(split[part] for part in parts) == pytest.approx(split["ms_per_step"])
    assert "| ms/step (profiled) |" in capsys.readouterr().out


def test_step_ablation_times_the_parts_without_disturbing_the_request(tiny_model_dir):
    """The unprofiled split times GEMMs and attention alone beside real steps, in a scratch cache: the request it
    decodes still equals plain greedy decoding of the same prompt."""
    from leapserve.benchmarks.step_ablation import PROMPT, split_steps
    from leapserve.decoding import LLM, SamplingParams

    llm = LLM(str(tiny_model_dir), enforce_eager=True, kv_cache_tokens=512)
    split, output = split_steps(llm, steps=4, warmup=2)
    assert all(split[part] > 0 for part in ("step", "forward", "GEMMs", "attention", "bookkeeping"))
    assert split["forward"] <= split["step"]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    (want,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert output == want.outputs[0].token_ids


def test_random_checkpoint_keeps_the_shape_and_tokenizer_and_forward_cost_times_it(tiny_model_dir, tmp_path, capsys):
    """What a GPU lease times without the real weights: the same architecture and tokenizer, new values; and the
    forward-cost curve printed and written for it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from leapserve.benchmarks import forward_cost, random_checkpoint

    out = tmp_path / "random"
    random_checkpoint.main([str(tiny_model_dir), str(out), "--seed", "3"])
    config = {k: v for k, v in AutoConfig.from_pretrained(out).to_dict().items() if k != "_name_or_path"}
    assert config == {
        k: v for k, v in AutoConfig.from_pretrained(tiny_model_dir).to_dict().items() if k != "_name_or_path"
    }
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    old, new = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert old.keys() == new.keys() and all(old[k].shape == new[k].shape for k in old)
    assert not all(old[k].equal(new[k]) for k in old)

    points = tmp_path / "forward.json"
    argv = ["--model", str(out), "--device", "cpu", "--enforce-eager", "--tokens", "1,8", "--json", str(points)]
    forward_cost.main(argv)
    record = json.loads(points.read_text())
    assert record["path"] == "eager" and list(record["ms"]) == ["1", "8"] and all(v > 0 for v in record["ms"].values())
    assert "cpu, eager: 1: " in capsys.readouterr().out


def test_forward_cost_against_onednn_times_both_gemm_paths(tiny_model_dir, monkeypatch, capsys):
    """`--against-onednn`: every count timed through the own GEMM and through oneDNN on the compiled CPU model,
    switched in alternating order, and the own GEMM on again afterwards; an eager model is refused."""
    from leapserve.benchmarks import forward_cost
    from leapserve.kernels import cpu_ops

    switched: list[bool] = []
    real = cpu_ops.use_native_gemv

    def use_native_gemv(enabled: bool) -> None:  # the real switch, recorded
        switched.append(enabled)
        real(enabled)

    monkeypatch.setattr(cpu_ops, "use_native_gemv", use_native_gemv)
    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--tokens", "1,3", "--repeats", "2"]
    forward_cost.main([*base, "--against-onednn"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu, compiled, own GEMM up to ")
    for line, tokens in zip(lines[1:], (1, 3), strict=True):
        own, onednn = (float(part.split(" ms")[0].rsplit(" ", 1)[1]) for part in line.split(", ")[:2])
        assert line.startswith(f"  {tokens} tokens: own GEMM ") and own > 0 and onednn > 0
    # repeat 0: own first, repeat 1: oneDNN first, for each count; then the own GEMM again
    assert switched == [True, False, True, False, False, True, False, True, True]
    assert cpu_ops.loaded().native_gemv()
    with pytest.raises(SystemExit, match="drop --enforce-eager"):
        forward_cost.main([*base, "--enforce-eager", "--against-onednn"])


def test_gemm_cost_times_a_models_gemms_through_the_op_and_through_onednn(tiny_model_dir, tmp_path, capsys):
    """Every GEMM of the model's forward once a pass (q/k/v, o, gate/up, down per layer; the head), through the op's
    own GEMM and through oneDNN's packed copies, per round and row count; the copies released and the own GEMM on
    again afterwards."""
    from leapserve.benchmarks import gemm_cost
    from leapserve.kernels import cpu_ops

    shapes = gemm_cost.gemm_shapes(str(tiny_model_dir))  # 2 layers, hidden 64, 2 heads and 1 KV head of 32
    assert shapes[:4] == [(128, 64), (64, 64), (256, 64), (64, 128)] and shapes[4:8] == shapes[:4]
    assert len(shapes) == 9 and shapes[-1][1] == 64
    before = len(cpu_ops._packed)
    out = tmp_path / "gemms.json"
    argv = ["--model", str(tiny_model_dir), "--rows", "1,3", "--repeats", "1", "--rounds", "2", "--json", str(out)]
    gemm_cost.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"9 GEMMs of {tiny_model_dir}'s shape, float32") and len(lines) == 5
    assert [line.split(":")[0] for line in lines[1:]] == [f"round {r}, {n} rows" for r in (1, 2) for n in (1, 3)]
    ms = json.loads(out.read_text())["ms"]
    assert list(ms) == ["1", "3"] and all(len(rounds) == 2 for rounds in ms.values())
    assert all(t["own"] > 0 and t["onednn"] > 0 for rounds in ms.values() for t in rounds)
    assert cpu_ops.loaded().native_gemv() and len(cpu_ops._packed) <= before + 9  # oneDNN's 9 copies released


def test_bench_serve_real_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(
        "\n".join(
            json.dumps(line)
            for line in [
                {"prompt": "The quick brown fox"},
                {"messages": [{"role": "user", "content": "Hello there"}]},
                {"prompt": "word " * 400},  # longer than the server's max_model_len: HTTP 400, counted as a failure
                {"prompt": "Count to ten"},
            ]
        )
        + "\n"
    )
    out = tmp_path / "serve.json"
    self_draft = json.dumps(
        {"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 2, "adaptive": False}
    )  # every draft token is accepted
    with running_server(
        tiny_model_dir, tmp_path / "server.log", "--kv-cache-tokens", "4096", "--speculative-config", self_draft
    ) as url:
        _run_cli(
            monkeypatch,
            [
                "bench",
                "serve",
                "--base-url",
                f"{url}/v1",
                "--api-key",
                API_KEY,
                "--dataset",
                str(dataset),
                "--num-prompts",
                "4",
                "--concurrency",
                "1,3",
                "--max-tokens",
                "6",
                "--ignore-eos",
                "--output-json",
                str(out),
            ],
        )
    record = _check_outputs(out, "serve")
    assert record["options"]["model"] == MODEL  # asked the server
    assert [lv["concurrency"] for lv in record["results"]] == [1, 3]
    for level in record["results"]:
        assert (level["completed"], level["failed"], level["output_tokens"]) == (3, 1, 18)
        assert "HTTP 400" in level["errors"][0]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert all(v is not None and v > 0 for v in level[key].values())
        spec = level["spec_decode"]  # from this level's scrapes only
        assert spec["num_drafts"] > 0 and spec["acceptance_rate"] == 1.0
        # 3 requests, each drafting at most the 5 tokens it emits after the first.
        assert spec["num_accepted_tokens"] == spec["num_draft_tokens"] <= 3 * 5
        assert 2.0 < spec["mean_acceptance_length"] <= 3.0
    assert "| concurrency | completed | failed |" in capsys.readouterr().out


def test_bench_serve_pairs_servers_in_turn(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`--against URL,URL --rounds N`: each level runs on every server N times, the order reversing round by round,
    and the record pairs the first server with each other one: base / that server per round and the median."""
    import statistics

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The quick brown fox", "Count to ten")))
    out = tmp_path / "paired.json"
    self_draft = json.dumps(
        {"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 2, "adaptive": False}
    )
    argv = ["bench", "serve", "--api-key", API_KEY, "--dataset", str(dataset), "--num-prompts", "2"]
    argv += ["--concurrency", "1,2", "--max-tokens", "4", "--ignore-eos", "--rounds", "3"]
    with (
        running_server(tiny_model_dir, tmp_path / "spec.log", "--speculative-config", self_draft) as spec,
        running_server(tiny_model_dir, tmp_path / "plain.log") as plain,
        running_server(tiny_model_dir, tmp_path / "eager.log", "--enforce-eager") as eager,
    ):
        against = f"{plain}/v1/,{eager}"
        _run_cli(monkeypatch, [*argv, "--base-url", spec, "--against", against, "--output-json", str(out)])
        with pytest.raises(SystemExit, match=r"cannot list the models of http://127\.0\.0\.1:1\b"):
            _run_cli(monkeypatch, [*argv, "--base-url", spec, "--against", "http://127.0.0.1:1"])
    record = _check_outputs(out, "serve")
    runs = [(lv["concurrency"], lv["round"], lv["server"]) for lv in record["results"]]
    forward = ["base", "against 1", "against 2"]
    assert runs == [
        (c, r, name) for c in (1, 2) for r in range(3) for name in (forward if r % 2 == 0 else forward[::-1])
    ]
    urls = {lv["server"]: lv["url"] for lv in record["results"]}
    assert urls == {"base": spec, "against 1": plain, "against 2": eager}
    for lv in record["results"]:
        assert (lv["completed"], lv["failed"], lv["model"]) == (2, 0, MODEL)
        if lv["server"] == "base":  # only the speculating server drafts
            assert lv["spec_decode"]["num_drafts"] > 0 and lv["spec_decode"]["acceptance_rate"] == 1.0
        else:
            assert not (lv["spec_decode"] or {}).get("num_drafts")
    assert [(p["concurrency"], p["against"]) for p in record["paired"]] == [
        (c, name) for c in (1, 2) for name in ("against 1", "against 2")
    ]
    for pair in record["paired"]:
        speed = {
            name: [
                lv["output_throughput"]
                for lv in record["results"]
                if lv["concurrency"] == pair["concurrency"] and lv["server"] == name
            ]
            for name in ("base", pair["against"])
        }
        assert pair["against_url"] == urls[pair["against"]]
        assert (pair["base_tokens_per_s"], pair["against_tokens_per_s"]) == (speed["base"], speed[pair["against"]])
        assert pair["ratios"] == [b / a for b, a in zip(speed["base"], speed[pair["against"]])]
        assert pair["median_ratio"] == statistics.median(pair["ratios"])
    printed = capsys.readouterr().out
    assert "| server | round | concurrency |" in printed and "| median base / against |" in printed
    assert f"| against 2: {eager} |" in printed
    with pytest.raises(SystemExit, match="above 1 only with --against"):
        _run_cli(monkeypatch, ["bench", "serve", "--rounds", "2"])


def test_the_handwritten_set_is_for_evaluation_only():
    """`--dataset handwritten`: every hand-written request (chats and multi-turn conversations), shuffled by seed;
    no train split, and none of them in the generated sets a drafter trains on."""
    from leapserve.prompts import HANDWRITTEN, PROMPT_SETS, load, load_prompts

    prompts = load("handwritten", "test", None, 1)
    assert sorted(map(str, prompts)) == sorted(map(str, HANDWRITTEN)) and prompts != HANDWRITTEN
    assert any(isinstance(p, list) for p in prompts)
    assert load("handwritten", "train") == []
    generated = {p for name in PROMPT_SETS for p in load_prompts(name, "all")}
    assert not generated & {p for p in HANDWRITTEN if isinstance(p, str)}


def test_cpu_attention_bench_times_each_point_and_pairs_another_build(tmp_path, capsys) -> None:
    from leapserve.benchmarks import cpu_attention
    from leapserve.kernels import cpu_ops

    base = ["--contexts", "20,40", "--new", "1,5", "--calls", "3", "--repeats", "2", "--dtype", "bfloat16"]
    cpu_attention.main(base)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [(int(r[0]), int(r[1])) for r in rows[1:]] == [(20, 1), (20, 5), (40, 1), (40, 5)]
    assert all(float(r[2]) > 0 for r in rows[1:])
    # the same source built beside it under another name: both timed, with the paired ratio
    (tmp_path / "same.cpp").write_text(cpu_ops.SOURCE.read_text())
    cpu_attention.main(
        [*base[:4], "--new", "9", "--calls", "3", "--repeats", "2", "--against", str(tmp_path / "same.cpp")]
    )
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.strip() for r in rows[0]] == ["context", "new", "this", "against", "against / this (paired)"]
    assert len(rows) == 3 and all(float(r[4]) > 0 for r in rows[1:])
    with pytest.raises(SystemExit, match="divide"):
        cpu_attention.main(["--heads", "9,2,64"])
    with pytest.raises(SystemExit, match="no such file"):
        cpu_attention.main(["--against", str(tmp_path / "missing.cpp")])
