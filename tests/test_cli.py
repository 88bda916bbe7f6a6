"""`leapserve serve` flags -> EngineConfig, and the command line's error handling."""
from __future__ import annotations

import subprocess
import sys

import pytest

from leapserve.decoding.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from leapserve.server import cli
from leapserve.server.cli import build_parser, engine_config_from_args

import fault_injection


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_are_the_engine_defaults():
    args = parse()
    assert engine_config_from_args(args) == EngineConfig()
    assert (args.host, args.port, args.log_level, args.logits_processors) == ("127.0.0.1", 8000, "info", [])


def test_every_flag_maps_onto_the_engine_config():
    args = parse(
        "--model", "/models/llama", "--dtype", "bfloat16", "--device", "cpu", "--max-model-len", "4096",
        "--trust-remote-code", "--served-model-name", "llama", "--block-size", "32", "--kv-cache-tokens", "65536",
        "--gpu-memory-utilization", "0.5", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
        "--max-waiting-requests", "10", "--decoder", "speculative",
        "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}', "--seed", "7",
        "--host", "0.0.0.0", "--port", "9000", "--api-key", "secret", "--log-level", "debug")
    assert engine_config_from_args(args) == EngineConfig(
        model=ModelConfig(model="/models/llama", dtype="bfloat16", device="cpu", max_model_len=4096,
                          trust_remote_code=True, served_model_name="llama"),
        cache=CacheConfig(block_size=32, kv_cache_tokens=65536, gpu_memory_utilization=0.5),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_waiting_requests=10),
        decoder="speculative", speculative_config={"method": "ngram", "num_speculative_tokens": 4}, seed=7)
    assert (args.host, args.port, args.api_key, args.log_level) == ("0.0.0.0", 9000, "secret", "debug")


def test_serve_hands_the_flags_to_run_server(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_server", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("LEAPSERVE_API_KEY", "from-env")
    cli.main(["serve", "--port", "9001", "--max-num-seqs", "4", "--log-level", "warning",
              "--logits-processors", "fault_injection:fail_if_poisoned"])
    cli.main(["serve", "--api-key", "from-flag"])
    (config, host, port, api_key), kwargs = calls[0]
    assert config.scheduler.max_num_seqs == 4 and (host, port, api_key) == ("127.0.0.1", 9001, "from-env")
    assert kwargs == {"logits_processors": [fault_injection.fail_if_poisoned], "log_level": "warning"}
    assert calls[1][0][3] == "from-flag"


def test_logits_processors_are_imported():
    args = parse("--logits-processors", "fault_injection:fail_if_poisoned, fault_injection:delay_if_slow")
    assert args.logits_processors == [fault_injection.fail_if_poisoned, fault_injection.delay_if_slow]


@pytest.mark.parametrize(("argv", "message"), [
    (["--speculative-config", "{method: ngram}"], "--speculative-config: not valid JSON"),
    (["--speculative-config", "[1, 2]"], "--speculative-config: must be a JSON object"),
    (["--logits-processors", "fault_injection"], "expected module:callable"),
    (["--logits-processors", "no_such_module:f"], "cannot load 'no_such_module:f'"),
    (["--logits-processors", "fault_injection:POISON_PREFIX"], "is not callable"),
    (["--dtype", "int3"], "--dtype: invalid choice"),
    (["--port", "eighty"], "--port: invalid int value"),
])
def test_invalid_flags_exit_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_entry_points():
    """`python -m leapserve.server.cli` and `python -m leapserve.server` run the CLI; errors exit with no traceback."""
    bad_json = subprocess.run([sys.executable, "-m", "leapserve.server.cli", "serve", "--speculative-config", "{"],
                              capture_output=True, text=True, timeout=120)
    assert bad_json.returncode == 2
    assert "--speculative-config: not valid JSON" in bad_json.stderr and "Traceback" not in bad_json.stderr

    missing = subprocess.run([sys.executable, "-m", "leapserve.server", "serve", "--model", "/no/such/model"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert "leapserve serve: error:" in missing.stderr and "Traceback" not in missing.stderr

    no_command = subprocess.run([sys.executable, "-m", "leapserve.server.cli"], capture_output=True, text=True,
                                timeout=120)
    assert no_command.returncode == 2 and "serve" in no_command.stderr
