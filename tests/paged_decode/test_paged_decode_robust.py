"""paged_decode_attention on its own (no meta-package): ``cu_seqlens_q`` row mapping, a float32 ``out``,
head sizes that are multiples of 8, bf16 under the interpreter, and index values clamped in the kernel."""

import pytest
import torch

from kvflash.attn_common.testing import poison
from kvflash.paged_decode import paged_decode_attention

from ..cases import check_against_reference, check_paged_decode, make_case


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [3, 0, 0], [0, 2, 1]], ids=lambda q: "-".join(map(str, q)))
def test_cu_seqlens_q_maps_rows_to_sequences(device, q_lens):
    # Three query rows (as many as sequences) that cu_seqlens_q deals out unevenly.
    case = make_case(list(zip(q_lens, [30, 17, 44])), num_q_heads=6, num_kv_heads=2, device=device,
                     seed=sum(q_lens) * 7 + q_lens[0])  # fmt: skip
    features = dict(causal=True, window_size=(12, -1), softcap=5.0)
    out = poison(torch.empty_like(case.q))
    _, lse = paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, cu_seqlens_q=case.cu_seqlens_q,
                                    num_splits=3, out=out, return_lse=True, **case.kwargs, **features)  # fmt: skip
    check_against_reference(case, out, lse, **features)


def test_cu_seqlens_q_shape_is_checked(device):
    case = make_case([(1, 5), (1, 6)], device=device, seed=1)
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected shape \(3,\)"):
        paged_decode_attention(case.q, case.k, case.v, 6, cu_seqlens_q=torch.zeros(2, dtype=torch.int32,
                               device=device), **case.kwargs)  # fmt: skip


def test_float32_out_is_the_unrounded_result(device):
    case = make_case([(1, 40), (1, 9)], num_q_heads=4, num_kv_heads=1, device=device, seed=2)
    out32 = poison(torch.empty(case.q.shape, dtype=torch.float32, device=device))
    paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, out=out32, num_splits=1, **case.kwargs)
    out16 = paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, num_splits=1, **case.kwargs)
    assert out32.dtype == torch.float32 and torch.equal(out32.to(case.q.dtype), out16)
    assert not torch.equal(out32, out32.to(case.q.dtype).float()), "a float32 out must not be rounded to fp16"


@pytest.mark.parametrize("head_size", [8, 24, 40, 72, 120])
@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
def test_head_sizes_and_bf16(device, head_size, q_dtype):
    case = make_case([(1, 33), (1, 1), (1, 18)], num_q_heads=6, num_kv_heads=2, head_size=head_size, q_dtype=q_dtype,
                     device=device, seed=head_size)  # fmt: skip
    check_paged_decode(case, num_splits=2)


def test_lengths_and_page_ids_are_clamped(device):
    """seqused_k past the table's capacity and page ids outside the cache read clamped indices, in bounds."""
    case = make_case([(1, 20), (1, 30)], num_q_heads=4, num_kv_heads=2, block_size=16, device=device, seed=3)
    table = case.kv_args["block_table"]
    capacity = table.shape[1] * 16
    bad_table = table.clone()
    bad_table[1, 0] = case.k.shape[0] + 10**6
    used = torch.tensor([10**6, 30], dtype=torch.int32, device=device)
    out = paged_decode_attention(case.q, case.k, case.v, 30, block_table=bad_table, seqused_k=used, num_splits=2,
                                 k_descale=None, v_descale=None)  # fmt: skip
    clamped = dict(block_table=bad_table.clamp(0, case.k.shape[0] - 1),
                   seqused_k=torch.tensor([capacity, 30], dtype=torch.int32, device=device))  # fmt: skip
    # The clamped page holds make_paged_kv's garbage (values up to 100): compare by FlashAttention's rule.
    check_against_reference(case, out, **clamped)
