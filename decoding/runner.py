"""The model runner: executes one packed `[1, T]` forward over many sequences' new tokens; decides nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from leapserve.kernels import AttentionStep, cpu_ops
from leapserve.kernels.packed_linear import run_through_op

from .attention import ATTN_IMPLEMENTATION, AttentionMetadata, forward_context, register
from .config import MODEL_IMPLS
from .kv_cache import PagedKVCache
from .llama import Llama, unsupported
from .model_loader import cache_dir
from .observe import MODEL_RANGE, ForwardHook, profiled_range
from .silent_thought import st_positions
from .step_buffers import StepBuffers

logger = logging.getLogger(__name__)
T = TypeVar("T")

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class SeqChunk:
    """One sequence's new tokens in a forward; their K/V go to cache positions `start`, `start + 1`, ..."""

    block_table: list[int]
    start: int  # cache slots already in use (the kernel's context length)
    token_ids: list[int]
    logits_rows: list[int]  # which of `token_ids` need next-token logits
    positions: list[int] | None = None  # rotary positions; default start..start+n-1 (trees use start + depth)
    tree_mask: torch.Tensor | None = None  # bool [n, n] over these tokens; None = causal
    context_holes: list[tuple[int, int]] = field(default_factory=list)  # context slot ranges never attended
    # "embeds": (rows, [len(rows), d]) input embeddings replacing those rows' token embeddings; "st_rows": rows where
    # silent-thought REM hooks act (both need transformers' modules)
    extra: dict = field(default_factory=dict)


def step_metadata(
    chunks: list[SeqChunk], cache: PagedKVCache, buffers: StepBuffers
) -> tuple[AttentionMetadata, torch.Tensor, list[int]]:
    """A step's attention metadata over `cache`, rotary positions, and where each chunk starts in the packed batch,
    their index tensors written into `buffers`."""
    device = buffers.device
    bs = cache.block_size
    slots: list[int] = []
    positions: list[int] = []
    cu = [0]
    for c in chunks:
        n = len(c.token_ids)
        pos = range(c.start, c.start + n)
        slots += cache.flat_slots(c.block_table, pos)
        positions.extend(c.positions if c.positions is not None else pos)
        cu.append(cu[-1] + n)
    max_blocks = max(len(c.block_table) for c in chunks)
    tables = [b for c in chunks for b in c.block_table + [0] * (max_blocks - len(c.block_table))]
    tree_mask = None
    if any(c.tree_mask is not None for c in chunks):
        max_q = max(len(c.token_ids) for c in chunks)
        tree_mask = torch.zeros(cu[-1], max_q, dtype=torch.bool)
        for c, lo in zip(chunks, cu):
            n = len(c.token_ids)
            rows = c.tree_mask if c.tree_mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
            tree_mask[lo : lo + n, :n] = rows
        tree_mask = tree_mask.to(device)
    context_mask = None
    if any(c.context_holes for c in chunks):
        context_mask = torch.ones(len(chunks), max(c.start for c in chunks), dtype=torch.bool)
        for row, c in zip(context_mask, chunks):
            for lo, hi in c.context_holes:
                row[lo:hi] = False
        context_mask = context_mask.to(device)

    step = AttentionStep(
        buffers.put("slots", slots, torch.int64),
        buffers.put("block_tables", tables, torch.int32, (len(chunks), max_blocks)),
        buffers.put("context_lens", [c.start for c in chunks], torch.int32),
        buffers.put("cu_seqlens_q", cu, torch.int32),
        tree_mask,
        bs,
        context_mask,
    )
    return AttentionMetadata(cache, step), buffers.put("positions", positions, torch.int64), cu


def leapserve_llama(model: PreTrainedModel, model_impl: str) -> Llama | None:
    """leapserve's Llama over `model`'s weights, or None for transformers' modules (`model_impl` as ModelConfig's)."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
    reason = unsupported(model)
    if model_impl == "transformers" or (model_impl == "auto" and reason is not None):
        if reason is not None:
            logger.info("transformers' modules run the model (leapserve's Llama does not cover %s)", reason)
        return None
    return Llama(model)  # raises for model_impl "leapserve" where it does not cover the model


def compiled(forward: Callable[..., T], device: torch.device) -> Callable[..., T]:
    """`forward` (a model's on `device`, taking tensors) through torch.compile (inductor), one graph for any number
    of tokens per step; compiled artifacts are cached under $LEAPSERVE_CACHE/inductor (or $TORCHINDUCTOR_CACHE_DIR)
    and reused by later starts. On CPU the graph's opaque ops are leapserve's C++ ops (built on first use), which
    inductor's C++ wrapper calls as C functions, so a step runs no Python and no dispatcher between kernels."""
    # bf16 and fp16 intermediates rounded where eager rounds them, whatever the graph fuses: the one-token graph
    # (dynamo specializes a size of 1) and the graph of more tokens then give a token the same bits, as fp32 does
    # (2-3% of a bf16 forward on cpu-2c-amx; docs/compile.md)
    options: dict = {"guard_filter_fn": input_guards, "emulate_precision_casts": True}
    if device.type == "cpu":
        cpu_ops.load(cache_dir() / "extensions")
        options["cpp_wrapper"] = True
        options["aot_inductor.custom_ops_to_c_shims"] = cpu_ops.c_shims()
        # one allocation a call for the graph's intermediates, and no shape checks on what the ops return (their
        # fake shapes are tested against them): 0.3-0.5 ms of a 28 ms batch-1 step under the profiler (docs/compile.md)
        options.update(memory_planning=True, size_asserts=False, scalar_asserts=False, alignment_asserts=False)

    def run_model(*args: torch.Tensor) -> T:
        return forward(*args)

    # Dynamo keeps graphs, and its limit on recompiling them, per code object: each model gets its own, so a
    # process may hold many engines (a server's drafter beside its target; the test suite)
    run_model.__code__ = run_model.__code__.replace()
    return torch.compile(run_model, dynamic=True, fullgraph=True, options=options)


def capture_settings() -> AbstractContextManager:
    """Around a warm-up that compiles. Dynamo traces the floats a model reads (an RMSNorm's eps) as constants: a
    dynamic-shape graph otherwise takes each as a tensor input, built from the float at every call (32 for SmolLM2:
    0.2 ms of a batch-1 step under the profiler). And it installs the model's parameters in its graphs instead of
    gathering them from the modules at every call (SmolLM2's 216: 0.13 ms a call under the profiler), so a
    parameter replaced after compiling is not seen (one changed in place is). Later calls reuse the graphs, whose
    guards are on their inputs only (docs/compile.md)."""
    return torch._dynamo.config.patch(specialize_float=True, install_free_tensors=True)


def input_guards(guards: list) -> list[bool]:
    """Which of Dynamo's guards a compiled model keeps: those on its inputs (dtypes, shapes: the one-token graph
    against the dynamic one) and on global state; not the ~3,700 on the model's modules and parameters, which no
    step changes and whose checking cost ~0.3 ms a call (a compiled model is one closure over one model)."""
    return [g.name == "" or g.name.startswith("args") for g in guards]


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        cache: PagedKVCache,
        device: torch.device,
        on_forward: ForwardHook | None = None,
        *,
        model_impl: str = "transformers",
        compile: bool = False,
    ):
        """`on_forward(num_tokens)` is told of each forward before it runs (the engine's observers). `model_impl`
        and `compile` as ModelConfig's `model_impl` and `not enforce_eager`; `compile` needs leapserve's Llama."""
        register()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model
        self.cache = cache
        self.device = device
        self.buffers = StepBuffers(device)
        self.on_forward = on_forward
        self.model_impl, self.compile = model_impl, compile  # for drafter models, which run as the target does
        if compile and device.type == "cpu":
            cpu_ops.load(cache_dir() / "extensions")  # first: where the op computes every row count, the model's
            # weights are packed for it (`packed_linear.is_k_major`)
        self.llama = leapserve_llama(model, model_impl)
        self._llama_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = self.llama
        if compile and self.llama is not None:
            self._llama_forward = compiled(self.llama, device)
            run_through_op(self.llama.head)
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile now rather than on the first requests: one token per step, then any larger number (the two
        graphs torch.compile makes for a dynamic length); the step writes into block 0, which no sequence holds yet."""
        start = time.perf_counter()
        logger.info("compiling the model (torch.compile, inductor): 1 token per step, then 2 or more ...")
        with capture_settings():
            for n in (1, 2, 3):
                self._run([SeqChunk([0], 0, [0] * n, [n - 1])])
        logger.info("compiled in %.1f s", time.perf_counter() - start)

    def time_forward(self, num_tokens: int, clock: Callable[[], float] = time.perf_counter, repeats: int = 3) -> float:
        """Seconds by `clock` of a forward over `num_tokens` tokens of one sequence with logits at every row (the
        shape of verifying that many), the fastest of `repeats`, in blocks borrowed from the free pool. Observers
        are told of it like any forward, so a modeled clock (`bench offline --roofline`) times it too."""
        table: list[int] = []
        if not self.cache.grow(table, num_tokens):
            raise RuntimeError(f"the KV cache has no room to time a forward over {num_tokens} tokens")
        chunk = SeqChunk(table, 0, [0] * num_tokens, list(range(num_tokens)))
        best = float("inf")
        try:
            for _ in range(repeats):
                start = clock()
                self.forward([chunk])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                best = min(best, clock() - start)
        finally:
            self.cache.release(table)
        return best

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run the target over all chunks at once; return float32 logits `[sum(len(logits_rows)), V]`."""
        return self.forward(chunks)[0]

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """`execute`, plus the final-norm hidden states of every token `[T, d]` (what feature drafters read); both
        allocated afresh by each call, so a caller may keep views of them."""
        if self.on_forward is not None:
            self.on_forward(sum(len(c.token_ids) for c in chunks))
        return self._run(chunks)

    @torch.inference_mode()
    def _run(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        meta, positions, offsets = step_metadata(chunks, self.cache, self.buffers)
        input_ids = self.buffers.put("input_ids", [t for c in chunks for t in c.token_ids], torch.int64)
        rows = None  # every token's, in order (decoding, verifying): no gather
        if any(
            len(c.logits_rows) != len(c.token_ids) or c.logits_rows != list(range(len(c.token_ids))) for c in chunks
        ):
            rows = self.buffers.put(
                "logits_rows", [lo + r for c, lo in zip(chunks, offsets) for r in c.logits_rows], torch.int64
            )
        with profiled_range(MODEL_RANGE):
            if any(c.extra for c in chunks):
                hidden = self._run_with_extra(chunks, offsets, input_ids, positions, meta)
            elif self.llama is None:
                hidden = self.model.get_decoder()(
                    input_ids=input_ids[None], position_ids=positions[None], use_cache=False, leapserve_meta=meta
                ).last_hidden_state[0]
            else:
                assert self._llama_forward is not None
                with forward_context(meta):
                    hidden = self._llama_forward(input_ids, positions)
            return self.logits(hidden if rows is None else hidden[rows]), hidden

    def _run_with_extra(
        self,
        chunks: list[SeqChunk],
        offsets: list[int],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """transformers' decoder over token embeddings with the chunks' `extra["embeds"]` rows replaced, REM hooks on
        at their `extra["st_rows"]`; final-norm hidden states `[T, d]`."""
        if self.llama is not None:
            raise RuntimeError("input embeddings and silent-thought rows need transformers' modules (model_impl)")
        embeds = self.model.get_input_embeddings()(input_ids)  # [T, d]
        replaced = [(lo, c.extra["embeds"]) for c, lo in zip(chunks, offsets) if "embeds" in c.extra]
        if replaced:
            rows = torch.tensor([lo + r for lo, (rs, _) in replaced for r in rs], device=self.device)
            vectors = torch.cat([v for _, (_, v) in replaced]).to(embeds.dtype)  # [n, d]
            embeds = embeds.index_copy(0, rows, vectors)
        st_rows = [lo + r for c, lo in zip(chunks, offsets) for r in c.extra.get("st_rows", ())]
        mask = torch.zeros(1, len(input_ids), dtype=torch.bool)  # [1, T]
        mask[0, st_rows] = True
        with st_positions(mask.to(self.device)) if st_rows else nullcontext():
            return self.model.get_decoder()(
                inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False, leapserve_meta=meta
            ).last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over final-norm hidden states `[N, d]`: float32 logits `[N, V]`."""
        if self.llama is None:
            return self.model.get_output_embeddings()(hidden).float()
        return self.llama.logits(hidden)
