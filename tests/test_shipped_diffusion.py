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
# measured on these 150 questions: 95.3% in 28.7 steps one token per step, 96.0% in 8.1 steps at threshold 0.5
ONE_TOKEN_ACCURACY_FLOOR, ENTROPY_ACCURACY_FLOOR, ENTROPY_STEPS_CEILING = 0.90, 0.91, 9.0


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


def test_ship_writes_a_servable_checkpoint_with_its_runs_settings_atomically(tmp_path):
    """`dparallel_repro ship` on a run directory (here holding the shipped model as a run's `base` and
    `certainty-forcing`): decoding defaults in config.json, the run's own settings and flags in the card, an earlier
    ship replaced, a directory that is not a checkpoint refused."""
    import json
    import shutil
    from dataclasses import asdict, replace

    from leapserve.benchmarks.dparallel_repro import DECODERS, Settings, ship

    work = tmp_path / "runs" / "seed4"
    for model in ("base", "certainty-forcing"):
        shutil.copytree(CHECKPOINT, work / model)
    figures = {d: {"accuracy": 0.5, "steps": 10.0} for d in DECODERS}
    settings = replace(Settings(), pretrain_steps=3000, lr_schedule="cosine", distill_lr=3e-4)
    record = {"seed": 4, "settings": asdict(settings), "models": {"base": figures, "certainty-forcing": figures}}
    (work / "results.jsonl").write_text(json.dumps(record) + "\n")
    dest = tmp_path / "shipped" / "digits"
    for _ in range(2):  # the second replaces the first
        assert ship(4, tmp_path / "runs", "certainty-forcing", dest) == dest
    config = json.loads((dest / "config.json").read_text())
    assert config["diffusion_lm"]["decoding"] == {"gen_length": 32, "block_length": 8, "threshold": 0.5}
    card = (dest / "README.md").read_text()
    assert "--pretrain-steps 3000 --distill-lr 0.0003 --lr-schedule cosine" in card and "cosine-decayed" in card
    assert sorted(p.name for p in dest.parent.iterdir()) == ["digits"]  # no temporary directory left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        ship(4, tmp_path / "runs", "certainty-forcing", tmp_path / "mine")
    with pytest.raises(ValueError, match="no results for 'more-mdm'"):
        ship(4, tmp_path / "runs", "more-mdm", dest)
    served = LLM(str(dest), enforce_eager=True, max_num_seqs=4)
    assert served.engine.decoder_name == "dparallel"
