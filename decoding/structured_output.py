"""Structured outputs: a request's output held to a JSON schema, any JSON object, a regex, a choice of strings or an
EBNF grammar, through xgrammar (as vLLM and SGLang use it).

A grammar is compiled once per distinct spec (`GrammarCompiler`, cached) and each sequence follows it with its own
matcher (`SequenceGrammar`), advanced by every committed token. Its mask is applied where the request's logits are
processed (`sampler.processed_logits`), after penalties and logits processors and before temperature; that is also
where speculative verification and the model drafters process each position of a draft path, so the mask at a node
is the grammar's state after the path to it (accepted on top of the committed tokens, then rolled back). A draft
token the grammar forbids has probability 0 under the target's processed distribution and is never accepted: output
under a grammar is the same with and without speculation, greedy token for token, sampled in distribution.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidRequestError

if TYPE_CHECKING:  # xgrammar is loaded with the first grammar, not with the server
    import xgrammar as xgr

MAX_ROLLBACK = 256  # draft path tokens a mask is computed after (trees and chains are at most 64 deep)
CACHE_SIZE = 256  # compiled grammars kept, least recently used first out


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint, as vLLM's `StructuredOutputsParams`: `json` (a JSON schema, as a dict or its text),
    `json_object` (any JSON object), `regex`, `choice` (one of these strings), `grammar` (xgrammar's EBNF)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    param: str = "structured_outputs"  # the request field it came from, named in errors
    key: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(
                f"{self.param}: give exactly one of json, json_object, regex, choice, grammar (got {given or 'none'})",
                self.param,
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError(f"{self.param}: choice must be a non-empty list of non-empty strings", self.param)
        schema = self.json if not isinstance(self.json, dict) else json.dumps(self.json, sort_keys=True)
        object.__setattr__(self, "key", repr((schema, self.json_object, self.regex, self.choice, self.grammar)))


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary; thread-safe, so the server compiles off its event
    loop. Compiled grammars are cached by spec."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer,
            vocab_size=vocab_size,
            stop_token_ids=stop_token_ids or None,  # None: a model without EOS
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._cache: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar; InvalidRequestError (naming the spec's field) for a schema, regex or grammar that
        does not parse."""
        with self._lock:
            compiled = self._cache.pop(spec.key, None)
            if compiled is not None:
                self._cache[spec.key] = compiled  # most recently used last
                return compiled
        try:
            compiled = self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = re.sub(r"^\[[^]]*\] \S+: ", "", first)  # xgrammar's "[time] file.cc:line: " prefix
            raise InvalidRequestError(f"{spec.param}: {reason}", spec.param) from e
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
        return compiled

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        if spec.json is not None:
            return self._compiler.compile_json_schema(spec.json, any_whitespace=False)
        if spec.json_object:  # any JSON object (xgrammar's builtin JSON grammar also allows arrays and scalars)
            return self._compiler.compile_json_schema({"type": "object"}, any_whitespace=False)
        if spec.regex is not None:
            return self._compiler.compile_regex(spec.regex)
        if spec.choice is not None:
            return self._compiler.compile_regex("|".join(re.escape(c) for c in spec.choice))
        assert spec.grammar is not None
        return self._compiler.compile_grammar(spec.grammar)


class SequenceGrammar:
    """One sequence's place in its grammar: advanced by each committed token; masks logits after a draft path."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, max_rollback_tokens=MAX_ROLLBACK)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace

    def accept(self, token: int) -> bool:
        """Commit `token`; False if the grammar does not allow it (then nothing changes)."""
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token accepted: nothing may follow."""
        return bool(self.matcher.is_terminated())

    def mask(self, logits: torch.Tensor, pending: list[int] | None = None) -> torch.Tensor:
        """`logits` `[V]` with every token the grammar forbids after the committed tokens and `pending` (a draft
        path) at -inf, as a new tensor. What follows a path the grammar forbids, or one that ends with its stop
        token, is never committed (verification rejects the path; the sequence ends at the stop token): those
        logits come back unmasked."""
        accepted = 0
        for token in pending or ():
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                break
            accepted += 1
        try:
            if accepted < len(pending or ()) or self.matcher.is_terminated():
                return logits
            self.matcher.fill_next_token_bitmask(self.bitmask)
            out = logits.float().clone()[None]
            self._apply(out, self.bitmask.to(out.device))
            return out[0].to(logits.dtype)
        finally:
            if accepted:
                self.matcher.rollback(accepted)
