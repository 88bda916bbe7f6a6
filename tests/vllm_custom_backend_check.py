"""Run by test_vllm.py with `.venv-vllm`'s Python: leapserve's `CUSTOM` attention backend, called as vLLM's
attention layers call it, writes and attends in vLLM's Triton cache layout. Prints what the test asserts."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # leapserve's Triton kernels in the interpreter, before they are imported
os.environ["LEAPSERVE_KERNEL_BACKEND"] = "triton"

import torch  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata  # noqa: E402

from leapserve.vllm_plugin import register  # noqa: E402

register()
backend = AttentionBackendEnum.CUSTOM.get_class()
H, HKV, D, B = 4, 2, 32, 16


def impl(sliding_window: int | None = None):
    return backend.get_impl_cls()(
        num_heads=H, head_size=D, scale=D**-0.5, num_kv_heads=HKV, alibi_slopes=None,
        sliding_window=sliding_window, kv_cache_dtype="auto",
    )  # fmt: skip


qlens, ctx = [3, 1, 5], [20, 7, 0]
T, seq = sum(qlens), [c + q for c, q in zip(ctx, qlens, strict=True)]
table = torch.tensor([[5, 2, 0], [7, 0, 0], [1, 0, 0]], dtype=torch.int32)


def slot(b: int, p: int) -> int:
    return int(table[b, p // B]) * B + p % B


slots = torch.tensor([slot(b, p) for b in range(3) for p in range(ctx[b], seq[b])] + [-1])  # + one padded token
torch.manual_seed(0)
kv = torch.randn(8, HKV, B, 2 * D)  # vLLM's Triton layout [blocks, Hkv, block, 2D]; random "cached context"
k, v, q = torch.randn(T + 1, HKV, D), torch.randn(T + 1, HKV, D), torch.randn(T + 1, H, D)
attention = impl()
attention.do_kv_cache_update(None, k, v, kv, slots)
written = all(
    torch.equal(kv[s // B, :, s % B, :D], k[t]) and torch.equal(kv[s // B, :, s % B, D:], v[t])
    for t, s in enumerate(slots[:T].tolist())
)
meta = TritonAttentionMetadata(
    num_actual_tokens=T, max_query_len=max(qlens), query_start_loc=torch.tensor([0, 3, 4, 9], dtype=torch.int32),
    max_seq_len=max(seq), seq_lens=torch.tensor(seq, dtype=torch.int32), block_table=table, slot_mapping=slots,
    seq_threshold_3D=0, num_par_softmax_segments=16, softmax_segm_output=None, softmax_segm_max=None,
    softmax_segm_expsum=None, causal=True,
)  # fmt: skip
out = torch.zeros(T + 1, H * D)
attention.forward(None, q, k, v, kv, meta, out)

err, t = 0.0, 0
for b in range(3):  # float64 oracle: causal attention over the sequence's slots
    rows = [slot(b, p) for p in range(seq[b])]
    keys = torch.stack([kv[s // B, :, s % B, :D] for s in rows]).double().repeat_interleave(H // HKV, 1)
    values = torch.stack([kv[s // B, :, s % B, D:] for s in rows]).double().repeat_interleave(H // HKV, 1)
    for i in range(qlens[b]):
        visible = ctx[b] + i + 1
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[t].double(), keys[:visible]) * D**-0.5, -1)
        want = torch.einsum("hl,lhd->hd", w, values[:visible])
        err = max(err, (want - out[t].view(H, D)).abs().max().item())
        t += 1
padded_untouched = bool(out[T].eq(0).all())
print(backend.get_name(), written, err < 1e-5, padded_untouched, attention._covered(meta), impl(8)._covered(None))
