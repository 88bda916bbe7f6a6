"""`leapserve bench offline --decoders`: the decoders to compare, each `[LABEL=]autoregressive`,
`[LABEL=]speculative:NAME` (a named config) or `[LABEL=]speculative:{JSON speculative config}`."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from leapserve.decoding.config import SpeculativeConfig

from .hf_baselines import DEFAULT_NGRAM

BASELINE = "autoregressive"
# `speculative:NAME` shorthands; anything else after `speculative:` is a JSON speculative config.
NAMED_CONFIGS = {
    "ngram": DEFAULT_NGRAM,
    "ngram-padded": {"method": "ngram", "num_speculative_tokens": 4, "layout": "padded"},
}


@dataclass(frozen=True)
class Decoder:
    label: str
    speculative_config: dict | None  # None: autoregressive


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


def parse_decoder(item: str) -> Decoder:
    """`[LABEL=]autoregressive`, `[LABEL=]speculative:NAME` (see NAMED_CONFIGS) or `[LABEL=]speculative:{JSON}`."""
    label = None
    if m := re.match(r"([\w.-]+)=(.*)$", item, re.S):
        label, item = m.group(1), m.group(2).strip()
    if item == BASELINE:
        return Decoder(label or BASELINE, None)
    kind, sep, spec = item.partition(":")
    if kind != "speculative" or not sep:
        raise argparse.ArgumentTypeError(
            f"unknown decoder {item!r}: expected autoregressive, speculative:NAME ({', '.join(NAMED_CONFIGS)}) or "
            "speculative:{JSON speculative config}"
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
    """argparse type for --decoders: comma-separated decoder specs, `autoregressive` first (added if missing)."""
    decoders = [parse_decoder(item) for item in split_top_level(text)]
    labels = [d.label for d in decoders]
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"decoder labels must differ, got {labels}; name them with LABEL=SPEC")
    baseline = [d for d in decoders if d.speculative_config is None][:1] or [Decoder(BASELINE, None)]
    return baseline + [d for d in decoders if d not in baseline]
