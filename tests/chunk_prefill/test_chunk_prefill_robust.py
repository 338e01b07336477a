"""chunk_prefill_attention on its own (no meta-package): head sizes that are multiples of 8, bf16 under the
interpreter (fp32 dots there), and index values clamped in the kernel (nothing written outside ``out``)."""

import pytest
import torch

from kvflash.attn_common import reference_attention
from kvflash.chunk_prefill import chunk_prefill_attention

from ..cases import check_chunk_prefill, make_case

SEQS = [(1, 20), (7, 7), (5, 33), (0, 4)]


@pytest.mark.parametrize("head_size", [8, 24, 40, 72, 120])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_sizes_and_bf16(device, head_size, dtype):
    case = make_case(SEQS, num_q_heads=6, num_kv_heads=2, head_size=head_size, q_dtype=dtype, nan_unused=True,
                     device=device, seed=head_size)  # fmt: skip
    check_chunk_prefill(case, causal=True, softcap=4.0)


def test_bf16_with_fp8_cache(device):
    scales = torch.rand(len(SEQS), 2, 2) * 0.5 + 0.2
    scales[:, 1] += 1.0  # V's descale differs from K's
    case = make_case(SEQS, num_q_heads=8, head_size=40, q_dtype=torch.bfloat16, kv_dtype=torch.float8_e5m2,
                     k_descale=scales[:, 0], v_descale=scales[:, 1], nan_unused=True, device=device,
                     seed=9)  # fmt: skip
    check_chunk_prefill(case, causal=True)


# The clamped page id lands on a page whose unused slots the case fills with NaN: the interpreter's max warns.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_bad_index_values_stay_inside_the_tensors(device):
    """seqused_k past the table's capacity, a page id past the cache and a query range past total_q: the
    kernel clamps them; rows of the sequences with good indices are unchanged, nothing outside out is written."""
    case = make_case(SEQS, num_q_heads=8, nan_unused=True, device=device, seed=11)
    table = case.kv_args["block_table"].clone()
    table[2, 0] = case.k.shape[0] + 10**6
    used = case.kv_args["seqused_k"].clone()
    used[1] = 10**6
    total_q = case.q.shape[0]
    cu_q = case.cu_seqlens_q.clone()
    cu_q[-1] = total_q + 40
    guard = 4
    buf = torch.full((total_q + 2 * guard, *case.q.shape[1:]), float("nan"), dtype=case.q.dtype, device=device)
    out = buf[guard : guard + total_q]
    chunk_prefill_attention(case.q, case.k, case.v, cu_q, case.max_seqlen_q, case.max_seqlen_k, block_table=table,
                            seqused_k=used, out=out, causal=True)  # fmt: skip
    assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[guard + total_q :]).all(), "wrote outside out"
    want, _ = reference_attention(case.q, case.k, case.v, case.cu_seqlens_q, causal=True, **case.kv_args)
    first = int(case.cu_seqlens_q[1])  # sequence 0 kept good indices
    torch.testing.assert_close(out[:first].float(), want[:first], rtol=0, atol=2e-3)
