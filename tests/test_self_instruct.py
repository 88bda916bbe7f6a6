"""Instructions the target writes itself (`leapserve train data --self-instructions`): the filter, the template
prefix, resumption, and the data they end up in."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from functools import partial

import pytest

from leapserve.cli.main import build_parser
from leapserve.decoding import LLM
from leapserve.decoding.args import config_from_args
from leapserve.decoding.config import DEFAULT_MODEL
from leapserve.prompts import HANDWRITTEN
from leapserve.training.checkpoint import describe_data
from leapserve.training.data import DataConfig, generate_data, read_sequences
from leapserve.training.self_instruct import (
    SENTINEL,
    Filters,
    Keeper,
    evaluation_prompts,
    topics,
    user_turn_prefix,
    write_instructions,
)

LOOSE = Filters(min_chars=1, min_words=1, min_letter_share=0.0, key_words=64, require_stop=False)


def test_keeper_keeps_ordinary_instructions_once_and_never_an_evaluation_prompt():
    held_out = evaluation_prompts()
    handwritten = next(p for p in HANDWRITTEN if isinstance(p, str))
    keep = Keeper(Filters(), held_out)
    assert keep("How do I make my sourdough bread rise more in a cold kitchen?")
    assert not keep("how do I make my SOURDOUGH bread rise more, in a cold kitchen")  # the same, normalised
    assert not keep("How do I make my sourdough bread rise more quickly when the kitchen is warm?")  # same opening
    assert keep("Write a short poem about the first snow of winter.")
    assert not keep("Too short.")
    assert not keep("<|im_start|>user Write a poem about the first rain of spring please")
    assert not keep("{}[]()=+-*/ 12345 67890 ::: ;;; ... ,,, !!! ??? ### $$$ %%% ^^^ &&&")
    assert not keep(handwritten)
    assert len(held_out) > 100 and topics()["general"] and topics()["python"]


def test_user_turn_prefix_is_the_template_up_to_the_users_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prefix = user_turn_prefix(tok, "You are terse.")
    full = tok.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}], tokenize=False
    )
    assert full.startswith(prefix + "Hi there") and "You are terse." in prefix and SENTINEL not in prefix
    plain = tok.chat_template
    try:  # a template that refuses system messages: the prefix has none
        tok.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
            "<u>{{ m['content'] }}</u>{% endfor %}"
        )
        assert user_turn_prefix(tok, "You are terse.") == "<u>"
    finally:
        tok.chat_template = plain


def test_interrupted_writing_resumes_to_the_same_instructions(tiny_model_dir, tmp_path):
    llm = LLM(str(tiny_model_dir), enforce_eager=True, kv_cache_tokens=4096)
    straight = write_instructions(llm, tmp_path / "a.jsonl", 10, seed=3, batch_size=4, max_tokens=6, filters=LOOSE)
    assert len(straight) == len(set(straight)) == 10
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["kept"] for r in rows[:10])  # three whole batches
    # an interruption after the first batch, in the middle of writing the second
    lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b.jsonl").write_text("".join(lines[:4]) + lines[4][:7])
    resumed = write_instructions(llm, tmp_path / "b.jsonl", 10, seed=3, batch_size=4, max_tokens=6, filters=LOOSE)
    assert resumed == straight
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    # a model that writes nothing usable stops with a clear error instead of looping
    with pytest.raises(RuntimeError, match="not write usable user messages"):
        write_instructions(llm, tmp_path / "c.jsonl", 2, batch_size=4, max_tokens=4, max_attempts_per_instruction=2)


def test_self_instructions_are_answered_into_the_training_data(tiny_model_dir, tmp_path, monkeypatch):
    from leapserve.training import data

    monkeypatch.setattr(data, "write_instructions", partial(write_instructions, filters=LOOSE))  # a random model
    cfg = DataConfig(
        model=str(tiny_model_dir), out=str(tmp_path), num_prompts=3, self_instructions=2, max_tokens=8, device="cpu"
    )
    generate_data(cfg)
    rows = [json.loads(line) for line in (tmp_path / "self-instructions.jsonl").read_text().splitlines()]
    own = [r["prompt"] for r in rows if r["kept"]][:2]
    sequences = read_sequences(tmp_path, with_features=False)
    assert len(sequences) == 5
    tok = LLM(str(tiny_model_dir), enforce_eager=True, kv_cache_tokens=512).tokenizer
    for seq, instruction in zip((sequences[1], sequences[3]), own):  # interleaved with the sets' three prompts
        chat = tok.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        assert seq.input_ids[~seq.loss_mask].tolist() == tok.encode(chat, add_special_tokens=False)
    card_data = describe_data(tmp_path)  # what a model card says of its data
    assert "5 sequences" in card_data and "3 prompts of the `train` split of" in card_data
    assert f"2 instructions the model wrote itself (from {len(rows)} attempts)" in card_data
    recipe = card_data.split("```")[1].strip()  # the command that makes this data again
    args = build_parser().parse_args(shlex.split(recipe)[1:])
    made = json.loads((tmp_path / "meta.json").read_text())["config"]
    assert asdict(config_from_args(DataConfig, args)) == {**made, "device": "auto"}  # where it ran is not named
    with pytest.raises(ValueError, match="--self-instructions 2, not 3"):
        generate_data(DataConfig(**{**vars(cfg), "self_instructions": 3}))
    # the sets' prompts and the instructions are interleaved: more prompts would move every later shard's
    with pytest.raises(ValueError, match="--num-prompts 3, not 4"):
        generate_data(DataConfig(**{**vars(cfg), "num_prompts": 4}))


@pytest.mark.slow
def test_the_default_model_writes_usable_instructions(tmp_path):
    """SmolLM2-135M-Instruct, given its template's user-turn prefix, writes user messages the filter keeps (12 of
    the first 16 attempts of seed 0, 2026-12-02): at least 8 of at most 32 attempts here."""
    llm = LLM(DEFAULT_MODEL, decoder="autoregressive", kv_cache_tokens=8192)
    got = write_instructions(llm, tmp_path / "own.jsonl", 8, batch_size=16, max_attempts_per_instruction=4)
    rows = [json.loads(line) for line in (tmp_path / "own.jsonl").read_text().splitlines()]
    assert len(got) == len(set(got)) == 8 and len(rows) <= 32
    assert all(len(g.split()) >= 4 and "<|" not in g for g in got)
