"""Draft trees verified inside vLLM's CPU build (0.32): a worker class (`--worker-cls`) whose model runner verifies
the trees `TreeEagleProposer` grows, through leapserve's tree attention.

Run vLLM with `--worker-cls leapserve.vllm_plugin.tree_runner.TreeCPUWorker`; a drafter whose `config.json` has
`"leapserve_tree": {"depth", "top_k", "total_tokens"}` turns trees on (with `num_speculative_tokens` =
`total_tokens`); without it the runner is vLLM's own. Per step, for each request whose scheduled drafts are the
tree last proposed for it (every other request keeps vLLM's chain path):

1. `_calc_spec_decode_metadata` (after vLLM computed chain positions and slots): node i's position becomes
   root + depth(i), its slot stays the chain's (root + i), and the step's tree mask `[T, max_q]` is built;
2. `_model_forward` hands the mask to attention (`cpu_attention.TREE_MASK`);
3. `_sample` runs vLLM's rejection sampler (chain requests), then walks each tree with leapserve's `verify`
   (greedy, or lossless recursive rejection) and writes its committed tokens in vLLM's chain format; the accepted
   nodes' K/V (target layers), hidden states and input ids are moved to the chain rows, and chain positions
   restored, so that vLLM's EAGLE bookkeeping and the drafter's first pass see an ordinary accepted chain.

The drafter's own K/V needs no move: its first pass re-runs every verified row after the compaction.
docs/vllm-trees.md lists each override, why vLLM has no seam for it, and what upstream would need.
"""

from __future__ import annotations

import numpy as np
import torch
import vllm
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.sample.rejection_sampler import MAX_SPEC_LEN
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner, _torch_cuda_wrapper

from leapserve.decoding.drafter import DraftTree
from leapserve.decoding.sampler import Sampler
from leapserve.decoding.tree import chunk_layout, tree_depths
from leapserve.decoding.verification import verify
from leapserve.drafters.tree_growth import TreeShape

from .cpu_attention import TREE_MASK, move_slots
from .tree_proposer import TREE_CONFIG_KEY, RequestView, TreeEagleProposer, tree_params

SUPPORTED_VLLM = ("0.32.",)  # the runner internals overridden here are those of these releases


def tree_config(vllm_config) -> dict | None:  # VllmConfig
    """The drafter's `leapserve_tree` settings, checked against what tree speculation needs; None without one."""
    spec = vllm_config.speculative_config
    if spec is None or spec.draft_model_config is None:
        return None
    tree = getattr(spec.draft_model_config.hf_config, TREE_CONFIG_KEY, None)
    if tree is None:
        return None

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"leapserve tree speculation ({TREE_CONFIG_KEY} in the drafter's config.json): {msg}")

    check(vllm.__version__.startswith(SUPPORTED_VLLM), f"needs vLLM {SUPPORTED_VLLM}, found {vllm.__version__}")
    check(isinstance(tree, dict) and set(tree) == {"depth", "top_k", "total_tokens"}, f"got {tree!r}, need "
          '{"depth": D, "top_k": K, "total_tokens": N}')  # fmt: skip
    check(all(isinstance(v, int) and v >= 1 for v in tree.values()), f"positive integers, got {tree!r}")
    n = tree["total_tokens"]
    check(spec.method == "eagle", f'method must be "eagle", got {spec.method!r}')
    check(spec.num_speculative_tokens == n, f"num_speculative_tokens must equal total_tokens ({n})")
    check(n <= MAX_SPEC_LEN, f"total_tokens must be at most {MAX_SPEC_LEN} (vLLM's rejection sampler)")
    shape = TreeShape(depth=tree["depth"], top_k=tree["top_k"], total_tokens=n)
    # a step allocates 1 + N + N slots past the computed tokens; growth writes `lookahead` past the accepted ones
    check(shape.lookahead + tree["depth"] <= 2 * n, f"top_k * (depth - 1) + depth must be at most 2 * {n}")
    check(vllm_config.parallel_config.pipeline_parallel_size == 1, "pipeline parallelism is not supported")
    return tree


class TreeCPUModelRunner(CPUModelRunner):
    def __init__(self, vllm_config, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self.tree = tree_config(vllm_config)
        self._trees: dict[int, tuple[int, DraftTree]] = {}  # this step: batch row -> (root's token row, tree)
        self._chain_positions: torch.Tensor | None = None
        self._tree_mask: torch.Tensor | None = None
        self._step_state = None
        if self.tree is not None:
            # tree masks need leapserve's CPU attention (what LEAPSERVE_VLLM_CPU_ATTENTION=leapserve selects); the
            # model's layers look their backend up when it loads, after this
            register_backend(
                AttentionBackendEnum.CPU_ATTN, "leapserve.vllm_plugin.cpu_attention.LeapserveCPUAttentionBackend"
            )
            with _torch_cuda_wrapper():
                self.drafter = TreeEagleProposer(vllm_config, device, self, self.tree)
            seed = vllm_config.model_config.seed or 0
            self._tree_sampler = Sampler(None, torch.Generator().manual_seed(seed))  # unseeded requests' draws

    def _calc_spec_decode_metadata(self, num_draft_tokens: np.ndarray, cu_num_scheduled_tokens: np.ndarray):
        meta = super()._calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens)
        self._trees = {}
        if self.tree is None:
            return meta
        total = int(cu_num_scheduled_tokens[-1])
        drafts = meta.draft_token_ids.tolist()
        chain = self.positions[:total].clone()
        starts = np.concatenate(([0], cu_num_scheduled_tokens[:-1]))
        offset = 0
        for b, n in enumerate(num_draft_tokens.tolist()):
            tokens, offset = drafts[offset : offset + n], offset + n
            tree = self.drafter.trees.pop(self.input_batch.req_ids[b], None)
            if n == 0 or tree is None or tree.tokens[:n] != tokens:
                continue  # no tree (or not the one scheduled): vLLM's chain path
            tree = tree.truncated(n)
            root = int(cu_num_scheduled_tokens[b]) - n - 1
            depths = torch.tensor(tree_depths(tree.parents)[1:], dtype=chain.dtype)
            self.positions[root + 1 : root + 1 + n] = chain[root] + depths
            self._trees[b] = (root, tree)
        if not self._trees:
            return meta
        q_lens = np.diff(cu_num_scheduled_tokens, prepend=0)
        max_q = int(q_lens.max())
        local = torch.arange(total) - torch.from_numpy(np.repeat(starts, q_lens))
        mask = torch.arange(max_q)[None, :] <= local[:, None]  # causal for every sequence
        for b, (_, tree) in self._trees.items():
            q, start = int(q_lens[b]), int(starts[b])
            mask[start : start + q, :q] = chunk_layout(q - len(tree), tree.parents)[0]
        self._tree_mask, self._chain_positions = mask, chain
        return meta

    def _model_forward(self, *args, **kwargs):
        if self._tree_mask is not None:
            get_forward_context().additional_kwargs[TREE_MASK] = self._tree_mask
            self._tree_mask = None
        return super()._model_forward(*args, **kwargs)

    def sample_tokens(self, grammar_output):
        self._step_state = self.execute_model_state if self._trees else None
        try:
            return super().sample_tokens(grammar_output)
        finally:
            self._step_state = None

    def _sample(self, logits, spec_decode_metadata):
        out = super()._sample(logits, spec_decode_metadata)
        if not self._trees:
            return out
        trees, self._trees = self._trees, {}
        ends = spec_decode_metadata.cu_num_sampled_tokens.tolist()  # request b's logits rows end at ends[b]
        argmax = logits.argmax(dim=-1).tolist()
        sampled = out.sampled_token_ids
        moves: list[tuple[int, int]] = []  # (source, destination) token rows of accepted nodes
        for b, (root, tree) in trees.items():
            req_id = self.input_batch.req_ids[b]
            state = self.requests[req_id]
            params = tree_params(state.sampling_params)
            assert params is not None, f"request {req_id} got a tree it cannot be verified with"
            rows = slice(ends[b] - len(tree) - 1, ends[b])
            view = RequestView(params, state.generator, [], b)
            path, samples = verify(tree, logits[rows], view, self._tree_sampler, argmax[rows])  # type: ignore[arg-type]
            sampled[b] = -1
            sampled[b, : len(samples)] = torch.tensor([s.token_id for s in samples], dtype=sampled.dtype)
            moves += [(root + node, root + k) for k, node in enumerate(path, start=1) if node != k]
        if moves:
            self._compact(moves)
        assert self._chain_positions is not None
        self.positions[: len(self._chain_positions)] = self._chain_positions
        self._chain_positions = None
        return out

    def _compact(self, moves: list[tuple[int, int]]) -> None:
        """Accepted nodes' token rows onto the chain rows the scheduler and vLLM's EAGLE path read: target K/V (at
        the slots the verification wrote), hidden states and input ids."""
        state = self._step_state
        assert state is not None
        src, dst = (torch.tensor(rows) for rows in zip(*moves))
        drafter_layers = set(self.drafter._draft_attn_layer_names)
        layers = self.compilation_config.static_forward_context
        for name, slots in state.slot_mappings.items():
            if name not in drafter_layers:
                move_slots(layers[name].kv_cache, slots[src], slots[dst])
        for h in [state.hidden_states, *(state.aux_hidden_states or [])]:
            h[dst] = h[src]
        ids = self.input_ids.gpu
        ids[dst] = ids[src]


class TreeCPUWorker(cpu_worker.CPUWorker):
    """vLLM's CPU worker building `TreeCPUModelRunner` (what `--worker-cls` names)."""

    def init_device(self) -> None:
        stock = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = TreeCPUModelRunner  # type: ignore[misc]  (read by name in init_device)
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = stock  # type: ignore[misc]
