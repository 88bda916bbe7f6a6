"""Instructions the target writes itself, for training data with no dataset download (the Magpie technique).

An aligned chat model given only its template's text up to where a user's message begins writes a plausible user
message. Each attempt's system message names a kind of request and a topic, drawn from material on any Python
install (`topics()`: leapserve's chat topics, the titles of the Python reference's topics and the standard
library's module names), so the messages spread over subjects; the target samples at temperature 1 until its turn
ends. An attempt is kept when it passes `Filters` (length, words, mostly letters, no template text, not a duplicate
by normalised text or by its opening words, not one of leapserve's evaluation prompts).

Every attempt is appended to a JSON-lines file as its batch finishes (`{"prompt", "kind", "topic", "kept"}`), so a
rerun resumes after the last whole batch, with the instructions kept so far.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from leapserve.decoding.sampling_params import SamplingParams
from leapserve.prompts import HANDWRITTEN, PROMPT_SETS, load_prompts
from leapserve.prompts.templates import CHAT_TOPICS

if TYPE_CHECKING:
    from leapserve.decoding.llm import LLM

# (kind of request, where its topics come from)
KINDS = [
    ("question", "general"),
    ("request for an explanation", "general"),
    ("request for advice", "general"),
    ("writing task (an email, a story, a poem or a description)", "general"),
    ("request to summarise or rewrite a short text that they paste into the message", "general"),
    ("maths word problem", "general"),
    ("programming question", "python"),
    ("request to write a small program", "python"),
]
SYSTEM = "You are a helpful AI assistant. The user will send you a {kind} about {topic}."
INSTRUCTIONS_FILE = "self-instructions.jsonl"  # in a `leapserve train data` directory
SENTINEL = "\u2063LEAPSERVE-USER-MESSAGE\u2063"  # marks where the user's text would begin in the rendered template


@dataclass(frozen=True)
class Filters:
    """What an instruction must be to be kept."""

    min_chars: int = 20
    max_chars: int = 800
    min_words: int = 4
    min_letter_share: float = 0.6  # letters and spaces among its characters
    key_words: int = 8  # two instructions opening with the same this many words are duplicates
    require_stop: bool = True  # the model ended its turn (not cut at max_tokens)


def topics() -> dict[str, list[str]]:
    """Topic lists by source, from what every Python install carries."""
    from pydoc_data.topics import topics as reference

    modules = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and "test" not in m)
    titles = sorted({t.replace("-", " ").replace("_", " ") for t in reference if not t.startswith("__")})
    return {"general": sorted(set(CHAT_TOPICS) | set(titles)), "python": [f"Python's `{m}` module" for m in modules]}


def user_turn_prefix(tokenizer, system: str) -> str:
    """The chat template's text up to where the user's first message begins, after `system` (templates that
    refuse a system message get none)."""
    for messages in (
        [{"role": "system", "content": system}, {"role": "user", "content": SENTINEL}],
        [{"role": "user", "content": SENTINEL}],
    ):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template may raise anything on a system message
            continue
        if SENTINEL in text:
            return text[: text.index(SENTINEL)]
    raise ValueError("the model's chat template does not render a user message: it cannot write instructions")


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def evaluation_prompts() -> set[str]:
    """Normalised texts of every prompt leapserve measures on: never to be trained on."""
    held = [load_prompts(name, "test") for name in PROMPT_SETS]
    texts = [p for group in held for p in group]
    for item in HANDWRITTEN:
        texts += [item] if isinstance(item, str) else [m["content"] for m in item if m["role"] == "user"]
    return {normalise(t) for t in texts}


class Keeper:
    """Decides which instructions to keep, remembering those kept (duplicates) and what is held out."""

    def __init__(self, filters: Filters, held_out: set[str]):
        self.filters, self.held_out = filters, held_out
        self.seen: set[str] = set()
        self.openings: set[str] = set()

    def __call__(self, text: str) -> bool:
        f = self.filters
        norm = normalise(text)
        opening = " ".join(norm.split()[: f.key_words])
        letters = sum(c.isalpha() or c.isspace() for c in text)
        ok = (
            f.min_chars <= len(text) <= f.max_chars
            and len(text.split()) >= f.min_words
            and letters >= f.min_letter_share * len(text)
            and "<|" not in text
            and "|>" not in text
            and SENTINEL not in text
            and norm not in self.seen
            and opening not in self.openings
            and norm not in self.held_out
        )
        if ok:
            self.seen.add(norm)
            self.openings.add(opening)
        return ok


def _read_attempts(path: Path) -> list[dict]:
    """The attempts of whole batches written so far (a line cut by an interruption is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def write_instructions(
    llm: LLM,
    path: str | Path,
    num_instructions: int,
    seed: int = 0,
    batch_size: int = 128,  # attempts a call (`train data` decodes a shard's worth at once, 128 by default)
    max_tokens: int = 128,
    filters: Filters = Filters(),
    max_attempts_per_instruction: int = 8,
) -> list[str]:
    """`num_instructions` instructions written by `llm`'s model, appended to `path` as they come (resumed from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = _read_attempts(path)
    if path.is_file() and len(path.read_text().splitlines()) != len(rows):  # drop a cut line before appending
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    keeper = Keeper(filters, evaluation_prompts())
    kept = [r["prompt"] for r in rows if r["kept"] and keeper(r["prompt"])]
    pools = topics()
    max_attempts = max_attempts_per_instruction * num_instructions
    bar = tqdm(total=num_instructions, initial=min(len(kept), num_instructions), desc="self-instructions", unit="instr")
    while len(kept) < num_instructions:
        start = len(rows)
        if start >= max_attempts:
            bar.close()
            raise RuntimeError(
                f"only {len(kept)} of {num_instructions} instructions kept after {start} attempts: the model does "
                "not write usable user messages (is it a chat model?); see the attempts in " + str(path)
            )
        drawn = []
        for i in range(start, start + batch_size):
            rng = random.Random(f"{seed}:{i}")
            kind, source = rng.choice(KINDS)
            drawn.append((kind, rng.choice(pools[source]), i))
        prompts = [
            llm.tokenizer.encode(
                user_turn_prefix(llm.tokenizer, SYSTEM.format(kind=k, topic=t)), add_special_tokens=False
            )
            for k, t, _ in drawn
        ]
        params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed * 1_000_003 + i) for *_, i in drawn]
        outs = llm.generate(prompts, params, use_tqdm=False)
        batch = []
        for (kind, topic, _), out in zip(drawn, outs):
            text = out.outputs[0].text.strip()
            ok = (out.outputs[0].finish_reason == "stop" or not filters.require_stop) and keeper(text)
            batch.append({"prompt": text, "kind": kind, "topic": topic, "kept": ok})
            if ok and len(kept) < num_instructions:
                kept.append(text)
                bar.update(1)
        with path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in batch))
        rows += batch
    bar.close()
    return kept[:num_instructions]
