"""The drafter registry (`register_drafter`, `make_drafter`) and the drafters' forward observer. Each test registers
methods of its own names: the registry is process-wide, as a plugin's registration is."""

from __future__ import annotations

import pytest

from leapserve.decoding import LLM, SamplingParams
from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.drafter import DraftTree, make_drafter
from leapserve.decoding.drafter_methods import DrafterMethod, register_drafter
from leapserve.decoding.runner import SeqChunk


class RepeatDrafter:
    """A plugin's drafter: proposes the last token again."""

    needs_target_features = False

    def __init__(self, spec, runner, sampler, *, on_forward=None):
        self.max_nodes = self.max_depth = self.lookahead = spec.num_speculative_tokens

    def propose(self, scheduled, budgets):
        return [DraftTree.chain([s.seq.token_ids[-1]] * k) for s, k in zip(scheduled, budgets)]

    def observe(self, seq, start, features):
        pass


def repeat_method(name: str) -> DrafterMethod:
    return DrafterMethod(
        name,
        RepeatDrafter,
        needs_model=False,
        trees=False,
        sampling=False,
        target_features=False,
        help="the last token again",
    )


def test_unknown_method_lists_the_registered_ones():
    register_drafter(repeat_method("repeat-listed"))
    with pytest.raises(ValueError, match="method must be one of") as e:
        SpeculativeConfig.from_dict({"method": "medusa", "num_speculative_tokens": 2})
    assert all(repr(name) in str(e.value) for name in ("ngram", "draft_model", "fspad", "repeat-listed"))
    with pytest.raises(ValueError, match="already registered"):
        register_drafter(repeat_method("repeat-listed"))


def test_a_registered_drafter_is_validated_by_what_it_supports_and_built(tiny_model_dir):
    register_drafter(repeat_method("repeat"))
    register_drafter(
        DrafterMethod(
            "needy",
            RepeatDrafter,
            needs_model=True,
            trees=True,
            sampling=False,
            target_features=False,
            help="wants a checkpoint",
        )
    )
    with pytest.raises(ValueError, match="chains only"):
        SpeculativeConfig.from_dict({"method": "repeat", "num_speculative_tokens": 2, "tree": [2, 1]})
    with pytest.raises(ValueError, match="chains only"):
        SpeculativeConfig.from_dict({"method": "repeat", "tree": {"depth": 2}})
    with pytest.raises(ValueError, match='needs "model"'):
        SpeculativeConfig.from_dict({"method": "needy", "tree": [2, 1]})
    spec = {"method": "repeat", "num_speculative_tokens": 3, "adaptive": False}
    llm = LLM(str(tiny_model_dir), kv_cache_tokens=1024, speculative_config=spec)
    assert isinstance(llm.engine.decoder.drafter, RepeatDrafter)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(str(tiny_model_dir), kv_cache_tokens=1024, decoder="autoregressive")
    prompts = ["one one one one", "Hello there"]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)
    ]


def test_model_drafters_report_each_forward(tiny_model_dir):
    """`on_forward` gets the token count of each forward of a drafter's model, before it runs."""
    engine = LLM(str(tiny_model_dir), kv_cache_tokens=1024, decoder="autoregressive").engine
    calls: list[int] = []
    spec = SpeculativeConfig.from_dict(
        {"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 2}
    )
    drafter = make_drafter(spec, engine.runner, engine.sampler, on_forward=calls.append)
    logits, states = drafter.execute([SeqChunk([0], 0, [1, 2, 3], logits_rows=[2]), SeqChunk([1], 0, [4], [0])])
    assert calls == [4] and logits.shape[0] == 2 and states is None
