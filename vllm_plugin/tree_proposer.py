"""vLLM's EAGLE proposer growing an EAGLE-2 draft tree per request instead of a chain.

The first pass is vLLM's own (`super().propose` with one speculative token: the drafter runs over every verified
row and writes its K/V at the target's slots); its root rows (logits and next features) seed leapserve's
`TreeGrower`, the same growth the native engine runs, whose forwards run here through vLLM's drafter model:

    node i of a request (BFS order, 1-based)   slot   root + i          (distinct lookahead slots)
                                               position root + depth(i) (siblings share a position)
                                               sees   the context and its own ancestors (tree mask)

Each growth forward re-runs every node expanded so far, as the native drafter does. The proposal is one token
list per request (variable length: vLLM's runner accepts `list[list[int]]`); the tree's parents stay here, keyed
by request id, for the runner to read when the tokens come back scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.forward_context import get_forward_context, set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.eagle import EagleProposer

from leapserve.decoding.config import SpeculativeConfig
from leapserve.decoding.drafter import DraftTree
from leapserve.decoding.runner import SeqChunk
from leapserve.decoding.sampler import Sampler
from leapserve.decoding.sampling_params import SamplingParams
from leapserve.decoding.scheduler import ScheduledSeq
from leapserve.drafters.tree_growth import TreeGrower

from .cpu_attention import TREE_MASK

TREE_CONFIG_KEY = "leapserve_tree"  # in the drafter's config.json: {"depth", "top_k", "total_tokens"}


@dataclass
class RequestView:
    """What leapserve's tree growth and verification read of a request: its sampling parameters (temperature and
    truncation only), its generator, and where its blocks are (a row of vLLM's block table)."""

    params: SamplingParams
    generator: torch.Generator | None
    block_table: list[int]
    row: int  # the request's index in the batch


def tree_params(vllm_sampling_params) -> SamplingParams | None:  # vllm.SamplingParams
    """leapserve's sampling parameters for a vLLM request a tree can serve losslessly, or None: penalties, logit
    bias, allowed or bad words, min_tokens, logprobs and structured outputs change the logits along a path (vLLM
    applies them to drafts as one sequence), so such requests decode without drafts."""
    p = vllm_sampling_params
    if (
        p is None
        or p.presence_penalty
        or p.frequency_penalty
        or p.repetition_penalty != 1.0
        or p.logit_bias
        or p.allowed_token_ids
        or p.bad_words
        or p.min_tokens
        or p.logprobs is not None
        or p.structured_outputs is not None
        or getattr(p, "logits_processors", None)
    ):
        return None
    return SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=max(p.top_k, 0), min_p=p.min_p)


class TreeEagleProposer(EagleProposer):
    """`EagleProposer` whose `propose` returns an EAGLE-2 tree's tokens per request (parents in `self.trees`)."""

    def __init__(self, vllm_config, device: torch.device, runner, tree: dict) -> None:
        super().__init__(vllm_config, device, runner)
        self.runner = runner  # the model runner: its batch, requests and block tables
        spec = SpeculativeConfig(method="fspad", num_speculative_tokens=0, model="-", tree=tree)
        self.grower = TreeGrower(spec, Sampler(None, torch.Generator()))
        self.shape = self.grower.shape
        self.trees: dict[str, DraftTree] = {}  # request id -> the tree last proposed for it
        self._first_pass: tuple[torch.Tensor, torch.Tensor] | None = None
        self._capturing = False
        self._roots: tuple[torch.Tensor, CommonAttentionMetadata] | None = None  # the first pass's sample rows

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        self.model.register_forward_hook(self._keep_first_pass)
        self.grower.vocab_size = self.vllm_config.model_config.get_vocab_size()

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The drafter's logits at these rows: over its own columns where it has a reduced vocabulary (the grower
        maps them to target ids), which skips a scatter into the target's vocabulary and a softmax over it."""
        if hasattr(self.model, "draft_logits"):
            logits, self.grower.vocab = self.model.draft_logits(hidden_states)
            return logits
        return self.model.compute_logits(hidden_states)

    def _keep_first_pass(self, module, args, output) -> None:
        if self._capturing:  # (token half, feature half), each [rows, d]
            self._first_pass = output if isinstance(output, tuple) else (output, output)

    def set_inputs_first_pass(self, **kwargs):
        num_tokens, token_indices_to_sample, cad = super().set_inputs_first_pass(**kwargs)
        self._roots = (token_indices_to_sample, cad)
        return num_tokens, token_indices_to_sample, cad

    def propose(self, num_speculative_tokens: int, **kwargs) -> list[list[int]]:
        """Run vLLM's first pass, then grow each eligible request's tree; requests a tree cannot serve (see
        `tree_params`), near the end of their allocated slots or of the model's length get no draft."""
        self._first_pass, self._capturing = None, True
        try:
            super().propose(1, **kwargs)  # the first pass only: it returns after one token when asked for one
        finally:
            self._capturing = False
        assert self._first_pass is not None, "the drafter's first pass did not run"
        last_hidden, features = self._first_pass
        self._first_pass = None
        assert self._roots is not None
        indices, cad = self._roots
        roots = self.positions[indices].tolist()
        runner = self.runner
        tables = cad.block_table_tensor
        capacity = runner.input_batch.block_table[0].num_blocks_per_row * self.block_size  # allocated slots per row
        scheduled, budgets, views = [], [], []
        live = set(runner.input_batch.req_ids)
        self.trees = {r: t for r, t in self.trees.items() if r in live}
        for b, req_id in enumerate(runner.input_batch.req_ids):
            state = runner.requests[req_id]
            params = tree_params(state.sampling_params)
            fits = roots[b] + 1 + self.shape.lookahead <= min(int(capacity[b]), self.max_model_len)
            grows = params is not None and fits and not runner.discard_request_mask.np[b]
            budget = self.shape.max_nodes if grows else 0
            view = RequestView(params or SamplingParams(), state.generator, tables[b].tolist(), b)
            scheduled.append(ScheduledSeq(view, 1))  # type: ignore[arg-type]  (the grower reads .seq.params)
            budgets.append(budget)
            views.append(view)

        def catch_up(s: ScheduledSeq, budget: int) -> SeqChunk | None:
            if budget == 0:
                return None
            view = s.seq
            return SeqChunk(view.block_table, roots[view.row], [], logits_rows=[0], extra={"row": view.row})

        first = True

        def execute(chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal first
            if first:  # the roots: vLLM's first pass already ran them
                first = False
                rows = indices[[c.extra["row"] for c in chunks]]
                return self._logits(last_hidden[rows]), features[rows]
            return self._forward(chunks)

        trees = self.grower.propose(scheduled, budgets, catch_up, execute)
        out: list[list[int]] = []
        for view, tree in zip(views, trees):
            out.append(list(tree.tokens))
            req_id = runner.input_batch.req_ids[view.row]
            if tree.tokens:
                self.trees[req_id] = tree
            else:
                self.trees.pop(req_id, None)
        return out

    def _forward(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafter forward over `chunks` (tree nodes after each root): logits over the target vocabulary and
        next features at the chunks' logits rows."""
        bs = self.block_size
        ids, positions, slots, cu, rows = [], [], [], [0], []
        max_q = max(len(c.token_ids) for c in chunks)
        mask = torch.zeros(sum(len(c.token_ids) for c in chunks), max_q, dtype=torch.bool)
        for c in chunks:
            n = len(c.token_ids)
            ids += c.token_ids
            positions += c.positions if c.positions is not None else range(c.start, c.start + n)
            slots += [c.block_table[p // bs] * bs + p % bs for p in range(c.start, c.start + n)]
            tree_mask = c.tree_mask if c.tree_mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
            mask[cu[-1] : cu[-1] + n, :n] = tree_mask
            rows += [cu[-1] + r for r in c.logits_rows]
            cu.append(cu[-1] + n)
        t = cu[-1]
        device = self.positions.device
        query_start_loc = torch.tensor(cu, dtype=torch.int32, device=device)
        seq_lens = torch.tensor([c.start + len(c.token_ids) for c in chunks], dtype=torch.int32, device=device)
        tables = torch.tensor([c.block_table for c in chunks], dtype=torch.int32)
        cad = CommonAttentionMetadata(
            query_start_loc=query_start_loc,
            query_start_loc_cpu=query_start_loc.cpu(),
            seq_lens=seq_lens,
            num_reqs=len(chunks),
            num_actual_tokens=t,
            max_query_len=max_q,
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=tables.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        )
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        self.input_ids[:t] = torch.tensor(ids, device=device)
        self.positions[:t] = torch.tensor(positions, device=device)
        self.hidden_states[:t] = torch.cat([c.extra["features"] for c in chunks])
        with set_forward_context(
            per_layer, self.vllm_config, num_tokens=t, slot_mapping=self._get_slot_mapping(t, cad.slot_mapping)
        ):
            get_forward_context().additional_kwargs[TREE_MASK] = mask
            last_hidden, features = self.model(
                input_ids=self.input_ids[:t], positions=self.positions[:t], hidden_states=self.hidden_states[:t]
            )
        return self._logits(last_hidden[rows]), features[rows]
