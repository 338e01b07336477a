"""Context-parallel decode over gloo (2 and 3 processes, kernels under the Triton interpreter on CPU):
the merged result must equal single-process decode over the whole cache, with empty shards, FP8 shards
quantised with their own per-head scales (or per-token-head scales, written like the cache writer's), and sinks
counted once."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvflash.attn_common import reference_attention
from kvflash.attn_common.testing import encode_fp8, make_fp8_per_token_kv, make_paged_kv

from ..cases import assert_lse_close

HQ, HKV, D = 4, 2, 32
SEQ_LENS = [29, 5, 0, 18]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(SEQ_LENS), HQ, D, generator=g).half()
    ks = [torch.randn(n, HKV, D, generator=g) for n in SEQ_LENS]
    vs = [torch.randn(n, HKV, D, generator=g) for n in SEQ_LENS]
    sinks = torch.randn(HQ, generator=g)
    return q, ks, vs, sinks


def _shard_bounds(length: int, world: int, seq: int) -> list[tuple[int, int]]:
    """Contiguous shards; sequence 1 lives entirely on the last rank, so the others are empty for it."""
    if seq == 1:
        return [(0, 0)] * (world - 1) + [(0, length)]
    cuts = [0] + [length * (r + 1) // world for r in range(world)]
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def _worker(
    rank: int, world: int, port: int, kv_dtype_name: str, seed: int, per_token: bool = False, fp8_query: bool = False
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from kvflash.paged_decode import paged_decode_attention
        from kvflash.parallel import context_parallel_decode

        kv_dtype = getattr(torch, kv_dtype_name)
        fp8 = kv_dtype != torch.float16
        q, ks, vs, sinks = _global_problem(seed)
        query = {}  # an fp8 query: e4m3 with a per-KV-head descale, the same on every rank
        atol = 3e-3
        if fp8_query:
            from kvflash.fp8_utils import quantize_query

            q, q_descale = quantize_query(q, HKV, granularity="per_kv_head")
            query = dict(q_descale=q_descale)
            atol = 3e-3 + 2.0**-8 * 2  # the bf16 output an fp8 query gets: 2^-9 relative rounding of |out| < 2
        g = torch.Generator().manual_seed(seed + 100 + rank)
        # This rank's own per-head scales (distinct for K and V, and between ranks).
        k_scale = torch.rand(HKV, generator=g) * 0.3 + 0.1 if fp8 else torch.ones(HKV)
        v_scale = torch.rand(HKV, generator=g) * 2.0 + 1.5 if fp8 else torch.ones(HKV)
        shard_k, shard_v, real_k, real_v = [], [], [], []
        for s, n in enumerate(SEQ_LENS):
            lo, hi = _shard_bounds(n, world, s)[rank]
            stored_k = encode_fp8(ks[s][lo:hi], k_scale, kv_dtype) if fp8 else ks[s][lo:hi].half()
            stored_v = encode_fp8(vs[s][lo:hi], v_scale, kv_dtype) if fp8 else vs[s][lo:hi].half()
            shard_k.append(stored_k)
            shard_v.append(stored_v)
            real_k.append((stored_k.float() * k_scale[:, None]).half())
            real_v.append((stored_v.float() * v_scale[:, None]).half())
        cache = make_paged_kv(shard_k, shard_v, 4, generator=g)
        k_descale, v_descale = (k_scale, v_scale) if fp8 else (None, None)
        if per_token:  # this rank's shard quantised per (token, KV head), scales laid out like its pages
            shard = make_fp8_per_token_kv(
                [ks[s][slice(*_shard_bounds(n, world, s)[rank])] for s, n in enumerate(SEQ_LENS)],
                [vs[s][slice(*_shard_bounds(n, world, s)[rank])] for s, n in enumerate(SEQ_LENS)],
                kv_dtype, 4, generator=g,
            )  # fmt: skip
            cache.k_cache, cache.v_cache = shard.k, shard.v
            cache.block_table, cache.seqused_k = shard.kv_args["block_table"], shard.kv_args["seqused_k"]
            k_descale, v_descale = shard.k_descale, shard.v_descale
            real_k, real_v = [], []
            table = cache.block_table.long()
            for s, n in enumerate(SEQ_LENS):
                lo, hi = _shard_bounds(n, world, s)[rank]
                pos = torch.arange(hi - lo)
                blocks, offs = table[s, pos // 4], pos % 4
                for cache_t, scale_t, real in ((shard.k, shard.k_descale, real_k), (shard.v, shard.v_descale, real_v)):
                    real.append((cache_t[blocks, offs].float() * scale_t[blocks, offs][..., None]).half())
        out, lse = context_parallel_decode(
            q,
            cache.k_cache,
            cache.v_cache,
            cache.block_table,
            cache.seqused_k,
            max(x.shape[0] for x in shard_k),  # this rank's bound, as the API asks
            s_aux=sinks,
            softcap=4.0,
            k_descale=k_descale,
            v_descale=v_descale,
            return_lse=True,
            **query,
        )
        # Gather every rank's dequantised shard so rank 0 can build the whole cache in token order.
        shards = [None] * world
        dist.all_gather_object(shards, (real_k, real_v))
        if rank != 0:
            return
        whole_k = [torch.cat([shards[r][0][s] for r in range(world)]) for s in range(len(SEQ_LENS))]
        whole_v = [torch.cat([shards[r][1][s] for r in range(world)]) for s in range(len(SEQ_LENS))]
        whole = make_paged_kv(whole_k, whole_v, 8, generator=torch.Generator().manual_seed(seed))
        # The whole cache is the dequantised fp16 shards: the single-process run takes the dequantised query.
        q_single = (q.float() * q_descale.repeat_interleave(HQ // HKV)[:, None]).half() if fp8_query else q
        single, single_lse = paged_decode_attention(
            q_single,
            whole.k_cache,
            whole.v_cache,
            max(SEQ_LENS),
            block_table=whole.block_table,
            seqused_k=whole.seqused_k,
            s_aux=sinks,
            softcap=4.0,
            return_lse=True,
        )
        cu_q = torch.arange(len(SEQ_LENS) + 1, dtype=torch.int32)
        exact, exact_lse = reference_attention(
            q,
            whole.k_cache,
            whole.v_cache,
            cu_q,
            block_table=whole.block_table,
            seqused_k=whole.seqused_k,
            s_aux=sinks,
            softcap=4.0,
            compute_dtype=torch.float64,
            **query,
        )
        assert out.dtype == (torch.bfloat16 if fp8_query else q.dtype)
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=atol)
        assert_lse_close(lse, exact_lse, atol=1e-3)
        torch.testing.assert_close(out.float(), single.float(), rtol=0, atol=atol)
        torch.testing.assert_close(lse, single_lse, rtol=0, atol=1e-3)
        # Sequence 2 has no keys anywhere: out 0 and lse = sink (counted once, not world times).
        assert torch.all(out[2] == 0)
        torch.testing.assert_close(lse[:, 2], sinks)
    finally:
        dist.destroy_process_group()


# Each spawn costs ~25 s on the CPU (process start + interpreter), so two cases: both worlds, both FP8 formats.
@pytest.mark.parametrize("world, kv_dtype", [(2, "float8_e4m3fn"), (3, "float8_e5m2")])
def test_context_parallel_decode_matches_single_process(world, kv_dtype):
    mp.spawn(_worker, args=(world, _free_port(), kv_dtype, 17 + world), nprocs=world, join=True)


def test_context_parallel_decode_per_token_head_scales():
    """Each rank's shard with its own per-token-head scales ([num_blocks, block_size, Hkv], rank 3)."""
    mp.spawn(_worker, args=(2, _free_port(), "float8_e4m3fn", 31, True), nprocs=2, join=True)


def test_context_parallel_decode_fp8_query():
    """An fp8 e4m3 query with its q_descale over e5m2 shards: the same merged result as one process."""
    mp.spawn(_worker, args=(2, _free_port(), "float8_e5m2", 41, False, True), nprocs=2, join=True)


def test_position_dependent_features_are_rejected():
    from kvflash.parallel import context_parallel_decode

    q = torch.zeros(1, HQ, D).half()
    with pytest.raises(NotImplementedError, match="window_size"):
        context_parallel_decode(q, None, None, None, None, 1, window_size=(4, 0))
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        context_parallel_decode(q, None, None, None, None, 1, alibi_slopes=torch.ones(HQ))


def test_local_partials_stay_fp32_until_the_final_rounding(monkeypatch):
    """The shard's decode writes a float32 partial (one rounding, after the merge). One process stands in for
    a world of one: the gather copies, so the result must equal the float32 decode rounded once."""
    import kvflash.parallel.context_parallel as cp
    from kvflash.paged_decode import paged_decode_attention

    q, ks, vs, sinks = _global_problem(5)
    cache = make_paged_kv([k.half() for k in ks], [v.half() for v in vs], 4, generator=torch.Generator().manual_seed(5))
    kv = dict(block_table=cache.block_table, seqused_k=cache.seqused_k, s_aux=sinks)
    seen = []

    def local_decode(*args, **kwargs):
        seen.append(kwargs.get("out"))
        return paged_decode_attention(*args, **kwargs)

    monkeypatch.setattr(cp, "paged_decode_attention", local_decode)
    monkeypatch.setattr(cp.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(cp.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(cp, "_all_gather_flat", lambda output, tensor, group: output.copy_(tensor))
    out = cp.context_parallel_decode(q, cache.k_cache, cache.v_cache, max_seqlen_k=max(SEQ_LENS), **kv)
    assert seen[0] is not None and seen[0].dtype == torch.float32, "the local partial must be float32"
    fp32 = paged_decode_attention(
        q, cache.k_cache, cache.v_cache, max(SEQ_LENS), out=torch.empty(q.shape, dtype=torch.float32), **kv
    )
    assert out.dtype == q.dtype and torch.equal(out, fp32.to(q.dtype))
