"""`leapserve bench offline --decoders`: the decoders to compare, each `[LABEL=]autoregressive`,
`[LABEL=]speculative:NAME` (a named config), `[LABEL=]speculative:{JSON speculative config}`, or for a masked
diffusion LM `[LABEL=]dparallel[:{JSON diffusion config}]`."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.diffusion import DiffusionConfig

from .hf_baselines import DEFAULT_NGRAM

BASELINE = "autoregressive"
DIFFUSION = "dparallel"
# `speculative:NAME` shorthands; anything else after `speculative:` is a JSON speculative config.
NAMED_CONFIGS = {
    "ngram": DEFAULT_NGRAM,
    "ngram-padded": {"method": "ngram", "num_speculative_tokens": 4, "layout": "padded"},
}


@dataclass(frozen=True)
class Decoder:
    label: str
    speculative_config: dict | None = None  # None: autoregressive (or dparallel)
    diffusion_config: dict | None = None  # dparallel's, {} for the server default; None: not dparallel

    @property
    def kind(self) -> str:
        """The engine's `decoder`."""
        if self.diffusion_config is not None:
            return DIFFUSION
        return "speculative" if self.speculative_config else BASELINE

    @property
    def diffusion(self) -> DiffusionConfig | None:
        """The diffusion config with its defaults filled in; None unless dparallel."""
        return None if self.diffusion_config is None else DiffusionConfig.from_dict(self.diffusion_config)


def split_top_level(text: str) -> list[str]:
    """Split on the commas that are outside JSON brackets and strings."""
    parts, depth, in_string, escaped, current = [], 0, False, False, []
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def describe(config: dict) -> str:
    """A short label for a speculative config, e.g. `speculative[ngram k=4 padded]`."""
    words = [config["method"]]
    if config.get("model"):
        words.append(Path(str(config["model"])).name)
    words.append(
        f"tree={json.dumps(config['tree'], separators=(',', ':'))}"
        if config.get("tree")
        else f"k={config['num_speculative_tokens']}"
    )
    if config.get("layout", "packed") != "packed":
        words.append(config["layout"])
    if config.get("adaptive") is False:
        words.append("fixed")
    return f"speculative[{' '.join(words)}]"


def describe_diffusion(config: DiffusionConfig) -> str:
    """A short label for a diffusion config, e.g. `dparallel[entropy 0.5 block 32]`."""
    words = {
        "entropy": [f"entropy {config.threshold:g}"],
        "confidence": ["confidence"] + ([] if config.steps is None else [f"steps {config.steps}"]),
        "fixed": [f"fixed k={config.k}"],
    }[config.rule]
    words.append(f"block {config.block_length}")
    if config.gen_length != DiffusionConfig.gen_length:
        words.append(f"gen {config.gen_length}")
    if config.cache != "none":
        words.append(f"cache {config.cache}")
    return f"{DIFFUSION}[{' '.join(words)}]"


def parse_decoder(item: str) -> Decoder:
    """`[LABEL=]autoregressive`, `[LABEL=]speculative:NAME` (see NAMED_CONFIGS), `[LABEL=]speculative:{JSON}`,
    `[LABEL=]dparallel` (the server's default diffusion config) or `[LABEL=]dparallel:{JSON}`."""
    label = None
    if m := re.match(r"([\w.-]+)=(.*)$", item, re.S):
        label, item = m.group(1), m.group(2).strip()
    if item == BASELINE:
        return Decoder(label or BASELINE, None)
    if item == DIFFUSION:
        return Decoder(label or DIFFUSION, diffusion_config={})
    kind, sep, spec = item.partition(":")
    if kind == DIFFUSION and sep:
        try:
            config = json.loads(spec)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{item!r}: not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise argparse.ArgumentTypeError(f"{item!r}: the diffusion config must be a JSON object")
        try:
            diffusion = DiffusionConfig.from_dict(config)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{item!r}: {e}") from e
        return Decoder(label or describe_diffusion(diffusion), diffusion_config=config)
    if kind != "speculative" or not sep:
        raise argparse.ArgumentTypeError(
            f"unknown decoder {item!r}: expected autoregressive, speculative:NAME ({', '.join(NAMED_CONFIGS)}), "
            "speculative:{JSON speculative config}, dparallel or dparallel:{JSON diffusion config}"
        )
    if spec in NAMED_CONFIGS:
        return Decoder(label or f"speculative:{spec}", NAMED_CONFIGS[spec])
    try:
        config = json.loads(spec)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"{item!r}: not a known name ({', '.join(NAMED_CONFIGS)}) nor valid JSON ({e})"
        ) from e
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError(f"{item!r}: the speculative config must be a JSON object")
    try:
        SpeculativeConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{item!r}: {e}") from e
    return Decoder(label or describe(config), config)


def decoder_list(text: str) -> list[Decoder]:
    """argparse type for --decoders: comma-separated decoder specs, the baseline first: `autoregressive` (added if
    missing), or for dparallel decoders (which admit no others) the first one."""
    decoders = [parse_decoder(item) for item in split_top_level(text)]
    labels = [d.label for d in decoders]
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"decoder labels must differ, got {labels}; name them with LABEL=SPEC")
    diffusion = [d.kind == DIFFUSION for d in decoders]
    if any(diffusion):
        if not all(diffusion):
            raise argparse.ArgumentTypeError(
                "dparallel decoders cannot be compared with autoregressive or speculative ones (a masked diffusion "
                "LM runs on dparallel only): list only dparallel decoders, the first being the baseline"
            )
        return decoders
    baseline = [d for d in decoders if d.speculative_config is None][:1] or [Decoder(BASELINE, None)]
    return baseline + [d for d in decoders if d not in baseline]
