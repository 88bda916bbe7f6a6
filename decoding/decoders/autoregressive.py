"""The baseline decoder: one token per sequence per target forward."""

from __future__ import annotations

from ..request import Sequence
from ..runner import SeqChunk
from ..scheduler import ScheduledSeq
from .base import Decoder, SeqStep


class AutoregressiveDecoder(Decoder):
    name = "autoregressive"

    def step(self, scheduled: list[ScheduledSeq]) -> dict[Sequence, SeqStep]:
        chunks = [
            SeqChunk(
                block_table=s.seq.block_table,
                start=s.seq.num_computed,
                token_ids=s.seq.token_ids[s.seq.num_computed : s.seq.num_computed + s.num_new],
                logits_rows=[s.num_new - 1] if s.completes_prefix else [],
            )
            for s in scheduled
        ]
        logits, hidden = self.runner.forward(chunks)
        results = self.sample_rows(scheduled, logits)
        self.score_prompts(scheduled, chunks, hidden, results)
        return results
