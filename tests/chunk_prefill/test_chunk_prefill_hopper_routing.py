"""Which chunk-prefill calls the Hopper (sm_90, Gluon) kernel takes: a host decision from dtypes, shapes, strides
and Python scalars (``hopper_op.hopper_prefill_applies``), checked without a GPU too (the platform probe is
patched to report an sm_90 device; tensors live on the GPU where there is one). The helpers here serve the GPU
tests of the kernel itself (test_chunk_prefill_hopper.py)."""

import torch

from kvflash.attn_common import check_attention_call, saturate_to_fp8
from kvflash.chunk_prefill import hopper_op

from ..cases import make_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Decode rows, rows with more queries than keys, empty ranges, chunks crossing many 128-key tiles and Q tiles.
MIX = [(1, 1000), (300, 700), (129, 129), (0, 5), (517, 1300), (1, 1), (64, 200), (7, 9), (40, 20), (3, 0)]


def applies(case, q_descale=None, **features) -> bool:
    """``hopper_prefill_applies`` on ``case`` after the public call's checks and normalisation, with ``features``
    (``causal``, ``window_size``, ``softcap``, ``alibi_slopes``, ``s_aux``, ``q_descale_per_token``)."""
    out_dtype = torch.bfloat16 if case.q.element_size() == 1 else case.q.dtype  # an fp8 query's output is bf16
    out = torch.empty(case.q.shape, dtype=out_dtype, device=case.q.device)
    f = check_attention_call(
        case.q, case.k, case.v, case.num_seqs, cu_seqlens_q=case.cu_seqlens_q, max_seqlen_q=case.max_seqlen_q,
        max_seqlen_k=case.max_seqlen_k, cu_seqlens_k=case.kwargs.get("cu_seqlens_k"), softmax_scale=None,
        causal=features.get("causal", False), window_size=features.get("window_size"),
        softcap=features.get("softcap", 0.0), alibi_slopes=features.get("alibi_slopes"), s_aux=features.get("s_aux"),
        k_descale=case.kwargs.get("k_descale"), v_descale=case.kwargs.get("v_descale"), output_scale=None,
        kv_descale_per_token=None, out=out, block_table=case.kwargs.get("block_table"),
        seqused_k=case.kwargs.get("seqused_k"), q_descale=q_descale,
        q_descale_per_token=features.get("q_descale_per_token"),
    )  # fmt: skip
    return hopper_op.hopper_prefill_applies(
        case.q, case.k, case.v, out, None, block_table=case.kwargs.get("block_table"), window_left=f.window_left,
        window_right=f.window_right, softcap=f.softcap, alibi_slopes=f.alibi_slopes, s_aux=f.s_aux,
        k_descale=f.k_descale, output_scale=None, q_descale=f.q_descale,
    )  # fmt: skip


def fp8_query(case) -> torch.Tensor:
    """Replace ``case.q`` by an e4m3 query (times 4 first, so scores spread) with one descale per (sequence, KV head),
    ``amax / 448``, quantised by :func:`kvflash.attn_common.saturate_to_fp8`; returns the descales ``[num_seqs, Hkv]``
    float32."""
    num_kv_heads = case.k.shape[-2]
    starts = case.cu_seqlens_q.tolist()
    q = case.q.float().mul(4.0).unflatten(1, (num_kv_heads, -1))  # [total_q, Hkv, group, D]
    q_descale = torch.ones(case.num_seqs, num_kv_heads, device=q.device)
    for s in range(case.num_seqs):
        if starts[s + 1] > starts[s]:
            q_descale[s] = q[starts[s]:starts[s + 1]].abs().amax(dim=(0, 2, 3)).clamp_min(1e-6) / 448.0
    row_descale = q_descale.repeat_interleave(case.cu_seqlens_q.diff().long(), dim=0)  # [total_q, Hkv]
    case.q = saturate_to_fp8(q, row_descale[:, :, None, None], torch.float8_e4m3fn).flatten(1, 2)
    return q_descale


def test_which_calls_take_the_hopper_path(monkeypatch):
    monkeypatch.setenv("KVFLASH_GLUON", "1")
    monkeypatch.setattr(hopper_op, "hopper_gluon_available", lambda device: True)  # an sm_90 device, on any machine
    case = make_case(MIX[:3], num_q_heads=8, head_size=128, q_dtype=torch.bfloat16, device=DEVICE)
    assert applies(case, causal=True)
    assert not applies(case)  # not causal
    assert not applies(case, causal=True, window_size=(64, 0))
    assert not applies(case, causal=True, softcap=5.0)
    assert not applies(case, causal=True, s_aux=torch.zeros(8, device=DEVICE))
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        for head_size in (64, 128, 256):
            fp8_case = make_case(MIX[:3], num_q_heads=8, head_size=head_size, kv_dtype=fp8, device=DEVICE)
            assert applies(fp8_case, causal=True)
            q_descale = fp8_query(fp8_case)
            assert applies(fp8_case, q_descale=q_descale, causal=True)
            per_token = torch.ones(fp8_case.q.shape[:2], device=DEVICE)  # [total_q, Hq]: the portable kernel
            assert not applies(fp8_case, q_descale=per_token, causal=True, q_descale_per_token=True)
    for other in (
        dict(head_size=80), dict(block_size=1), dict(block_size=48), dict(block_size=None),
        dict(joint_layout=True), dict(kv_dtype=torch.float8_e4m3fn, joint_layout=True),
    ):  # fmt: skip
        kwargs = dict(num_q_heads=8, head_size=128, q_dtype=torch.bfloat16, device=DEVICE) | other
        assert not applies(make_case(MIX[:3], **kwargs), causal=True), other

