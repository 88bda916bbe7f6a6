"""leapserve.kernels: Triton kernels and PyTorch references against naive float64 oracles.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before
anything imports triton); with one they run compiled on CUDA tensors. Every case poisons what must not be read or
written: unused cache slots and padding blocks hold NaN, outputs start as NaN, tree-mask columns past a
sequence's own new tokens hold random bits. One module (over 400 lines): every test sweeps the one kernel contract.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

import leapserve.kernels as kernels
from leapserve.kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Error bounds: max |out - oracle| / max |oracle|, oracle in float64 from the same (rounded) inputs.
# Observed worst cases: fp32 2e-6, fp16 5e-4, bf16 6e-3 (the interpreter truncates when casting to bf16).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
MASK_KINDS = ("causal", "tree", "bidirectional")


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    tree_mask: torch.Tensor | None
    scale: float | None
    poison_block: int  # all NaN; pads every block table
    keys: list[torch.Tensor]  # per sequence [context + new, Hkv, D], as written into the cache
    values: list[torch.Tensor]
    visible: list[torch.Tensor]  # per sequence bool [new, new]: which new tokens each new token sees
    context_mask: torch.Tensor | None = None  # bool [B, W]: which context slots may be seen (None: all)

    def args(self) -> tuple:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.context_lens,
            self.cu_seqlens_q,
            self.tree_mask,
            self.scale,
        )

    def kwargs(self) -> dict:
        return {} if self.context_mask is None else {"context_mask": self.context_mask}


def random_tree(rnd: random.Random, n: int) -> torch.Tensor:
    """Ancestor-or-self mask of a random forest on n nodes numbered in topological order."""
    visible = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        parent = rnd.randint(-1, i - 1) if rnd.random() < 0.2 else rnd.randint(max(0, i - 4), i - 1)
        if parent >= 0:
            visible[i] |= visible[parent]
    return visible


def random_masks(
    rnd: random.Random, gen: torch.Generator, new: list[int], mask_kind: str
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Per sequence, which of its new tokens each one sees; and the packed tree mask (None: causal), whose columns
    past a sequence's own new tokens are garbage the kernels must ignore."""
    if mask_kind == "causal":
        visible = [torch.ones(n, n, dtype=torch.bool).tril() for n in new]
    elif mask_kind == "tree":
        visible = [random_tree(rnd, n) for n in new]
    else:
        visible = [torch.ones(n, n, dtype=torch.bool) for n in new]
    if mask_kind == "causal":
        return visible, None
    width = max(new) + rnd.randint(0, 3)
    tree_mask = torch.rand(sum(new), width, generator=gen) < (1.0 if mask_kind == "bidirectional" else 0.5)
    row = 0
    for n, vis in zip(new, visible):
        tree_mask[row : row + n, :n] = vis
        row += n
    return visible, tree_mask


def hide_context(
    rnd: random.Random,
    gen: torch.Generator,
    context: list[int],
    block_tables: torch.Tensor,
    caches: tuple[torch.Tensor, torch.Tensor],
    keys: list[torch.Tensor],
) -> torch.Tensor:
    """A context mask hiding runs of context slots, whose K/V become large finite garbage (and NaN for the oracle);
    columns past a sequence's context are random bits the kernels must ignore."""
    block_size, num_kv_heads, head_dim = caches[0].shape[1:]
    context_mask = torch.rand(len(context), max(context) + rnd.randint(0, 3), generator=gen) < 0.5
    for b, c in enumerate(context):
        row = torch.ones(c, dtype=torch.bool)
        for _ in range(rnd.randint(0, 4)):  # holes: runs of up to 6 slots
            lo = rnd.randint(0, max(0, c - 1))
            row[lo : lo + rnd.randint(1, 6)] = False
        context_mask[b, :c] = row
        hidden = torch.nonzero(~row).flatten()
        table = block_tables[b].long()
        for cache in caches:
            cache[table[hidden // block_size], hidden % block_size] = 1e3 * torch.randn(
                len(hidden), num_kv_heads, head_dim, generator=gen
            ).to(cache.dtype)
        keys[b][hidden] = float("nan")  # the oracle must not use them either
    return context_mask


def make_case(
    seed: int,
    *,
    group: int,
    mask_kind: str,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    max_seqs: int = 6,
    max_new: int = 33,
    max_context: int = 300,
    num_kv_heads: int | None = None,
    consecutive_blocks: bool = False,
    masked_context: bool = False,
    device: torch.device = DEVICE,
) -> Case:
    """A random batch; each sequence's blocks are shuffled over the cache unless `consecutive_blocks`.
    `masked_context`: a context mask hides runs of context slots (the padded layout's holes), which hold large
    finite garbage, so that reading one would show."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_seqs = rnd.randint(1, max_seqs)
    num_kv_heads = num_kv_heads or rnd.choice((1, 2))
    num_q_heads = num_kv_heads * group
    new = [rnd.randint(1, max_new) for _ in range(num_seqs)]
    context = [0 if rnd.random() < 0.25 else rnd.randint(1, max_context) for _ in range(num_seqs)]
    blocks_needed = [-(-(c + n) // block_size) for c, n in zip(context, new)]
    max_blocks = max(blocks_needed) + rnd.randint(0, 2)
    num_blocks = sum(blocks_needed) + 3
    order = list(range(num_blocks))[::-1] if consecutive_blocks else torch.randperm(num_blocks, generator=gen).tolist()
    poison_block = order.pop()
    block_tables = torch.full((num_seqs, max_blocks), poison_block, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    keys, values = [], []
    for b, (c, n) in enumerate(zip(context, new)):
        table = [order.pop() for _ in range(blocks_needed[b])]
        block_tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
        k = torch.randn(c + n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(c + n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(c + n)
        k_cache[torch.tensor(table)[pos // block_size], pos % block_size] = k
        v_cache[torch.tensor(table)[pos // block_size], pos % block_size] = v
        keys.append(k)
        values.append(v)
    visible, tree_mask = random_masks(rnd, gen, new, mask_kind)
    cu = [0, *itertools.accumulate(new)]
    q = torch.randn(cu[-1], num_q_heads, head_dim, generator=gen).to(dtype)
    scale = rnd.choice((None, 0.3))
    context_mask = None
    if masked_context:
        context_mask = hide_context(rnd, gen, context, block_tables, (k_cache, v_cache), keys)
    return Case(
        q.to(device),
        k_cache.to(device),
        v_cache.to(device),
        block_tables.to(device),
        torch.tensor(context, dtype=torch.int32, device=device),
        torch.tensor(cu, dtype=torch.int32, device=device),
        None if tree_mask is None else tree_mask.to(device),
        scale,
        poison_block,
        keys,
        values,
        visible,
        None if context_mask is None else context_mask.to(device),
    )


def naive_attention(case: Case) -> torch.Tensor:
    """Dense float64 attention with an explicit [new, context + new] mask per sequence."""
    q = case.q.double().cpu()
    head_dim = q.shape[-1]
    group = q.shape[1] // case.keys[0].shape[1]
    scale = head_dim**-0.5 if case.scale is None else case.scale
    out = torch.empty_like(q)
    cu = case.cu_seqlens_q.tolist()
    for b, (k, v, vis) in enumerate(zip(case.keys, case.values, case.visible)):
        n = vis.shape[0]
        context = k.shape[0] - n
        seen = (
            torch.ones(context, dtype=torch.bool) if case.context_mask is None else case.context_mask[b, :context].cpu()
        )
        allowed = torch.cat([seen.expand(n, context), vis], dim=1)
        k = k.double().masked_fill(~torch.cat([seen, torch.ones(n, dtype=torch.bool)])[:, None, None], 0.0)
        k = k.repeat_interleave(group, dim=1)
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,lhd->htl", q[cu[b] : cu[b + 1]], k) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[cu[b] : cu[b + 1]] = torch.einsum("htl,lhd->thd", probs, v)
    return out


def assert_close(out: torch.Tensor, case: Case, oracle: torch.Tensor) -> None:
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert not out.isnan().any(), "NaN in the output: a poisoned slot was read or a row was not written"
    err = ((out.double().cpu() - oracle).abs().max() / oracle.abs().max()).item()
    assert err < TOLERANCE[case.q.dtype], f"relative error {err:.2e} >= {TOLERANCE[case.q.dtype]:.0e}"


def run_into_nan(impl, case: Case, **kwargs) -> torch.Tensor:
    out = torch.full_like(case.q, float("nan"))
    result = impl(*case.args(), out=out, **case.kwargs(), **kwargs)
    assert result is out
    return out


def triton_attention():
    from leapserve.kernels import tree_attention_triton

    return tree_attention_triton.tree_attention


# --- tree_attention: reference -------------------------------------------------------------------------------

REFERENCE_GRID = list(itertools.product((1, 3, 4), (32, 64, 80, 96, 112, 128, 160, 192, 256), (16, 32), MASK_KINDS))


@pytest.mark.parametrize("group,head_dim,block_size,mask_kind", REFERENCE_GRID)
def test_reference_fp32(group: int, head_dim: int, block_size: int, mask_kind: str) -> None:
    for seed in range(4):
        case = make_case(
            REFERENCE_GRID.index((group, head_dim, block_size, mask_kind)) * 10 + seed,
            group=group,
            head_dim=head_dim,
            block_size=block_size,
            mask_kind=mask_kind,
        )
        oracle = naive_attention(case)
        assert_close(run_into_nan(reference.tree_attention, case), case, oracle)
        assert_close(reference.tree_attention(*case.args()), case, oracle)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_reference_half(dtype: torch.dtype, mask_kind: str) -> None:
    for seed in range(6):
        case = make_case(
            100 + seed,
            group=(1, 3, 4)[seed % 3],
            head_dim=(64, 80, 128)[seed % 3],
            block_size=(16, 32)[seed % 2],
            mask_kind=mask_kind,
            dtype=dtype,
        )
        assert_close(run_into_nan(reference.tree_attention, case), case, naive_attention(case))


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_reference_consecutive_blocks(mask_kind: str) -> None:
    """Block tables that are runs of consecutive blocks take the reference's no-copy path."""
    for seed in range(4):
        case = make_case(200 + seed, group=3, mask_kind=mask_kind, consecutive_blocks=True)
        assert_close(run_into_nan(reference.tree_attention, case), case, naive_attention(case))


@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("max_new,mask_kind", [(1, "causal"), (9, "causal"), (9, "tree"), (16, "bidirectional")])
def test_reference_batched_steps_and_shared_plan(consecutive: bool, max_new: int, mask_kind: str) -> None:
    """Steps with few new tokens per sequence (decoding, verifying drafts) run as one padded call; a plan built
    once serves every layer."""
    for seed in range(6):
        case = make_case(
            300 + seed,
            group=(1, 3, 4)[seed % 3],
            mask_kind=mask_kind,
            max_seqs=8,
            max_new=max_new,
            consecutive_blocks=consecutive,
        )
        oracle = naive_attention(case)
        plan = reference.plan_tree_attention(
            case.block_tables, case.context_lens, case.cu_seqlens_q, case.tree_mask, 16
        )
        assert (plan.batched is not None) == (case.block_tables.shape[0] > 1)
        for _ in range(2):  # the same plan twice, as two layers would use it
            out = torch.full_like(case.q, float("nan"))
            assert reference.attend(case.q, case.k_cache, case.v_cache, plan, case.scale, out) is out
            assert_close(out, case, oracle)


@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("max_new,mask_kind", [(1, "causal"), (9, "tree"), (33, "causal"), (33, "tree")])
def test_reference_context_mask(consecutive: bool, max_new: int, mask_kind: str) -> None:
    """Hidden context slots (holes of garbage) are never attended, on the batched and per-sequence paths."""
    for seed in range(4):
        case = make_case(
            350 + seed,
            group=(1, 3)[seed % 2],
            mask_kind=mask_kind,
            max_seqs=5,
            max_new=max_new,
            consecutive_blocks=consecutive,
            masked_context=True,
        )
        assert_close(run_into_nan(reference.tree_attention, case), case, naive_attention(case))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_attention_step_writes_then_attends(backend: str, mask_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's per-step object: new K/V written by slot, then attention, equal to the oracle on two layers."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("LEAPSERVE_KERNEL_BACKEND", backend)
    case = make_case(
        400 + MASK_KINDS.index(mask_kind),
        group=3,
        mask_kind=mask_kind,
        max_new=9,
        max_context=60,
        masked_context=mask_kind == "tree",
    )
    block_size = case.k_cache.shape[1]
    new = [vis.shape[0] for vis in case.visible]
    ctx = case.context_lens.tolist()
    slots, new_k, new_v = [], [], []
    for b, (k, v, n) in enumerate(zip(case.keys, case.values, new)):
        for pos in range(ctx[b], ctx[b] + n):
            slots.append(int(case.block_tables[b, pos // block_size]) * block_size + pos % block_size)
        new_k.append(k[ctx[b] :])
        new_v.append(v[ctx[b] :])
    slot_mapping = torch.tensor(slots, device=DEVICE)
    step = kernels.AttentionStep(
        slot_mapping,
        case.block_tables,
        case.context_lens,
        case.cu_seqlens_q,
        case.tree_mask,
        block_size,
        case.context_mask,
    )
    oracle = naive_attention(case)
    for _ in range(2):  # two layers: caches whose new rows are still poison until write_kv fills them
        k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
        flat(k_cache)[slot_mapping] = float("nan")
        flat(v_cache)[slot_mapping] = float("nan")
        step.write_kv(torch.cat(new_k).to(DEVICE), torch.cat(new_v).to(DEVICE), k_cache, v_cache)
        assert_close(step.attend(case.q, k_cache, v_cache, case.scale), case, oracle)


def test_reference_single_sequence_returns_fresh_tensor() -> None:
    """One sequence without `out`: the result is returned directly; it must still be a valid [T, Hq, D]."""
    for mask_kind in MASK_KINDS:
        case = make_case(7, group=3, mask_kind=mask_kind, max_seqs=1)
        assert_close(reference.tree_attention(*case.args()), case, naive_attention(case))


# --- tree_attention: Triton ----------------------------------------------------------------------------------

TRITON_GRID = list(itertools.product((1, 3, 4), (64, 80, 128), (16, 32), MASK_KINDS))


@needs_triton
@pytest.mark.parametrize("group,head_dim,block_size,mask_kind", TRITON_GRID)
def test_triton_fp32(group: int, head_dim: int, block_size: int, mask_kind: str) -> None:
    for seed in range(2):
        case = make_case(
            1000 + TRITON_GRID.index((group, head_dim, block_size, mask_kind)) * 10 + seed,
            group=group,
            head_dim=head_dim,
            block_size=block_size,
            mask_kind=mask_kind,
            max_seqs=4,
        )
        assert_close(run_into_nan(triton_attention(), case), case, naive_attention(case))


@needs_triton
@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_triton_split_keys(num_splits: int, mask_kind: str) -> None:
    """Flash-decoding path: keys split over several programs, then merged (splits may be empty)."""
    case = make_case(2000 + num_splits, group=4, mask_kind=mask_kind, max_seqs=3, max_new=6)
    assert_close(run_into_nan(triton_attention(), case, num_splits=num_splits), case, naive_attention(case))


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("mask_kind", ["causal", "tree"])
def test_triton_context_mask(num_splits: int, mask_kind: str) -> None:
    case = make_case(
        2100 + num_splits, group=4, mask_kind=mask_kind, max_seqs=3, max_new=9, max_context=120, masked_context=True
    )
    assert_close(run_into_nan(triton_attention(), case, num_splits=num_splits), case, naive_attention(case))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_triton_half(dtype: torch.dtype, mask_kind: str) -> None:
    for seed in range(2):
        case = make_case(
            3000 + seed,
            group=(3, 4)[seed],
            head_dim=(80, 128)[seed],
            block_size=(16, 32)[seed],
            mask_kind=mask_kind,
            dtype=dtype,
            max_seqs=3,
        )
        assert_close(run_into_nan(triton_attention(), case), case, naive_attention(case))


@needs_triton
@pytest.mark.parametrize("head_dim", [32, 256])
def test_triton_extreme_head_dims(head_dim: int) -> None:
    case = make_case(
        4000 + head_dim,
        group=2,
        head_dim=head_dim,
        block_size=32,
        mask_kind="tree",
        max_seqs=2,
        max_new=9,
        max_context=80,
    )
    assert_close(run_into_nan(triton_attention(), case), case, naive_attention(case))


@needs_triton
def test_triton_decode_many_sequences() -> None:
    """Decode shape: one new token for each of many sequences, GQA 4, some with no context."""
    case = make_case(
        5000, group=4, head_dim=64, block_size=16, mask_kind="causal", dtype=torch.float16, max_seqs=12, max_new=1
    )
    assert_close(run_into_nan(triton_attention(), case), case, naive_attention(case))


# --- tree_attention: edge cases and both backends -------------------------------------------------------------


def backends() -> list[str]:
    return ["reference", "triton"] if HAS_TRITON else ["reference"]


@pytest.mark.parametrize("backend", backends())
def test_sequence_without_new_tokens(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequence with no new tokens this step (equal cu_seqlens_q entries) is skipped; the others are exact."""
    monkeypatch.setenv("LEAPSERVE_KERNEL_BACKEND", backend)
    case = make_case(6000, group=2, mask_kind="tree", max_seqs=1, max_new=5)
    block_tables = torch.cat([case.block_tables, torch.full_like(case.block_tables, case.poison_block)])
    context_lens = torch.cat([case.context_lens, torch.tensor([7], dtype=torch.int32, device=DEVICE)])
    cu = torch.cat([case.cu_seqlens_q, case.cu_seqlens_q[-1:]])
    out = torch.full_like(case.q, float("nan"))
    kernels.tree_attention(
        case.q, case.k_cache, case.v_cache, block_tables, context_lens, cu, case.tree_mask, case.scale, out=out
    )
    assert_close(out, case, naive_attention(case))


@pytest.mark.parametrize("backend", backends())
def test_single_token_without_context(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The very first token of a sequence attends only to itself: output = its own value."""
    monkeypatch.setenv("LEAPSERVE_KERNEL_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(2, 16, 2, 64, generator=gen).to(DEVICE)
    v_cache = torch.randn(2, 16, 2, 64, generator=gen).to(DEVICE)
    q = torch.randn(1, 4, 64, generator=gen).to(DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    out = kernels.tree_attention(
        q, k_cache, v_cache, torch.tensor([[1]], **i32), torch.tensor([0], **i32), torch.tensor([0, 1], **i32)
    )
    expected = v_cache[1, 0].repeat_interleave(2, dim=0)
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=1e-6)


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEAPSERVE_KERNEL_BACKEND", raising=False)
    assert kernels.backend_for(torch.device("cpu")) == "reference"
    assert kernels.backend_for(torch.device("cuda")) == "triton"
    monkeypatch.setenv("LEAPSERVE_KERNEL_BACKEND", "triton")
    assert kernels.backend_for(torch.device("cpu")) == "triton"
    monkeypatch.setenv("LEAPSERVE_KERNEL_BACKEND", "reference")
    assert kernels.backend_for(torch.device("cuda")) == "reference"
    monkeypatch.setenv("LEAPSERVE_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LEAPSERVE_KERNEL_BACKEND"):
        kernels.backend_for(torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAPSERVE_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k_cache = torch.zeros(1, 16, 1, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.move_kv(k_cache, k_cache.clone(), torch.tensor([0]), torch.tensor([1]))


def test_import_needs_no_triton() -> None:
    """`import leapserve.kernels` neither imports triton nor needs it; the CPU path runs without it."""
    script = textwrap.dedent("""
        import sys
        import torch
        sys.modules["triton"] = None  # any `import triton` now fails
        import leapserve.kernels as k
        i32 = dict(dtype=torch.int32)
        out = k.tree_attention(torch.randn(2, 4, 32), torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32),
                               torch.tensor([[0]], **i32), torch.tensor([3], **i32), torch.tensor([0, 2], **i32))
        assert out.shape == (2, 4, 32)
    """)
    env = {key: value for key, value in os.environ.items() if key != "LEAPSERVE_KERNEL_BACKEND"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_validation_errors(impl: str) -> None:
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    attention = reference.tree_attention if impl == "reference" else triton_attention()
    case = make_case(7000, group=2, mask_kind="tree", max_seqs=2, num_kv_heads=2)
    good = dict(
        zip(("q", "k_cache", "v_cache", "block_tables", "context_lens", "cu_seqlens_q", "tree_mask"), case.args())
    )

    def call(pattern: str, **bad) -> None:
        with pytest.raises(ValueError, match=pattern):
            attention(**{**good, **bad})

    call("multiple of num_kv_heads", q=case.q[:, :3])
    call("head_dim", q=case.q[..., :32])
    call("dtype", q=case.q.half())
    call("block_tables must have dtype torch.int32", block_tables=case.block_tables.long())
    call("context_lens must be", context_lens=case.context_lens[:1])
    call("cu_seqlens_q must have dtype", cu_seqlens_q=case.cu_seqlens_q.long())
    call("tree_mask must be a bool", tree_mask=case.tree_mask.int())
    call("tree_mask must be a bool", tree_mask=case.tree_mask[1:])
    call("v_cache shape", v_cache=case.v_cache[:, :, :1])
    call("k_cache must be", k_cache=case.k_cache[0])
    call("context_mask must be a bool", context_mask=torch.ones(1, 400, dtype=torch.bool, device=DEVICE))
    call("context_mask must be a bool", context_mask=torch.ones(2, 400, dtype=torch.int32, device=DEVICE))
    if impl == "reference":  # value checks need the metadata on the host; the Triton path skips them
        call(
            "context_mask has only",
            context_mask=torch.ones(2, 0, dtype=torch.bool, device=DEVICE),
            context_lens=case.context_lens + 1,
        )
        call("does not fit", context_lens=case.context_lens + 10_000)
        call("cu_seqlens_q must start at 0", cu_seqlens_q=case.cu_seqlens_q + 1)


# --- write_kv / move_kv --------------------------------------------------------------------------------------

CACHE_IMPLS = ["reference", "triton"] if HAS_TRITON else ["reference"]


def cache_ops(impl: str):
    if impl == "reference":
        return reference
    from leapserve.kernels import cache_ops as triton_cache_ops

    return triton_cache_ops


def random_cache(
    seed: int, dtype: torch.dtype, num_blocks: int = 9, block_size: int = 16, num_kv_heads: int = 3, head_dim: int = 80
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (
        torch.randn(shape, generator=gen).to(dtype).to(DEVICE),
        torch.randn(shape, generator=gen).to(dtype).to(DEVICE),
    )


def flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(-1, *cache.shape[2:])


@pytest.mark.parametrize("impl", CACHE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv(impl: str, dtype: torch.dtype, slot_dtype: torch.dtype) -> None:
    k_cache, v_cache = random_cache(1, dtype)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    gen = torch.Generator().manual_seed(2)
    num_tokens = 23
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[::5] = -1  # skipped tokens
    # The engine's layout: key/value are transposed views of [Hkv, T, D] projections (not contiguous).
    key = torch.randn(3, num_tokens, 80, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)
    value = torch.randn(3, num_tokens, 80, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)
    expected_k, expected_v = flat(k_cache).clone(), flat(v_cache).clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot], expected_v[slot] = key[t], value[t]
    cache_ops(impl).write_kv(key, value, k_cache, v_cache, slots.to(slot_dtype).to(DEVICE))
    assert torch.equal(flat(k_cache), expected_k) and torch.equal(flat(v_cache), expected_v)


def compaction(context_len: int, accepted: list[int]) -> tuple[list[int], list[int]]:
    """Slots of an accepted tree path (new-token indices, increasing) and where compaction puts them."""
    return [context_len + i for i in accepted], [context_len + k for k in range(len(accepted))]


@pytest.mark.parametrize("impl", CACHE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_move_kv(impl: str, dtype: torch.dtype) -> None:
    k_cache, v_cache = random_cache(3, dtype)
    rnd = random.Random(4)
    src, dst = [], []
    for context_len in (5, 40, 96):  # three sequences' accepted paths, moved in one call
        accepted = sorted(rnd.sample(range(12), 5))
        s, d = compaction(context_len, accepted)
        src += s
        dst += d
    # Plus a swap, which only "read every source before writing" gets right.
    src += [130, 131]
    dst += [131, 130]
    expected_k, expected_v = flat(k_cache).clone(), flat(v_cache).clone()
    expected_k[dst], expected_v[dst] = flat(k_cache)[src], flat(v_cache)[src]
    index = dict(dtype=torch.int64, device=DEVICE)
    cache_ops(impl).move_kv(k_cache, v_cache, torch.tensor(src, **index), torch.tensor(dst, **index))
    assert torch.equal(flat(k_cache), expected_k) and torch.equal(flat(v_cache), expected_v)


@pytest.mark.parametrize("impl", CACHE_IMPLS)
def test_cache_op_validation(impl: str) -> None:
    ops = cache_ops(impl)
    k_cache, v_cache = random_cache(5, torch.float32)
    key = torch.randn(4, 3, 80, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        ops.write_kv(key.half(), key.half(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        ops.write_kv(key, key, k_cache, v_cache, slots[:3])
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        ops.write_kv(key, key, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="key must be"):
        ops.write_kv(key[:, :2], key, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="dst_slots must be"):
        ops.move_kv(k_cache, v_cache, slots, slots[:2])


# --- GPU compilation without a GPU ----------------------------------------------------------------------------

AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from leapserve.kernels import cache_ops, tree_attention_triton as ta

    def compile_for_sm90(kernel, types, constexprs):
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
        target = GPUTarget("cuda", 90, 32)
        options = triton.compiler.make_backend(target).parse_options({"num_warps": 8, "num_stages": 2})
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options.__dict__)
        assert compiled.asm["cubin"]

    def attention_types(dtype):
        types = {name: dtype for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
        types.update({name: "*fp32" for name in ("part_acc_ptr", "part_max_ptr", "part_sum_ptr")})
        types.update({name: "*i32" for name in ("block_tables_ptr", "context_lens_ptr", "cu_seqlens_q_ptr")})
        return types | dict(tree_mask_ptr="*u8", context_mask_ptr="*u8", scale_log2e="fp32")

    tile = dict(GROUP=3, GROUP_PAD=4, BLOCK_Q=4, BLOCK_N=32, HEAD_DIM=80, BLOCK_D=128, PAGE_SIZE=16)
    # Decode (Triton turns integer arguments equal to 1 into constants), then a tree step with split keys.
    compile_for_sm90(ta._tree_attention_kernel, attention_types("*bf16"), tile | dict(
        num_seqs=1, num_tokens=1, HAS_TREE_MASK=False, HAS_CONTEXT_MASK=False, NUM_SPLITS=1, NATIVE_DOT=True))
    compile_for_sm90(ta._tree_attention_kernel, attention_types("*fp16"), tile | dict(
        HAS_TREE_MASK=True, HAS_CONTEXT_MASK=True, NUM_SPLITS=8, NATIVE_DOT=True))
    compile_for_sm90(ta._tree_attention_kernel, attention_types("*fp32"), tile | dict(
        HAS_TREE_MASK=True, HAS_CONTEXT_MASK=False, NUM_SPLITS=1, NATIVE_DOT=False))
    compile_for_sm90(ta._merge_splits_kernel, dict(out_ptr="*bf16", part_acc_ptr="*fp32", part_max_ptr="*fp32",
                     part_sum_ptr="*fp32"), dict(NUM_SPLITS=8, SPLITS_PAD=8, HEAD_DIM=80, BLOCK_D=128))
    compile_for_sm90(cache_ops._copy_kv_rows_kernel,
                     {name: "*i16" for name in ("src_k_ptr", "src_v_ptr", "dst_k_ptr", "dst_v_ptr")}
                     | dict(src_rows_ptr="*i64", dst_rows_ptr="*i64"),
                     dict(SRC_PAGE_SIZE=16, DST_PAGE_SIZE=1, HAS_SRC_ROWS=True, HAS_DST_ROWS=False, NUM_HEADS=3,
                          HEAD_DIM=80, BLOCK_H=4, BLOCK_D=128))
""")


@needs_triton
def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the GPU compiler rejects: compile every kernel to a cubin (ptxas, no GPU)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", AOT_SCRIPT], check=True, env=env, timeout=300)
