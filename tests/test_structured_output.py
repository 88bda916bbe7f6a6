"""Structured outputs (xgrammar): outputs follow their schema, regex, choice or grammar; under speculative decoding
(n-gram, draft-model and FSPAD drafters, chains and trees) greedy output is the same as plain decoding's token for
token, and sampling keeps the target's distribution restricted to the grammar; the server takes OpenAI's
`response_format` and vLLM's extras, and refuses a bad constraint with a 400 naming its field."""

from __future__ import annotations

import json
import re

import openai
import pytest
import torch
from test_shipped_drafters import FSPAD

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.config import DEFAULT_MODEL
from leapserve.decoding.errors import InvalidRequestError
from leapserve.decoding.structured_output import StructuredOutputsParams as Constraint
from test_server import API_KEY, MODEL, assert_error, client, post, server, tokenizer  # noqa: F401
from test_speculative import DRAWS, VOCAB, _joint_first_two, _tv_tolerance, one_thread, tiny_vocab  # noqa: F401

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
EMAIL = r"[a-z]{1,10}@[a-z]{1,8}\.(com|org)"
CONSTRAINTS = {
    "json_schema": Constraint(json=PERSON),
    "json_object": Constraint(json_object=True),
    "regex": Constraint(regex=EMAIL),
    "choice": Constraint(choice=("yes", "no", "maybe")),
    "grammar": Constraint(grammar='root ::= "The answer is " ("red" | "green" | "blue") "."'),
}
CHATS = [
    [{"role": "user", "content": "Describe a person called Ada as JSON with her name and age."}],
    [{"role": "user", "content": "Write an email address for Bob, then say if the sky is blue."}],
]


def follows(name: str, text: str) -> bool:
    if name in ("json_schema", "json_object"):
        value = json.loads(text)
        if name == "json_object":
            return isinstance(value, dict)
        return set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)
    if name == "regex":
        return re.fullmatch(EMAIL, text) is not None
    if name == "choice":
        return text in ("yes", "no", "maybe")
    return re.fullmatch(r"The answer is (red|green|blue)\.", text) is not None


@pytest.fixture(scope="module")
def plain_smollm2():
    return LLM(DEFAULT_MODEL, decoder="autoregressive", enforce_eager=True, kv_cache_tokens=4096)


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "ngram", "num_speculative_tokens": 4},
        {"method": "draft_model", "model": "checkpoints/smollm2-135m-instruct-adaspec", "tree": [2, 2, 1]},
        {"method": "fspad", "model": str(FSPAD), "num_speculative_tokens": 3},
        {  # the default configuration's drafts: a lookup chain in the tree
            "method": "fspad",
            "model": str(FSPAD),
            "tree": {"depth": 4, "top_k": 4, "total_tokens": 8},
            "lookup": {"tokens": 8},
        },
    ],
    ids=["ngram-chain", "draft-model-tree", "fspad-chain", "fspad-tree-lookup"],
)
def test_greedy_under_a_grammar_is_the_same_with_speculation(plain_smollm2, spec):
    fast = LLM(DEFAULT_MODEL, enforce_eager=True, kv_cache_tokens=4096, speculative_config={**spec, "adaptive": False})
    accepted = 0
    for name, constraint in CONSTRAINTS.items():
        params = SamplingParams(temperature=0, max_tokens=48, structured_outputs=constraint)
        want = [o.outputs[0] for o in plain_smollm2.chat(CHATS, params, use_tqdm=False)]
        got = fast.chat(CHATS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [w.token_ids for w in want], name
        for w in want:  # every constraint but json_object bounds the output's length
            assert w.finish_reason == "stop" or name == "json_object", (name, w.text)
            assert w.finish_reason != "stop" or follows(name, w.text), (name, w.text)
        accepted += sum(o.metrics.accepted_tokens for o in got)
    assert accepted > 0  # the drafts did take part


def test_sampling_under_a_grammar_keeps_the_target_distribution(tiny_vocab, one_thread):  # noqa: F811
    """Two tokens drawn under a regex that allows 3 of the 24 tokens first and 3 others second, with a draft-model
    tree: their joint law is the target's restricted at each position to what the grammar allows there, and
    renormalized (so a mask taken at the wrong position of a draft path would show)."""
    first, second = [1, 2, 3], [3, 5, 7]
    constraint = Constraint(regex="(w1|w2|w3)(w3|w5|w7)(w1|w2|w3|w5|w7)*")
    params = SamplingParams(temperature=1.0, max_tokens=3, structured_outputs=constraint)
    prompt = [3, 5, 7, 3, 5, 7, 3]
    masks = torch.full((2, VOCAB), float("-inf"))
    masks[0, first] = masks[1, second] = 0.0
    exact = _joint_first_two(tiny_vocab.target, prompt, params, (masks[0], masks[1]))
    llm = LLM(
        str(tiny_vocab.target),
        kv_cache_tokens=DRAWS * 32,
        max_num_seqs=512,
        max_model_len=64,
        speculative_config={"method": "draft_model", "model": str(tiny_vocab.draft), "tree": [3, 2], "adaptive": False},
    )
    seeded = [SamplingParams(**{**params.__dict__, "seed": i, "ignore_eos": True}) for i in range(DRAWS)]
    outs = llm.generate([prompt] * DRAWS, seeded, use_tqdm=False)
    firsts = torch.tensor([o.outputs[0].token_ids[:2] for o in outs])
    assert set(firsts[:, 0].tolist()) <= set(first) and set(firsts[:, 1].tolist()) <= set(second)
    counts = torch.bincount(firsts[:, 0] * VOCAB + firsts[:, 1], minlength=VOCAB * VOCAB).double()
    tv = 0.5 * float((counts / DRAWS - exact.flatten()).abs().sum())
    tolerance = _tv_tolerance(exact, DRAWS)
    assert tv < tolerance, f"TV {tv:.4f} >= {tolerance:.4f}"
    # the unconstrained law is far outside the tolerance, and drafts were accepted
    free = _joint_first_two(tiny_vocab.target, prompt, SamplingParams(temperature=1.0))
    assert 0.5 * float((free - exact).abs().sum()) > 1.5 * tolerance
    assert sum(o.metrics.accepted_tokens for o in outs) > DRAWS // 50


def test_bad_constraints_are_refused(plain_smollm2):
    engine = plain_smollm2.engine
    for bad, param in [
        (Constraint(json='{"type": "object"', param="response_format"), "response_format"),
        (Constraint(regex="(a", param="guided_regex"), "guided_regex"),
        (Constraint(grammar='root ::= "a" |', param="structured_outputs"), "structured_outputs"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            engine.validate_prompt([1, 2], SamplingParams(structured_outputs=bad))
        assert e.value.param == param
    with pytest.raises(InvalidRequestError, match="exactly one"):
        Constraint(regex="a", choice=("b",))
    with pytest.raises(InvalidRequestError) as e:
        engine.validate_prompt([1, 2], SamplingParams(min_tokens=2, structured_outputs=Constraint(choice=("a",))))
    assert e.value.param == "min_tokens"


COLOR = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}


def test_server_response_format_and_vllm_extras(client, server):  # noqa: F811
    messages = [{"role": "user", "content": "Pick a colour."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "colour", "schema": COLOR, "strict": True}}
    kwargs = dict(model=MODEL, messages=messages, max_tokens=32, temperature=0.7, seed=3, response_format=fmt)
    for reply in (
        client.chat.completions.create(**kwargs).choices[0].message.content,
        "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)),
    ):
        assert json.loads(reply)["color"] in ("red", "green", "blue")
    obj = client.chat.completions.create(**{**kwargs, "response_format": {"type": "json_object"}, "max_tokens": 64})
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)
    picked = client.completions.create(
        model=MODEL, prompt="Yes or no?", max_tokens=8, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert picked.choices[0].text in ("yes", "no") and picked.choices[0].finish_reason == "stop"
    matched = client.completions.create(
        model=MODEL, prompt="A number:", max_tokens=8, extra_body={"structured_outputs": {"regex": "[0-9]{3}"}}
    )
    assert re.fullmatch("[0-9]{3}", matched.choices[0].text)
    chat = {"model": MODEL, "messages": messages, "max_tokens": 4}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    assert_error(
        post(server, "/v1/chat/completions", {**chat, "response_format": bad_schema}), 400, param="response_format"
    )
    assert_error(post(server, "/v1/chat/completions", {**chat, "guided_regex": "(a"}), 400, param="guided_regex")
    both = {**chat, "guided_regex": "a", "guided_choice": ["b"]}
    assert_error(post(server, "/v1/chat/completions", both), 400, param="guided_choice")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**kwargs, "response_format": {"type": "yaml"}})
