"""Decoders: each turns a scheduled batch into committed tokens. `DECODERS` is the registry the engine and
`--decoder` read, by decoder name."""

from .autoregressive import AutoregressiveDecoder
from .base import Decoder
from .dparallel import DParallelDecoder
from .silent_thought import SilentThoughtDecoder
from .speculative import SpeculativeDecoder

DECODERS: dict[str, type[Decoder]] = {
    d.name: d for d in (AutoregressiveDecoder, SpeculativeDecoder, DParallelDecoder, SilentThoughtDecoder)
}

__all__ = [
    "DECODERS",
    "Decoder",
    "AutoregressiveDecoder",
    "SpeculativeDecoder",
    "DParallelDecoder",
    "SilentThoughtDecoder",
]
