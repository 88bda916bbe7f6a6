"""What a structured-output constraint costs a decode step, plain and speculative.

    python -m leapserve.benchmarks.grammar_cost                  # SmolLM2, plain and the make-serve FSPAD tree

For each decoder and constraint, one request at a time generates 64 tokens (greedy, `ignore_eos`) for two chat
prompts, after a warm-up; reported: wall time per target forward, masks per forward, and the time spent in the
grammar's masks and commits (wall clock around `SequenceGrammar.mask` and `accept`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.structured_output import SequenceGrammar
from leapserve.decoding.structured_output import StructuredOutputsParams as Constraint

FSPAD_TREE = {
    "method": "fspad",
    "model": "checkpoints/smollm2-135m-instruct-fspad",
    "tree": {"depth": 4, "top_k": 4, "total_tokens": 8},
    "adaptive": False,
}
CONSTRAINTS = {
    "none": None,
    "regex [a-z ,.]+": Constraint(regex="[a-z ,.]+"),
    "JSON schema": Constraint(
        json={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    ),
}
CHATS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Describe a forest walk."}],
]


class GrammarTimer:
    """Counts and times every `SequenceGrammar.mask` and `accept` call while active."""

    def __init__(self) -> None:
        self.calls = {"mask": 0, "accept": 0}
        self.seconds = {"mask": 0.0, "accept": 0.0}
        self._saved: dict[str, Callable] = {}

    def __enter__(self) -> GrammarTimer:
        for name in self.calls:
            original = self._saved[name] = getattr(SequenceGrammar, name)

            def timed(grammar, *args, _original=original, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(grammar, *args, **kwargs)
                finally:
                    self.calls[_name] += 1
                    self.seconds[_name] += time.perf_counter() - start

            setattr(SequenceGrammar, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(SequenceGrammar, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    print("| decoder | constraint | ms per step | masks per step | ms of masks per step | ms of commits per step |")
    print("|---|---|---|---|---|---|")
    for label, spec in (("plain", None), ("FSPAD, 8-node trees", FSPAD_TREE)):
        llm = LLM(args.model, decoder=None if spec else "autoregressive", speculative_config=spec)
        for name, constraint in CONSTRAINTS.items():
            params = SamplingParams(
                temperature=0, max_tokens=args.max_tokens, ignore_eos=True, structured_outputs=constraint
            )
            llm.chat(CHATS[:1], params, use_tqdm=False)  # warm-up (and the grammar compiled)
            with GrammarTimer() as timer:
                start = time.perf_counter()
                outs = [llm.chat([chat], params, use_tqdm=False)[0] for chat in CHATS]
                elapsed = time.perf_counter() - start
            steps = sum(o.metrics.target_forwards for o in outs if o.metrics)
            print(
                f"| {label} | {name} | {elapsed / steps * 1e3:.1f} | {timer.calls['mask'] / steps:.1f} | "
                f"{timer.seconds['mask'] / steps * 1e3:.2f} | {timer.seconds['accept'] / steps * 1e3:.3f} |"
            )


if __name__ == "__main__":
    main()
