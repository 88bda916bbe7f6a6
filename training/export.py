"""`leapserve train export-eagle`: an FSPAD drafter in the EAGLE checkpoint layout vLLM's EAGLE proposer reads:
`fc.*`, `layers.0.*`, `lm_head.weight` and `d2t` for a reduced vocabulary, the embedding left out (shared from the
target), the feature-sampling block and the 2d-wide down_proj where the drafter has them. Its architecture,
`EagleFSPADLlamaForCausalLM`, is what leapserve's vLLM plugin registers; leapserve's `fspad` drafter loads the
export too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from leapserve.decoding.args import DefaultsHelpFormatter
from leapserve.decoding.config import DEFAULT_MODEL, ModelConfig, SpeculativeConfig
from leapserve.decoding.model_loader import load_model, resolve_model
from leapserve.drafters.checkpoints import load_fspad
from leapserve.drafters.fspad_model import to_eagle_layout
from leapserve.drafters.tree_growth import TreeShape

from .checkpoint import command_line, export_checkpoint


def export_eagle(drafter: str | Path, target: str, out: str | Path, tree: dict | None = None) -> Path:
    """`tree`, an EAGLE-2 dynamic tree ({"depth", "top_k", "total_tokens"}, leapserve's defaults for missing keys),
    goes into the export's config as `leapserve_tree`: leapserve's vLLM tree worker then drafts and verifies trees."""
    model = load_fspad(drafter, torch.device("cpu"), torch.float32)
    lm_head = (
        load_model(resolve_model(target), ModelConfig(model=target), torch.device("cpu"), torch.float32)
        .get_output_embeddings()
        .weight.detach()
    )
    tensors, config = to_eagle_layout(model, lm_head)
    if tree is not None:
        config["leapserve_tree"] = dynamic_tree(tree)
    card = (
        f"# {Path(drafter).name} in the EAGLE layout\n\nExported from `{drafter}` for the target `{target}` "
        f"with\n\n```\n{command_line()}\n```\n\nArchitecture `{config['architectures'][0]}`; the target's "
        "embedding is shared, not stored.\n"
    )
    return export_checkpoint(out, tensors, config, card)


def dynamic_tree(tree: dict) -> dict:
    """An EAGLE-2 tree's settings, checked, with leapserve's defaults filled in."""
    spec = SpeculativeConfig.from_dict({"method": "fspad", "model": "-", "tree": tree})
    if not isinstance(spec.tree, dict):
        raise ValueError(f'a tree for vLLM is {{"depth", "top_k", "total_tokens"}}, got {tree!r}')
    shape = TreeShape.from_config(spec)
    return {"depth": shape.depth, "top_k": shape.top_k, "total_tokens": shape.total_tokens}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-eagle",
        help="export an FSPAD drafter to the EAGLE layout vLLM reads",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--drafter", required=True, help="a `leapserve train fspad` checkpoint directory")
    p.add_argument("--model", default=DEFAULT_MODEL, help="its target (for a reduced vocabulary's head)")
    p.add_argument("--out", required=True, help="the export directory")
    p.add_argument(
        "--tree",
        type=json.loads,
        default=None,
        help='an EAGLE-2 tree for vLLM, e.g. \'{"depth": 5, "top_k": 8, "total_tokens": 24}\' (serve with '
        "--worker-cls leapserve.vllm_plugin.tree_runner.TreeCPUWorker and num_speculative_tokens = total_tokens)",
    )
    p.set_defaults(handler=lambda a: print(export_eagle(a.drafter, a.model, a.out, a.tree)))
