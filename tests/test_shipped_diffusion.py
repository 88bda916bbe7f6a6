"""The shipped diffusion LM (`checkpoints/digit-sums-mdm-dparallel`, trained by the dParallel reproduction): it still
answers held-out questions, in far fewer steps with the entropy threshold than one token per step. Floors sit a
little under the measured values (BENCHMARKS.md), so a regression in loading, decoding or the rules fails CI."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from leapserve.benchmarks.dparallel_repro import answer, split_questions
from leapserve.decoding import LLM, SamplingParams

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "digit-sums-mdm-dparallel"
QUESTIONS = 150
# measured on these 150 questions: 78.7% in 27.1 steps one token per step, 82.7% in 8.1 steps at threshold 0.5
ONE_TOKEN_ACCURACY_FLOOR, ENTROPY_ACCURACY_FLOOR, ENTROPY_STEPS_CEILING = 0.72, 0.76, 9.0


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(CHECKPOINT), max_num_seqs=QUESTIONS, enforce_eager=True)


def run(llm: LLM, **extra) -> tuple[float, float]:
    """Accuracy and mean steps per answer on the first held-out questions."""
    questions = split_questions()[1][:QUESTIONS]
    params = SamplingParams(max_tokens=32, temperature=0, extra_args={f"diffusion_{k}": v for k, v in extra.items()})
    outs = llm.generate(["+".join(map(str, q)) + "=" for q in questions], params, use_tqdm=False)
    accuracy = statistics.mean(answer(o.outputs[0].text) == sum(q) for o, q in zip(outs, questions))
    return accuracy, statistics.mean(o.metrics.denoising_steps for o in outs)


def test_checkpoint_defaults_and_card(llm):
    assert llm.engine.decoder_name == "dparallel"
    assert llm.engine.decoder.diffusion.gen_length == 32 and llm.engine.decoder.diffusion.block_length == 8
    assert "Measured" in (CHECKPOINT / "README.md").read_text()


def test_entropy_threshold_decoding_keeps_accuracy_in_few_steps(llm):
    one_accuracy, one_steps = run(llm, rule="confidence")
    accuracy, steps = run(llm, rule="entropy", threshold=0.5)
    assert one_accuracy >= ONE_TOKEN_ACCURACY_FLOOR and accuracy >= ENTROPY_ACCURACY_FLOOR
    assert steps <= ENTROPY_STEPS_CEILING < one_steps
