"""`leapserve serve --backend vllm` without running vLLM: how leapserve's engine config becomes a `vllm serve`
command line, and what is refused with a message. (The served end to end: `test_vllm.py`.)"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, LlamaForCausalLM

from leapserve.cli.main import main
from leapserve.decoding.config import CacheConfig, EngineConfig, ModelConfig
from leapserve.drafters.checkpoints import SHARED_WITH_TARGET
from leapserve.drafters.fspad_model import FSPAD_EAGLE_ARCHITECTURE, FSPADConfig, FSPADModel
from leapserve.server import vllm_backend
from leapserve.server.vllm_backend import Parallelism, find_vllm, vllm_command
from leapserve.training.adaspec import draft_export, draft_from_target
from leapserve.training.checkpoint import export_checkpoint
from leapserve.vllm_plugin.openai_errors import OpenAIErrorShape, openai_error


def command(model_dir: Path, speculative_config: dict | None = None, **cache) -> list[str]:
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=256),
        cache=CacheConfig(**cache),
        speculative_config=speculative_config,
    )
    return vllm_command(config, "127.0.0.1", 9000, "key", "warning", Parallelism(tensor_parallel_size=2), "vllm")


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_the_engine_config_becomes_vllm_flags(tiny_model_dir):
    cmd = command(tiny_model_dir, kv_cache_tokens=1000)
    assert cmd[:3] == ["vllm", "serve", str(tiny_model_dir)]
    assert option(cmd, "--served-model-name") == str(tiny_model_dir) and option(cmd, "--dtype") == "float32"
    assert option(cmd, "--max-model-len") == "256" and option(cmd, "--tensor-parallel-size") == "2"
    assert option(cmd, "--api-key") == "key" and option(cmd, "--port") == "9000"
    hf = AutoConfig.from_pretrained(tiny_model_dir)  # K and V, fp32, every layer's KV heads
    per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * (hf.hidden_size // hf.num_attention_heads) * 4
    assert option(cmd, "--kv-cache-memory-bytes") == str(1000 * per_token)
    assert "--speculative-config" not in cmd
    middleware = option(cmd, "--middleware")
    module, name = middleware.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is OpenAIErrorShape


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"error": {"message": "m", "type": "BadRequestError", "param": "max_tokens", "code": 400}},
         {"message": "m", "type": "invalid_request_error", "param": "max_tokens", "code": None}),
        (400, {"error": {"message": "m", "type": "Bad Request", "param": "body.prompt.1", "code": 400}},
         {"message": "m", "type": "invalid_request_error", "param": "prompt", "code": None}),
        (400, {"error": {"message": "m", "type": "Bad Request", "param": "body.28", "code": 400}},
         {"message": "m", "type": "invalid_request_error", "param": None, "code": None}),
        (400, {"error": {"message": "m", "type": "BadRequestError", "param": "input_tokens", "code": 400}},
         {"message": "m", "type": "invalid_request_error", "param": "prompt", "code": None}),
        (404, {"error": {"message": "m", "type": "NotFoundError", "param": "model", "code": 404}},
         {"message": "m", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}),
        (401, {"error": "Unauthorized"},
         {"message": "invalid or missing API key", "type": "invalid_request_error", "param": None,
          "code": "invalid_api_key"}),
        (404, {"detail": "Not Found"},
         {"message": "no route GET /nowhere", "type": "invalid_request_error", "param": None, "code": None}),
        (500, {"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}},
         {"message": "boom", "type": "server_error", "param": None, "code": None}),
    ],
)  # fmt: skip
def test_vllms_error_bodies_in_openais_shape(status, body, error):
    assert openai_error(status, body, "GET", "/nowhere") == {"error": error}


def test_speculative_configs_map_onto_vllms(tiny_model_dir, tmp_path, monkeypatch):
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}
    assert json.loads(option(command(tiny_model_dir, ngram), "--speculative-config")) == {
        **ngram,
        "prompt_lookup_min": 1,
    }
    draft = {"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 2}
    assert json.loads(option(command(tiny_model_dir, draft), "--speculative-config")) == draft
    # fspad: exported once into the cache in the EAGLE layout, served as eagle
    monkeypatch.setenv("LEAPSERVE_CACHE", str(tmp_path / "cache"))
    fspad = save_tiny_fspad(tiny_model_dir, tmp_path / "fspad")
    spec = json.loads(
        option(
            command(tiny_model_dir, {"method": "fspad", "model": str(fspad), "num_speculative_tokens": 3}),
            "--speculative-config",
        )
    )
    assert spec["method"] == "eagle" and spec["num_speculative_tokens"] == 3
    export = Path(spec["model"])
    assert export.parent == tmp_path / "cache" / "vllm-exports"
    assert json.loads((export / "config.json").read_text())["architectures"] == [FSPAD_EAGLE_ARCHITECTURE]
    again = json.loads(
        option(
            command(tiny_model_dir, {"method": "fspad", "model": str(fspad), "num_speculative_tokens": 2}),
            "--speculative-config",
        )
    )
    assert again["model"] == spec["model"]  # the same weights: the same export
    assert "--worker-cls" not in command(
        tiny_model_dir, {"method": "fspad", "model": str(fspad), "num_speculative_tokens": 3}
    )


def test_an_fspad_tree_maps_onto_leapserves_tree_worker(tiny_model_dir, tmp_path, monkeypatch):
    """An EAGLE-2 tree goes into the export's config (leapserve's defaults filled in), vLLM reserves its nodes as
    speculative tokens, and vLLM runs leapserve's tree worker; an export given as the drafter is copied with the
    tree changed, not altered."""
    monkeypatch.setenv("LEAPSERVE_CACHE", str(tmp_path / "cache"))
    fspad = save_tiny_fspad(tiny_model_dir, tmp_path / "fspad")
    cmd = command(tiny_model_dir, {"method": "fspad", "model": str(fspad), "tree": {"depth": 4, "top_k": 6}})
    spec = json.loads(option(cmd, "--speculative-config"))
    assert option(cmd, "--worker-cls") == "leapserve.vllm_plugin.tree_runner.TreeCPUWorker"
    assert spec["method"] == "eagle" and spec["num_speculative_tokens"] == 16  # total_tokens' default
    export = Path(spec["model"])
    tree = {"depth": 4, "top_k": 6, "total_tokens": 16}
    assert json.loads((export / "config.json").read_text())["leapserve_tree"] == tree
    other = {"depth": 5, "top_k": 8, "total_tokens": 24}
    again = json.loads(option(command(tiny_model_dir, {"method": "fspad", "model": str(export), "tree": other}),
                              "--speculative-config"))  # fmt: skip
    assert again["num_speculative_tokens"] == 24 and again["model"] != spec["model"]
    assert json.loads((Path(again["model"]) / "config.json").read_text())["leapserve_tree"] == other
    assert json.loads((export / "config.json").read_text())["leapserve_tree"] == tree
    assert (
        load_file(str(Path(again["model"]) / "model.safetensors")).keys()
        == load_file(str(export / "model.safetensors")).keys()
    )
    # a shipped drafter is named, not given as a path (the shipped directory is the tiny one's here)
    from leapserve.decoding import model_loader

    monkeypatch.setattr(model_loader, "SHIPPED_DIR", tmp_path)
    named = json.loads(option(command(tiny_model_dir, {"method": "fspad", "model": "fspad", "tree": tree}),
                              "--speculative-config"))  # fmt: skip
    assert json.loads((Path(named["model"]) / "config.json").read_text())["leapserve_tree"] == tree


def save_tiny_fspad(target: Path, out: Path) -> Path:
    """A random FSPAD drafter for `target`, in leapserve's own checkpoint format."""
    config = FSPADConfig.from_target(AutoConfig.from_pretrained(target))
    torch.manual_seed(0)
    state = FSPADModel(config).state_dict()
    return export_checkpoint(out, state, {"leapserve_drafter": "fspad", **config.to_dict()}, "# random\n")


@pytest.mark.parametrize(
    ("speculative_config", "message"),
    [
        ({"method": "fspad", "model": "x", "tree": [2, 2]}, "trees in vLLM are EAGLE-2 trees"),
        ({"method": "draft_model", "model": "x", "tree": {"depth": 3}}, "trees in vLLM are EAGLE-2 trees"),
        ({"method": "ngram", "num_speculative_tokens": 2, "layout": "padded"}, 'no "padded" layout'),
        ({"method": "fspad", "model": "x", "num_speculative_tokens": 2, "dtype": "bfloat16"}, 'drop "dtype"'),
        ({"method": "fspad", "model": "x", "num_speculative_tokens": 2, "lookup": {"tokens": 4}}, 'drop "lookup"'),
    ],
)
def test_what_vllm_cannot_do_is_refused(tiny_model_dir, speculative_config, message):
    with pytest.raises(ValueError, match=message):
        command(tiny_model_dir, speculative_config)


def test_diffusion_lms_are_refused(tiny_model_dir, tmp_path):
    mdm = shutil.copytree(tiny_model_dir, tmp_path / "mdm")
    config = json.loads((mdm / "config.json").read_text())
    (mdm / "config.json").write_text(
        json.dumps({**config, "diffusion_lm": {"mask_token_id": 0, "logits_shift": False}})
    )
    with pytest.raises(ValueError, match="does not serve masked diffusion LMs"):
        command(mdm)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tensor-parallel-size", "2"], "tensor and pipeline parallelism run on vLLM: add --backend vllm"),
        (["--backend", "vllm", "--logits-processors", "fault_injection:fail_if_poisoned"], "--backend native only"),
        (["--backend", "vllm", "--vllm-executable", "/nonexistent/vllm"], "/nonexistent/vllm: not an executable"),
        (["--backend", "vllm"], "no vLLM found"),
    ],
)
def test_serve_refuses_backend_mismatches(argv, message, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm on PATH
    monkeypatch.delenv("LEAPSERVE_VLLM", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./.venv-vllm
    monkeypatch.setattr(vllm_backend, "CHECKOUT_VLLM", tmp_path / "checkout" / ".venv-vllm" / "bin" / "vllm")
    with pytest.raises(SystemExit) as exc:
        main(["serve", *argv])
    assert message in str(exc.value)


def test_find_vllm_prefers_the_explicit_one(tmp_path, monkeypatch):
    fake = tmp_path / "vllm"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv("LEAPSERVE_VLLM", raising=False)
    assert find_vllm(str(fake)) == str(fake.resolve())
    monkeypatch.setenv("LEAPSERVE_VLLM", str(fake))
    assert find_vllm() == str(fake.resolve())
    monkeypatch.setenv("LEAPSERVE_VLLM", str(tmp_path / "missing"))  # named, so not silently another one
    with pytest.raises(ValueError, match=r"\$LEAPSERVE_VLLM .*missing: not an executable file"):
        find_vllm()


def test_find_vllm_falls_back_to_the_checkouts_venv(tmp_path, monkeypatch):
    """Run from another directory, with no vllm on PATH or in $LEAPSERVE_VLLM: the one `make setup-vllm` built in
    leapserve's checkout."""
    built = tmp_path / "checkout" / ".venv-vllm" / "bin" / "vllm"
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("PATH", str(elsewhere))
    monkeypatch.delenv("LEAPSERVE_VLLM", raising=False)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(vllm_backend, "CHECKOUT_VLLM", built)
    assert find_vllm() == str(built.resolve())


def test_the_checkouts_venv_is_where_make_builds_it():
    assert vllm_backend.CHECKOUT_VLLM == Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "vllm"


def save_tiny_adaspec(target: Path, out: Path, layers: list[int]) -> Path:
    """An AdaSPEC-style draft of `target`'s `layers`, stored as `leapserve train adaspec` stores it: its own layers,
    the embedding and LM head shared with the target."""
    model = LlamaForCausalLM.from_pretrained(target, dtype=torch.float32)
    tensors, config = draft_export(draft_from_target(model, layers), str(target), layers)
    return export_checkpoint(out, tensors, config, "# a draft sharing its target's embedding and head\n")


def test_a_draft_sharing_its_targets_tensors_is_written_whole_for_vllm(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPSERVE_CACHE", str(tmp_path / "cache"))
    draft = save_tiny_adaspec(tiny_model_dir, tmp_path / "adaspec", [1])
    assert "model.embed_tokens.weight" not in load_file(str(draft / "model.safetensors"))
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2}
    whole = Path(json.loads(option(command(tiny_model_dir, spec), "--speculative-config"))["model"])
    assert whole.parent == tmp_path / "cache" / "vllm-exports"
    assert SHARED_WITH_TARGET not in json.loads((whole / "config.json").read_text())
    tensors, target = (
        load_file(str(whole / "model.safetensors")),
        load_file(str(next(tiny_model_dir.glob("*.safetensors")))),
    )
    assert torch.equal(tensors["model.embed_tokens.weight"], target["model.embed_tokens.weight"])
    own = target["model.layers.1.mlp.up_proj.weight"].half().float()  # the draft stores its own layers in fp16
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], own)
    plain = {"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 2}
    assert json.loads(option(command(tiny_model_dir, plain), "--speculative-config"))["model"] == str(tiny_model_dir)
