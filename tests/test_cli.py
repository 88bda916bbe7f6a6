"""The `leapserve` command line: options generated from the config dataclasses, `serve` flags -> EngineConfig,
the trainers' flags -> their configs, `--help`, and the error handling."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

import fault_injection
from leapserve.cli.main import build_parser, main
from leapserve.cli.serve import run_server_arguments
from leapserve.decoding.args import add_config_arguments, config_from_args, option
from leapserve.decoding.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from leapserve.decoding.decoders import DECODERS
from leapserve.server import DEFAULT_MAX_REQUEST_BYTES
from leapserve.server.vllm_backend import Parallelism
from leapserve.training.adaspec import AdaSpecConfig
from leapserve.training.data import DataConfig
from leapserve.training.fspad import FSPADTrainConfig

# not engine config fields: the server's, and the backend's (`Parallelism`'s are checked like the engine's)
SERVER_OPTIONS = {
    "logits_processors",
    "host",
    "port",
    "api_key",
    "log_level",
    "max_request_bytes",
    "backend",
    "vllm_executable",
}


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def subparser(*names: str) -> argparse.ArgumentParser:
    """The parser of `leapserve NAMES...`."""
    parser = build_parser()
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def test_defaults_are_the_engine_defaults():
    args = parse()
    assert config_from_args(EngineConfig, args) == EngineConfig()
    assert (args.host, args.port, args.log_level, args.logits_processors) == ("127.0.0.1", 8000, "info", [])


def test_every_flag_maps_onto_the_engine_config():
    args = parse(
        "--model",
        "/models/llama",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--max-model-len",
        "4096",
        "--trust-remote-code",
        "--served-model-name",
        "llama",
        "--block-size",
        "32",
        "--kv-cache-tokens",
        "65536",
        "--gpu-memory-utilization",
        "0.5",
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "512",
        "--max-waiting-requests",
        "10",
        "--decoder",
        "speculative",
        "--speculative-config",
        '{"method": "ngram", "num_speculative_tokens": 4}',
        "--seed",
        "7",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "--api-key",
        "secret",
        "--log-level",
        "debug",
    )
    assert config_from_args(EngineConfig, args) == EngineConfig(
        model=ModelConfig(
            model="/models/llama",
            dtype="bfloat16",
            device="cpu",
            max_model_len=4096,
            trust_remote_code=True,
            served_model_name="llama",
        ),
        cache=CacheConfig(block_size=32, kv_cache_tokens=65536, gpu_memory_utilization=0.5),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_waiting_requests=10),
        decoder="speculative",
        speculative_config={"method": "ngram", "num_speculative_tokens": 4},
        seed=7,
    )
    assert (args.host, args.port, args.api_key, args.log_level) == ("0.0.0.0", 9000, "secret", "debug")


def test_every_serve_option_is_an_engine_config_field_and_back():
    """The generated options are exactly the engine configs' fields, each defaulting to its dataclass default."""
    actions = {a.dest: a for a in subparser("serve")._actions if a.dest != "help"}
    nested = {"model", "cache", "scheduler"}
    engine_fields = {f.name: EngineConfig() for f in dataclasses.fields(EngineConfig) if f.name not in nested}
    for config in (ModelConfig(), CacheConfig(), SchedulerConfig(), Parallelism()):
        engine_fields.update({f.name: config for f in dataclasses.fields(config)})
    assert set(actions) - SERVER_OPTIONS == set(engine_fields)
    for name, config in engine_fields.items():
        flag = f"--{name.replace('_', '-')}"
        assert actions[name].option_strings in ([flag], [flag, f"--no-{flag[2:]}"])
        assert actions[name].default == getattr(config, name), name


def test_decoder_choices_are_the_registry(capsys):
    decoder = next(a for a in subparser("serve")._actions if a.dest == "decoder")
    assert decoder.choices == list(DECODERS) == ["autoregressive", "speculative", "dparallel", "silent-thought"]
    with pytest.raises(SystemExit):
        parse("--decoder", "medusa")
    assert "--decoder: invalid choice: 'medusa'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "listed", "absent"),
    [
        ([], ["serve", "bench", "train"], []),
        (
            ["serve"],
            [
                "{autoregressive,speculative,dparallel,silent-thought}",
                "--diffusion-config",
                "--speculative-config",
                "model:",
                "KV cache:",
                "scheduler:",
                "decoding:",
                "server:",
            ],
            [],
        ),
        (["train"], ["data", "fspad", "adaspec", "export-eagle", "mdm", "dparallel", "sft", "dart"], []),
        (["train", "fspad"], ["--no-feature-sampling", "training:", "--warmup-steps"], []),
    ],
)
def test_help_lists_what_exists(capsys, argv, listed, absent):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in listed) and not any(word in out for word in absent)
    commands = [a for a in subparser(*argv)._actions if isinstance(a, argparse._SubParsersAction)]
    if commands:  # the listed commands are all there are
        assert set(commands[0].choices) == {w for w in listed if ":" not in w}


@pytest.mark.parametrize(
    ("command", "cls", "required"),
    [
        ("data", DataConfig, {"out": "data"}),
        ("fspad", FSPADTrainConfig, {"data": "data", "out": "drafter"}),
        ("adaspec", AdaSpecConfig, {"data": "data", "out": "drafter"}),
    ],
)
def test_trainer_flags_default_to_the_trainer_configs(command, cls, required):
    """A trainer's command line and its config dataclass agree on every default (defined once, in the dataclass)."""
    argv = [arg for name, value in required.items() for arg in (f"--{name}", value)]
    args = build_parser().parse_args(["train", command, *argv])
    assert config_from_args(cls, args) == cls(**required)


def test_trainer_defaults():
    fspad, adaspec = FSPADTrainConfig(data="d", out="o").train, AdaSpecConfig(data="d", out="o").train
    assert (fspad.steps, fspad.lr, fspad.weight_decay, fspad.warmup_steps, fspad.grad_clip) == (2000, 1e-3, 0, 50, 0.5)
    assert (adaspec.steps, adaspec.lr, adaspec.weight_decay, adaspec.warmup_steps, adaspec.grad_clip) == (
        2000,
        3e-4,
        0.1,
        20,
        1.0,
    )
    args = build_parser().parse_args(
        ["train", "fspad", "--data", "d", "--out", "o", "--no-noise", "--steps", "5", "--tree", '{"depth": 2}']
    )
    cfg = config_from_args(FSPADTrainConfig, args)
    assert (cfg.noise, cfg.train.steps, cfg.train.lr, cfg.tree) == (False, 5, 1e-3, {"depth": 2})


@dataclasses.dataclass
class _Inner:
    size: int = option(4, "a size")
    tags: list[int] | None = option(None, "ids")


@dataclasses.dataclass
class _Outer:
    name: str = option(help="required")
    on: bool = option(True, "a switch that is on")
    extra: dict = option({"a": 1}, "a JSON object")
    rate: float | None = option(None, "a rate", metavar="R")
    hidden: tuple[int, int] = (1, 2)  # no option
    inner: _Inner = dataclasses.field(default_factory=_Inner)


@dataclasses.dataclass
class _BiggerInner(_Inner):
    size: int = 8  # another default, the same option


def test_options_from_a_dataclass(capsys):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser, _Outer)
    add_config_arguments(parser, _BiggerInner, overrides={"size": {"help": "bigger"}})
    args = parser.parse_args(["--name", "x", "--no-on", "--extra", '{"b": 2}', "--rate", "0.5", "--tags", "1,2"])
    assert config_from_args(_Outer, args) == _Outer("x", False, {"b": 2}, 0.5, (1, 2), _Inner(8, [1, 2]))
    assert config_from_args(_Outer, parser.parse_args(["--name", "x"]), rate=2.0) == _Outer(
        "x", rate=2.0, inner=_Inner(8)
    )
    assert _Outer("y").extra is not _Outer("z").extra
    assert "--hidden" not in parser.format_help() and "bigger (default: 8)" in parser.format_help()
    for bad, message in (
        (["--extra", "[1]"], "must be a JSON object"),
        (["--tags", "1,x"], "comma-separated"),
        ([], "required: --name"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad if not bad or bad[0] == "--name" else ["--name", "x", *bad])
        assert message in capsys.readouterr().err


def test_serve_hands_the_flags_to_run_server(monkeypatch):
    monkeypatch.setenv("LEAPSERVE_API_KEY", "from-env")
    argv = ["--port", "9001", "--max-num-seqs", "4", "--log-level", "warning"]
    (config, host, port, api_key), kwargs = run_server_arguments(
        parse(*argv, "--logits-processors", "fault_injection:fail_if_poisoned")
    )
    assert config.scheduler.max_num_seqs == 4 and (host, port, api_key) == ("127.0.0.1", 9001, "from-env")
    assert kwargs == {
        "logits_processors": [fault_injection.fail_if_poisoned],
        "log_level": "warning",
        "max_request_bytes": DEFAULT_MAX_REQUEST_BYTES,
    }
    assert run_server_arguments(parse("--api-key", "from-flag"))[0][3] == "from-flag"


def test_logits_processors_are_imported():
    args = parse("--logits-processors", "fault_injection:fail_if_poisoned, fault_injection:delay_if_slow")
    assert args.logits_processors == [fault_injection.fail_if_poisoned, fault_injection.delay_if_slow]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--speculative-config", "{method: ngram}"], "--speculative-config: not valid JSON"),
        (["--speculative-config", "[1, 2]"], "--speculative-config: must be a JSON object"),
        (["--logits-processors", "fault_injection"], "expected module:callable"),
        (["--logits-processors", "no_such_module:f"], "cannot load 'no_such_module:f'"),
        (["--logits-processors", "fault_injection:POISON_PREFIX"], "is not callable"),
        (["--dtype", "int3"], "--dtype: invalid choice"),
        (["--port", "eighty"], "--port: invalid int value"),
    ],
)
def test_invalid_flags_exit_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_entry_point():
    """`python -m leapserve.cli` runs the CLI; errors exit with no traceback."""
    bad_json = subprocess.run(
        [sys.executable, "-m", "leapserve.cli", "serve", "--speculative-config", "{"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad_json.returncode == 2
    assert "--speculative-config: not valid JSON" in bad_json.stderr and "Traceback" not in bad_json.stderr

    missing = subprocess.run(
        [sys.executable, "-m", "leapserve.cli", "serve", "--model", "/no/such/model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert "leapserve serve: error:" in missing.stderr and "Traceback" not in missing.stderr

    no_command = subprocess.run([sys.executable, "-m", "leapserve.cli"], capture_output=True, text=True, timeout=120)
    assert no_command.returncode == 2 and "serve" in no_command.stderr


def test_the_command_shortens_openmp_spinning_unless_told_otherwise():
    """`import leapserve.cli` (what the `leapserve` command runs first) sets GOMP_SPINCOUNT before torch loads
    OpenMP, keeping one that is already set."""
    from leapserve.cli import OMP_SPIN_COUNT

    code = "import leapserve.cli, os; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    for given, want in ((None, OMP_SPIN_COUNT), ("7", "7")):
        run_env = env if given is None else {**env, "GOMP_SPINCOUNT": given}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want
