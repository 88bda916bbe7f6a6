"""Decoders: each turns a scheduled batch into committed tokens."""
