"""The C++ CPU ops of a compiled model (kernels/cpu_ops.cpp) against what they replace: the paged attention op
against `AttentionStep` on the reference path over a sweep of steps (the same cache writes; through SDPA the same
values bit for bit, through the op's own fp32 attention of short sequences values within fp32 rounding of the
reference and of the float64 oracle, and each query row's bits independent of the rest of the step), the packed
GEMM op against oneDNN's call and float64 (its own loop for a few fp32 or bf16 rows against both)."""

from __future__ import annotations

import gc
import itertools
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_kernels import MASK_KINDS, assert_close, make_case, naive_attention

from leapserve.decoding.model_loader import cache_dir
from leapserve.kernels import AttentionStep, cpu_ops
from leapserve.kernels.packed_linear import PackedLinear, packable, run_through_op


@pytest.fixture(scope="module", autouse=True)
def ops():
    return cpu_ops.load(cache_dir() / "extensions")


@pytest.fixture(params=["sdpa", "native"])
def attention(request):
    """Each test runs with the op's own fp32 attention of short sequences off (all SDPA) and on (the default)."""
    cpu_ops.use_native_attention(request.param == "native")
    yield request.param
    cpu_ops.use_native_attention(True)


def new_tokens(case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot mapping [T], new keys, new values [T, Hkv, D]) of a case's new tokens, as the engine writes them."""
    block_size = case.k_cache.shape[1]
    ctx = case.context_lens.tolist()
    slots, new_k, new_v = [], [], []
    for b, (k, v) in enumerate(zip(case.keys, case.values)):
        for pos in range(ctx[b], len(k)):
            slots.append(int(case.block_tables[b, pos // block_size]) * block_size + pos % block_size)
        new_k.append(k[ctx[b] :])
        new_v.append(v[ctx[b] :])
    return torch.tensor(slots), torch.cat(new_k), torch.cat(new_v)


def runs_native(case) -> bool:
    """Whether the op's own attention computes (some of) this case: fp32 or bf16, a sequence with at most 16
    queries."""
    new = case.cu_seqlens_q.diff()
    native_dtype = case.q.dtype in cpu_ops.NATIVE_ATTENTION_DTYPES
    return cpu_ops.loaded().native_attention() and native_dtype and bool((new <= 16).any())


def assert_like_fake(out: torch.Tensor, fake: torch.Tensor) -> None:
    """What an op returned is laid out as its fake implementation says: compiled graphs trust the fake's shape and
    strides without checking them (`runner.compiled`)."""
    assert (out.shape, out.stride(), out.dtype) == (fake.shape, fake.stride(), fake.dtype)


def run_both(case, layers: int = 2) -> None:
    """Each layer's write and attention through the C++ op and through `AttentionStep`: equal caches; outputs equal
    through SDPA, within fp32 rounding of the reference and the oracle through the op's own attention."""
    slots, k, v = new_tokens(case)
    step = AttentionStep(
        slots,
        case.block_tables,
        case.context_lens,
        case.cu_seqlens_q,
        case.tree_mask,
        case.k_cache.shape[1],
        case.context_mask,
    )
    ours = ([case.k_cache.clone() for _ in range(layers)], [case.v_cache.clone() for _ in range(layers)])
    theirs = ([case.k_cache.clone() for _ in range(layers)], [case.v_cache.clone() for _ in range(layers)])
    scale = case.scale if case.scale is not None else case.q.shape[-1] ** -0.5
    assert cpu_ops.push_step(*ours, step)
    try:
        for layer in range(layers):
            q = case.q * (layer + 1)
            v_in_row = torch.cat([k, v], dim=1)[:, k.shape[1] :]  # a view into wider rows, as the fused qkv output's
            out = torch.ops.leapserve_cpu.paged_attention(q, k * (layer + 1), v_in_row, layer, scale)
            step.write_kv(k * (layer + 1), v, theirs[0][layer], theirs[1][layer])
            expected = step.attend(q, theirs[0][layer], theirs[1][layer], scale)
            assert out.shape == expected.shape and out.dtype == expected.dtype
            assert_like_fake(out, cpu_ops._paged_attention_shape(q, k, v_in_row, layer, scale))
            if runs_native(case):  # fp32 sums in another order; in bf16, then rounded: a bf16 step apart at most
                tol = 1e-5 if case.q.dtype == torch.float32 else 2**-7
                torch.testing.assert_close(out, expected, rtol=tol, atol=tol * float(expected.abs().max()))
                if layer == 0:  # the case's own q and K/V: the float64 oracle applies
                    assert_close(out, case, naive_attention(case))
            else:
                assert torch.equal(out, expected)
            for mine, reference in zip(ours, theirs):
                assert torch.equal(mine[layer].nan_to_num(7.0), reference[layer].nan_to_num(7.0))
    finally:
        cpu_ops.pop_step()


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("max_new", [1, 9, 40])  # decoding (one padded call), verifying trees, prefill (per sequence)
@pytest.mark.parametrize("consecutive", [False, True])
def test_paged_attention_equals_the_reference(mask_kind: str, max_new: int, consecutive: bool, attention) -> None:
    for seed in range(4):
        case = make_case(
            1000 + seed,
            group=3,
            mask_kind=mask_kind,
            max_new=max_new,
            max_context=80,
            consecutive_blocks=consecutive,
            masked_context=seed % 2 == 1,
        )
        run_both(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_in_half_precision_computes_as_the_reference(dtype: torch.dtype, attention) -> None:
    """fp16 runs the reference's ATen calls; bf16 with few queries the op's own attention, in fp32 as SDPA does."""
    for seed, max_new in ((0, 1), (1, 9), (2, 40)):
        run_both(make_case(2000 + seed, group=2, mask_kind="tree", max_new=max_new, max_context=50, dtype=dtype))


def test_one_sequence_decoding_and_a_lone_prefill(attention) -> None:
    for seed in range(6):
        case = make_case(3000 + seed, group=3, mask_kind="causal", max_seqs=1, max_new=1 + 20 * (seed % 2))
        run_both(case, layers=3)


def attend_rows(k_cache, v_cache, q, context_lens, new, tree_mask=None) -> torch.Tensor:
    """The op's output for sequences s at cache blocks [16 s, 16 s + 16): `new[s]` queries after `context_lens[s]`
    keys (their own K/V already in the cache), causal unless `tree_mask` says otherwise."""
    num_seqs = len(new)
    tables = torch.arange(16 * num_seqs, dtype=torch.int32).view(num_seqs, 16)
    cu = torch.tensor([0, *itertools.accumulate(new)], dtype=torch.int32)
    slots = torch.cat([16 * 16 * s + torch.arange(c, c + n) for s, (c, n) in enumerate(zip(context_lens, new))])
    step = AttentionStep(slots, tables, torch.tensor(context_lens, dtype=torch.int32), cu, tree_mask, 16)
    assert cpu_ops.push_step([k_cache], [v_cache], step)
    try:
        k, v = k_cache.view(-1, *k_cache.shape[2:])[slots], v_cache.view(-1, *v_cache.shape[2:])[slots]
        return torch.ops.leapserve_cpu.paged_attention(q, k, v, 0, 0.125)
    finally:
        cpu_ops.pop_step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_attention_gives_a_row_the_same_bits_in_any_step(dtype: torch.dtype) -> None:
    """Lossless speculation compares a token decoded alone with the same token verified as a tree's root beside
    other sequences, or as a node whose masked siblings sit among its keys: the op's own attention computes each row
    from its visible keys alone, in their order, so all are bit-equal (whatever the number of keys that follow,
    rows, sequences, or the split of work over threads)."""
    cpu_ops.use_native_attention(True)
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(16 * 9, 16, 2, 64, generator=gen).to(dtype)
    v_cache = torch.randn(16 * 9, 16, 2, 64, generator=gen).to(dtype)
    q = torch.randn(9 * 6, 6, 64, generator=gen).to(dtype)
    alone = attend_rows(k_cache, v_cache, q[:1], [200], [1])  # sequence 0 decodes its token 200
    tree = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 0, 1, 0, 1, 0],
            [1, 1, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    tree_step = attend_rows(k_cache, v_cache, q[:6], [200], [6], tree)  # token 200 as the root of a 6-node tree
    crowd = attend_rows(k_cache, v_cache, q, [200] + [25 * s for s in range(1, 9)], [6] * 9, tree.repeat(9, 1))
    assert torch.equal(tree_step[:1], alone) and torch.equal(crowd[:1], alone)
    assert torch.equal(crowd[:6], tree_step)
    # the tree's path 0 -> 1 -> 3 -> 5 accepted: its K/V moved to slots 200-203, node 5 decoded there alone after
    # its ancestors gets the bits it got with its masked siblings among its keys
    for cache in (k_cache, v_cache):
        cache.view(-1, 2, 64)[201:204] = cache.view(-1, 2, 64)[[201, 203, 205]].clone()
    assert torch.equal(attend_rows(k_cache, v_cache, q[5:6], [203], [1]), tree_step[5:6])
    cpu_ops.use_native_attention(False)
    sdpa = attend_rows(k_cache, v_cache, q[:1], [200], [1])
    cpu_ops.use_native_attention(True)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(alone, sdpa, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_attention_splits_work_over_threads_without_changing_a_bit(dtype: torch.dtype) -> None:
    """With few sequences the op splits a head's query rows over the threads, and widens a bf16 head's K/V once
    for a task with many rows: neither the split (1 to 4 threads) nor the widening changes a row's bits."""
    cpu_ops.use_native_attention(True)
    gen = torch.Generator().manual_seed(11)
    k_cache = torch.randn(16 * 2, 16, 3, 64, generator=gen).to(dtype)
    v_cache = torch.randn(16 * 2, 16, 3, 64, generator=gen).to(dtype)
    q = torch.randn(13, 9, 64, generator=gen).to(dtype)
    tree = torch.rand(13, 13, generator=gen).lt(0.5).tril() | torch.eye(13, dtype=torch.bool)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            outs.append(attend_rows(k_cache, v_cache, q, [150], [13], tree))
            root = attend_rows(k_cache, v_cache, q[:1], [150], [1])  # decoded alone: 3 rows, not widened
            assert torch.equal(outs[-1][:1], root)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize(
    ("variable", "native", "other"),
    [("LEAPSERVE_CPU_ATTENTION", "native", "sdpa"), ("LEAPSERVE_CPU_GEMV", "native", "onednn")],
)
def test_the_own_code_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch, variable, native, other) -> None:
    monkeypatch.setenv(variable, other)
    assert not cpu_ops._choice_from_env(variable, native, other)
    monkeypatch.setenv(variable, "Native")
    assert cpu_ops._choice_from_env(variable, native, other)
    monkeypatch.delenv(variable)
    assert cpu_ops._choice_from_env(variable, native, other)
    monkeypatch.setenv(variable, "fast")
    with pytest.raises(ValueError, match=f"{variable} must be native or {other}"):
        cpu_ops._choice_from_env(variable, native, other)


def test_the_c_shims_table_pickles_as_its_declarations() -> None:
    """inductor's compile cache keys on its pickled configuration, which holds the ops' C shims: the table pickles
    (by its declarations, not the ops) and comes back equal, or every compile would bypass the cache."""
    shims = cpu_ops.c_shims()
    ops = torch.ops.leapserve_cpu
    assert set(shims) == {ops.packed_linear.default, ops.paged_attention.default}
    assert pickle.loads(pickle.dumps(shims)) == shims


def test_steps_nest_and_an_op_outside_a_step_is_refused() -> None:
    """A drafter's forward runs inside its target's step: the innermost step is the one attended; outside any step
    the op raises instead of reading stale state."""
    outer, inner = make_case(4000, group=1, mask_kind="causal", max_new=1), make_case(4001, group=1, mask_kind="tree")
    with pytest.raises(RuntimeError, match="outside a forward_context"):
        torch.ops.leapserve_cpu.paged_attention(outer.q, outer.q, outer.q, 0, 1.0)
    slots, k, v = new_tokens(outer)
    step = AttentionStep(slots, outer.block_tables, outer.context_lens, outer.cu_seqlens_q, None, 16)
    assert cpu_ops.push_step([outer.k_cache.clone()], [outer.v_cache.clone()], step)
    try:
        run_both(inner, layers=1)
        with pytest.raises(RuntimeError, match="no layer 1"):
            torch.ops.leapserve_cpu.paged_attention(outer.q, k, v, 1, 1.0)
        torch.ops.leapserve_cpu.paged_attention(outer.q, k, v, 0, 1.0)  # the outer step again
    finally:
        cpu_ops.pop_step()


DTYPES = [
    torch.float32,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not packable(torch.zeros(2, 2, dtype=torch.bfloat16)), reason="no oneDNN bf16 here"),
    ),
]


def assert_rounded_from(out: torch.Tensor, exact: torch.Tensor) -> None:
    """`out` is `exact` (fp32 or float64) rounded to `out`'s dtype, give or take fp32 summation: within fp32 rounding
    for fp32, within half a bf16 unit in the last place (at most 2^-8 of the value) for bf16."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, exact.float(), rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(out.double(), exact.double(), rtol=2**-8, atol=1e-4)


@pytest.mark.skipif(not packable(torch.zeros(2, 2)), reason="oneDNN cannot pack weights here")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 12, 13, 33])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features", [40, 64])
def test_packed_linear_op_equals_onednn_and_linear(dtype: torch.dtype, rows: int, bias: bool, in_features: int) -> None:
    """Through oneDNN (more rows, or a width the own loop does not take) the op is the eager path's call, bit for
    bit; up to `own_rows` rows (the own loop's 12 fp32 or 4 bf16 with AVX-512, else 3, for a width divisible by 16;
    16 bf16 through AMX's tiles where the CPU has them; every count of a k-major weight) run the op's own GEMM: the
    exact result rounded once (bf16: products and sums in fp32), within rounding of oneDNN's. A k-major weight
    (every row count through the op's own GEMM) has no oneDNN copy: told not to, the op runs ATen's linear."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, in_features, generator=gen).to(dtype)
    b = torch.randn(48, generator=gen).to(dtype) if bias else None
    lin = PackedLinear(weight, b)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    out = torch.ops.leapserve_cpu.packed_linear(x, lin.weight, lin.bias)
    assert_like_fake(out, cpu_ops._packed_linear_shape(x, lin.weight, lin.bias))
    if rows <= cpu_ops.own_rows(dtype, in_features, 48):
        exact = x.double() @ weight.double().T + (0 if b is None else b.double())
        assert_rounded_from(out, exact)
        cpu_ops.use_native_gemv(False)
        try:
            onednn = torch.ops.leapserve_cpu.packed_linear(x, lin.weight, lin.bias)
        finally:
            cpu_ops.use_native_gemv(True)
        assert torch.equal(onednn, F.linear(x, weight, b) if lin.k_major else lin(x))
        assert_rounded_from(onednn, exact)
        if lin.k_major:
            assert torch.equal(lin(x), out)  # eager, through the op
    else:
        assert torch.equal(out, lin(x))  # the eager path's direct oneDNN call


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 16, 40])
@pytest.mark.parametrize("out_features", [20_002, 20_000])
def test_few_rows_linear_streams_a_large_weight_in_order(dtype: torch.dtype, rows: int, out_features: int) -> None:
    """The own GEMM over a weight larger than the caches, its rows split between threads (20,002: an odd number each,
    the last one outside the loop's two-row passes of 9 rows or more, and no bf16 tiles; 20,000: AMX's 16-row blocks
    where bf16 takes them, and k-major groups of 64 where weights are k-major): each output is its dot product
    rounded once (within fp32 summation of float64), and the same bits on every call."""
    rows = min(rows, cpu_ops.own_rows(dtype, 576, out_features))
    gen = torch.Generator().manual_seed(7)
    lin = PackedLinear(torch.randn(out_features, 576, generator=gen).to(dtype))
    x = torch.randn(rows, 576, generator=gen).to(dtype)
    out = torch.ops.leapserve_cpu.packed_linear(x, lin.weight, None)
    assert_rounded_from(out, x.double() @ lin.weight.double().T)
    assert torch.equal(torch.ops.leapserve_cpu.packed_linear(x, lin.weight, None), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features", [1001, 1008])
def test_few_rows_linear_gives_a_row_the_same_bits_beside_others(dtype: torch.dtype, out_features: int) -> None:
    """A row's output does not depend on the rows beside it, up to the op's `own_rows` (1,008 outputs: AMX's tiles
    for bf16 where the CPU has them, or k-major: up to 40 rows, every tile of six and a last group of 48 outputs in
    tiles of seven): a token verified with draft tokens gets the bits plain decoding gives it."""
    gen = torch.Generator().manual_seed(11)
    lin = PackedLinear(torch.randn(out_features, 1536, generator=gen).to(dtype))
    most = min(40, cpu_ops.own_rows(dtype, 1536, out_features))
    x = torch.randn(most, 1536, generator=gen).to(dtype)
    alone = [torch.ops.leapserve_cpu.packed_linear(x[i : i + 1], lin.weight, None) for i in range(most)]
    for rows in range(2, most + 1):
        together = torch.ops.leapserve_cpu.packed_linear(x[:rows], lin.weight, None)
        assert torch.equal(together, torch.cat(alone[:rows]))


def cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


@pytest.mark.skipif(not packable(torch.zeros(2, 2, dtype=torch.bfloat16)), reason="no oneDNN bf16 here")
def test_every_row_count_takes_the_k_major_gemm_or_amx_tiles_take_bf16_where_the_cpu_has_them(monkeypatch) -> None:
    """Where the CPU has AVX-512's bf16 dot product and not AMX: every row count of an fp32 weight whose N is
    divisible by 16, or a bf16 one whose [N, K] is divisible by [16, 2], packed k-major (once the op is loaded: an
    eager model without it keeps oneDNN's copies). Where it has AMX: 16 bf16 rows of a weight whose K is divisible
    by 32 and N by 16. Elsewhere, or for other shapes, the op's own loop's rows."""
    bf16, fp32, flags = torch.bfloat16, torch.float32, cpu_flags()
    loop, fp32_loop = cpu_ops.few_rows(bf16), cpu_ops.few_rows(fp32)
    k_major = "avx512_bf16" in flags and "amx_bf16" not in flags
    every = 2**63 - 1
    assert cpu_ops.k_major() == k_major
    assert cpu_ops.own_rows(bf16, 576, 3072) == (every if k_major else 16 if "amx_bf16" in flags else loop)
    assert cpu_ops.own_rows(bf16, 48, 3072) == (every if k_major else loop)  # K % 32 != 0: no tiles
    assert cpu_ops.own_rows(bf16, 576, 3080) == loop  # N % 16 != 0: neither tiles nor k-major
    assert cpu_ops.own_rows(bf16, 40, 48) == (every if k_major else 0)  # K % 16 != 0: not the loop
    assert cpu_ops.own_rows(bf16, 41, 48) == 0  # K odd: no pairs of k
    assert cpu_ops.own_rows(fp32, 576, 3072) == (every if k_major else fp32_loop)
    assert cpu_ops.own_rows(fp32, 41, 48) == (every if k_major else 0)
    assert cpu_ops.own_rows(fp32, 576, 3080) == fp32_loop
    assert cpu_ops.own_rows(torch.float16, 576, 3072) == 0
    for shape, dtype, packed_k_major in [((48, 40), bf16, k_major), ((40, 48), bf16, False), ((48, 41), bf16, False)]:
        assert PackedLinear(torch.zeros(shape, dtype=dtype)).k_major == packed_k_major
    assert PackedLinear(torch.zeros(48, 41)).k_major == k_major
    monkeypatch.setattr(cpu_ops, "_module", None)
    assert not PackedLinear(torch.zeros(48, 40)).k_major


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 1), (1, 4), (2, 2), (2, 4), (3, 3)])
def test_packed_linear_takes_leading_dims_as_rows(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """A drafter's `[B, L, d]` input: its B * L rows take the own GEMM as a `[rows, d]` input does (up to
    `own_rows`), and come back `[B, L, out]` with the same bits."""
    gen = torch.Generator().manual_seed(5)
    lin = PackedLinear(torch.randn(96, 64, generator=gen).to(dtype))
    x = torch.randn(*shape, 64, generator=gen).to(dtype)
    out = torch.ops.leapserve_cpu.packed_linear(x, lin.weight, None)
    assert out.shape == (*shape, 96)
    assert_like_fake(out, cpu_ops._packed_linear_shape(x, lin.weight, None))
    assert torch.equal(out, torch.ops.leapserve_cpu.packed_linear(x.reshape(-1, 64), lin.weight, None).view_as(out))


@pytest.mark.skipif(not packable(torch.zeros(2, 2)), reason="oneDNN cannot pack weights here")
def test_a_released_weight_is_forgotten_by_the_op() -> None:
    """The C++ map mirrors the packed copies: once the last layer using a weight is gone, so is its entry (a later
    weight at the same address must not find a stale copy)."""
    lin = PackedLinear(torch.randn(8, 4))
    weight, key = lin.weight, lin.handle
    torch.ops.leapserve_cpu.packed_linear(torch.ones(1, 4), weight, None)
    del lin
    gc.collect()
    assert cpu_ops.packed_copy(key) is None
    with pytest.raises(RuntimeError, match="no packed copy"):
        torch.ops.leapserve_cpu.packed_linear(torch.ones(1, 4), weight, None)


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path, caplog) -> None:
    lock = tmp_path / "lock"
    assert not cpu_ops.clear_stale_lock(tmp_path)  # no lock
    lock.touch()
    assert not cpu_ops.clear_stale_lock(tmp_path) and lock.exists()  # a build running now
    old = time.time() - cpu_ops.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        assert cpu_ops.clear_stale_lock(tmp_path)
    assert not lock.exists() and "did not finish" in caplog.text


@pytest.mark.skipif(not packable(torch.zeros(2, 2)), reason="oneDNN cannot pack weights here")
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_a_head_run_through_the_op_gets_the_graph_bits_eagerly(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    head, x = PackedLinear(torch.randn(300, 64, generator=gen)), torch.randn(rows, 64, generator=gen)
    plain = head(x)  # oneDNN's call, as any eager linear
    run_through_op(head)
    got = head(x)
    assert torch.equal(got, torch.ops.leapserve_cpu.packed_linear(x, head.weight, None))
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
