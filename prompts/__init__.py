"""Prompt sets that need no network: chat questions, code tasks, summarisation and maths word problems.

Every set is built deterministically from material on any Python install, so train and benchmark runs on another
machine see the same prompts (up to the Python version, for the two sets drawn from the standard library):

- `chat`: questions written here from templates over a list of everyday and technical topics.
- `code`: "explain / use / write" tasks about public functions of common standard-library modules, taken from
  their names and the first line of their docstrings.
- `summarization`: paragraphs of the Python language reference shipped with the interpreter
  (`pydoc_data.topics`), each with a request to summarise it.
- `math`: grade-school word problems from templates with seeded random numbers.

Each prompt falls in the `train` or the `test` split by a stable hash of its text (one in five is `test`), so
drafters trained on `train` are measured on prompts they never saw. `handwritten` (`prompts/handwritten.py`) is an
evaluation set only, written by hand and never in `train`, nor in `mixed`. `load_jsonl` reads a user's own file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
from pathlib import Path

from .handwritten import HANDWRITTEN
from .templates import CHAT_TEMPLATES, CHAT_TOPICS, CODE_MODULES, CODE_TASKS, MATH_TEMPLATES

SPLITS = ("train", "test", "all")


def _chat() -> list[str]:
    return [t.format(topic=topic) for topic in CHAT_TOPICS for t in CHAT_TEMPLATES]


def _code() -> list[str]:
    prompts = list(CODE_TASKS)
    for module_name in CODE_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not callable(obj) or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = (inspect.getdoc(obj) or "").split("\n")[0].strip().rstrip(".")
            if len(doc) < 20:
                continue
            qualified = f"{module_name}.{name}"
            prompts.append(f"Explain what the Python function `{qualified}` does and show a short example.")
            prompts.append(f"Write a small Python program that uses `{qualified}` ({doc[0].lower() + doc[1:]}).")
    return prompts


def _summarization() -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = sorted(
        {
            " ".join(p.split())
            for text in topics.values()
            for p in text.split("\n\n")
            if 300 <= len(p.strip()) <= 1200 and not p.startswith(" ")
        }
    )
    return [f"Summarize the following text in one or two sentences.\n\n{p}" for p in paragraphs]


def _math() -> list[str]:
    rng = random.Random(0)
    prompts = []
    for _ in range(60):
        for template in MATH_TEMPLATES:
            a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 12)
            prompts.append(template.format(a=a, b=b, c=c) + " Think step by step, then give the final number.")
    return sorted(set(prompts))


PROMPT_SETS = {"chat": _chat, "code": _code, "summarization": _summarization, "math": _math}


def split_of(prompt: str) -> str:
    return "test" if hashlib.sha256(prompt.encode()).digest()[0] % 5 == 0 else "train"


def load_prompts(name: str, split: str = "test", num_prompts: int | None = None, seed: int = 0) -> list[str]:
    """Prompts of one set (or `mixed`: all four, interleaved), shuffled with `seed`, the first `num_prompts`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "mixed":
        per_set = [load_prompts(n, split, None, seed) for n in PROMPT_SETS]
        prompts = [p for group in zip(*per_set) for p in group]
        return prompts[:num_prompts]
    if name not in PROMPT_SETS:
        raise ValueError(
            f"unknown prompt set {name!r}; known: {sorted(PROMPT_SETS)}, 'mixed' and 'handwritten', or pass a "
            ".jsonl file"
        )
    prompts = [p for p in PROMPT_SETS[name]() if split == "all" or split_of(p) == split]
    random.Random(seed).shuffle(prompts)
    return prompts[:num_prompts]


def load_jsonl(path: str | Path, num_prompts: int | None = None) -> list[str | list[dict]]:
    """A user's prompts: one JSON object per line with `prompt` (text) or `messages` (a chat)."""
    prompts: list[str | list[dict]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
                raise ValueError(f"{path}:{lineno}: expected an object with 'prompt' or 'messages'")
            prompts.append(record["prompt"] if "prompt" in record else record["messages"])
    return prompts[:num_prompts]


def load(dataset: str, split: str = "test", num_prompts: int | None = None, seed: int = 0) -> list[str | list[dict]]:
    """A named set (see `PROMPT_SETS`, `mixed` or `handwritten`) or a path to a .jsonl file."""
    if dataset.endswith(".jsonl") or Path(dataset).is_file():
        return load_jsonl(dataset, num_prompts)
    if dataset == "handwritten":  # evaluation only: no train split
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        prompts = [] if split == "train" else list(HANDWRITTEN)
        random.Random(seed).shuffle(prompts)
        return prompts[:num_prompts]
    return load_prompts(dataset, split, num_prompts, seed)
