"""The split-KV decode kernel (jit only): the few query tokens of each sequence over a paged or contiguous KV cache.

One program handles one (sequence, block of ``KV_HEADS`` KV heads, split) and up to ``Q_TOKENS`` query tokens
of the sequence: the tokens' ``GROUP`` query heads of each KV head are stacked as the rows of one
``[BLOCK_H, HEAD_PAD]`` tile (row ``r``: token ``r // (KV_HEADS * H_ROWS)``, KV head ``r // H_ROWS % KV_HEADS``
of the block, query head ``r % H_ROWS`` of its group), so every K/V element the split covers is read from memory
once and feeds all of them through ``tl.dot``. ``KV_HEADS > 1`` fills rows that would be padding (``tl.dot``
needs 16; GQA 4 decode has 4): each KV head's tile is dotted with all rows and each row keeps its own head's
scores, and ``P V`` sums ``P_h V_h`` with ``P_h`` the rows of head ``h``. The softmax, the page walk and the
pipeline's bookkeeping of one tile then serve ``KV_HEADS`` heads (FP8 decode is instruction-bound). That serves decode
(one token), speculative-decode verification (a few draft tokens) and the decode rows of a mixed batch
alike. A sequence with more than ``Q_TOKENS`` queries is walked in chunks of ``Q_TOKENS`` tokens (each
chunk reads its keys again), unless ``DEFER_LONGER_SEQUENCES``: then the chunked-prefill kernel serves it and this
kernel leaves its rows alone (and, with ``MIN_QUERIES``, the rows of sequences with fewer queries, which another
launch of this kernel serves). The split's keys are walked in tiles of ``BLOCK_N`` tokens that may span
several pages: the block-table entries of the tile are gathered per token, one tile ahead of the K/V loads.

Query token ``t`` of ``q_len`` sits at ``p = kv_len - q_len + t`` (bottom-right aligned) and sees keys
``p - left <= j <= p + right``. A chunk reads the union of its tokens' ranges; with one token per chunk
that range is exactly the token's, so plain decode needs no per-row mask (``ROW_MASK`` is off); with several,
only the tiles at the edges of the range (and a split's last, partial tile) take it.

Every index value is clamped before it addresses memory (query ranges to ``[0, total_q]``, KV lengths to
what the block table or the contiguous cache holds, page ids to ``[0, num_blocks)``): bad index tensors
give wrong numbers at worst, never an out-of-bounds access (``KVFLASH_VALIDATE=1`` reports them).

FP8 caches are loaded as 1-byte tiles and converted to fp16 in registers, and both dots then run in fp16
whatever the query's dtype: every FP8 value is exact in fp16, the conversion is one instruction per two
elements, and 16-bit V tiles transpose for the dot with ``ldmatrix`` (converting to bf16 instead costs about
three times the instructions plus byte-wise shared-memory reads, and leaves FP8 decode instruction-bound;
on NVIDIA ``FP8_V_FENCE`` keeps Triton from folding V's conversion into a byte-wise transposed load). At a padded
head size of 128, ``V_HALVES`` takes the PV product as two dots over V's 64-column halves, whose fp16 rows reach
shared memory without bank conflicts (:func:`accumulate_pv`).
A bf16 query converts to fp16 exactly while ``|q| < 65504``. The K descale is folded into the score scale
and the V descale is applied to the output once, so dequantisation costs no per-element multiply.

``Q_FP8`` (an fp8 e4m3 query with its per-(sequence, KV head) ``q_descale``): decode reads K and V once per
query token, so fp8 tensor cores would save nothing here; the query converts to fp16 exactly, its descale joins
K's in the score scale, and the dots are the exact FP8-cache path's. ``Q_PER_TOKEN``: one descale per (token, query
head), a per-row factor of each chunk's scores.

``PER_TOKEN_SCALES`` (a separate specialisation; off, the kernel is what it was without it): one descale per
stored (token, KV head), read per tile beside K and V. K's multiplies its score column,
``s_j = (q . k_j) * kscale_j * softmax_scale``, folded into the per-column score factor; V's multiplies the
column of P before the PV dot, ``sum_j p_j * (v_j * vscale_j) = sum_j (p_j * vscale_j) * v_j``. So that the
fp16 operand ``p_j * vscale_j`` neither underflows nor loses bits, it is taken in units of ``2^E``, ``E`` the
running maximum over the tiles of ``floor(log2(max_j |vscale_j|))`` (a power of two: exact); the accumulator is
rescaled by ``2^(E_old - E_new) <= 1`` when ``E`` grows and multiplied by ``2^E`` once at the end. With
``KV_HEADS > 1`` a tile's scales of the program's heads are read as one ``[BLOCK_N, KV_HEADS]`` tile (one address per
token), split into one column per head in the layout of the score tile's columns and selected into each head's rows,
``[BLOCK_H, BLOCK_N]``; ``E`` is then kept per row, so heads whose scales lie far apart each keep their fp16 range.
With a scalar score scale (no fp8 query, softcap or ALiBi) the scores are the dots times the K scales and the score
scale goes into the softmax's exp2 argument.
"""

import triton
import triton.language as tl

from kvflash.attn_common.jit_helpers import (
    add_sink_to_denominator,
    alibi_bias,
    allow_dependent_launch,
    column_scale_exponent,
    finalize_softmax,
    online_softmax_step,
    online_softmax_step_scaled,
    raise_scale_exponent,
    scale_p_columns,
    softcap_scores,
    to_e4m3,
)


@triton.jit
def load_kv_tile(head_ptr, token_offsets, offs_d, mask, KV_FP8: tl.constexpr, FP8_V_FENCE: tl.constexpr,
                 DOT_FP32: tl.constexpr):  # fmt: skip
    """One KV head's ``[BLOCK_N, HEAD_PAD]`` K or V tile (``token_offsets [BLOCK_N]`` int64 element offsets of the
    tile's tokens from ``head_ptr``), in the dtype the dots take: FP8 converted to fp16 (exact), fp32 with
    ``DOT_FP32``. ``FP8_V_FENCE`` (V tiles on NVIDIA): an identity move with side effects after the conversion, so
    that Triton cannot hoist the conversion above it and re-lays V out as fp16 (ldmatrix.trans) instead of reading
    it from shared memory byte by byte."""
    tile = tl.load(head_ptr + token_offsets[:, None] + offs_d[None, :], mask=mask, other=0.0)
    if KV_FP8:
        tile = tile.to(tl.float16)
        if FP8_V_FENCE:
            tile = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tile], dtype=tl.float16, is_pure=False, pack=2)
    if DOT_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def head_columns(tile, KV_HEADS: tl.constexpr):
    """The ``KV_HEADS`` columns of a ``[BLOCK_N, KV_HEADS]`` tile as a tuple of ``[BLOCK_N]`` vectors. ``tl.split``
    separates a dimension held in each thread's registers, so every column keeps the tile's layout of the tokens: a
    tile read in the layout of the score tile's columns yields columns that scale score columns with no layout
    conversion."""
    tl.static_assert(KV_HEADS == 2 or KV_HEADS == 4, "head_columns: 2 or 4 KV heads")
    if KV_HEADS == 2:
        c0, c1 = tl.split(tile)
        cols = (c0, c1)
    else:
        even, odd = tl.split(tl.reshape(tile, [tile.shape[0], 2, 2]))  # [BLOCK_N, 2, 2]: (token, h // 2, h % 2)
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        cols = (c0, c1, c2, c3)
    return cols


@triton.jit
def accumulate_pv(acc, acc_hi, p, v_head_ptr, v_rows, valid, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
                  V_HALVES: tl.constexpr, KV_FP8: tl.constexpr, FP8_V_FENCE: tl.constexpr,
                  DOT_FP32: tl.constexpr):  # fmt: skip
    """``acc += p V`` for one KV head's V tile (``v_rows [BLOCK_N]`` int64 token offsets from ``v_head_ptr``,
    ``valid [BLOCK_N]``), ``p [BLOCK_H, BLOCK_N]`` fp32. ``V_HALVES``: V's columns in two halves, each its own dot, into
    ``acc [BLOCK_H, HEAD_PAD / 2]`` (the first half) and ``acc_hi`` (the second); otherwise ``acc [BLOCK_H,
    HEAD_PAD]`` and ``acc_hi`` is returned as it came. An FP8 V tile converted to fp16 reaches the dot's layout through
    shared memory: rows of 128 fp16 (256 bytes) are stored two wavefronts per quarter warp (a bank conflict: each
    thread's 16 values span two 16-byte chunks that the swizzle maps to the same banks as its neighbours'), rows of
    64 in one. H200, e4m3, 64 x 4096: shared-store wavefronts 11.0 M -> 6.3 M, the LSU pipe 71 % -> 62 % busy, 78.3 ->
    80.9 % of copy (GQA 1: 81.5 -> 86.0 %)."""
    COLS: tl.constexpr = HEAD_PAD // 2 if V_HALVES else HEAD_PAD
    for half in tl.static_range(2 if V_HALVES else 1):
        offs = half * COLS + tl.arange(0, COLS)
        if HEAD_PAD == HEAD_SIZE:
            mask = valid[:, None]
        else:
            mask = valid[:, None] & (offs < HEAD_SIZE)[None, :]
        v = load_kv_tile(v_head_ptr, v_rows, offs, mask, KV_FP8, FP8_V_FENCE, DOT_FP32)
        if half == 0:
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            acc_hi = tl.dot(p.to(v.dtype), v, acc_hi)
    return acc, acc_hi


@triton.jit
def paged_decode_kernel(
    q_ptr,  # [total_q, Hq, HEAD_SIZE] fp16/bf16 or fp8 e4m3 (Q_FP8) (total_q == num_seqs without USE_CU_SEQLENS_Q)
    k_ptr,  # [num_blocks, PAGE_SIZE, Hkv, HEAD_SIZE] (IS_PAGED) or [total_k, Hkv, HEAD_SIZE]; q dtype or fp8
    v_ptr,  # [num_blocks, PAGE_SIZE, Hkv, HEAD_SIZE] (IS_PAGED) or [total_k, Hkv, HEAD_SIZE]; k's dtype, own strides
    block_table_ptr,  # [num_seqs, max_blocks] int32 (IS_PAGED)
    seqused_k_ptr,  # [num_seqs] int32 (IS_PAGED or USE_SEQUSED)
    cu_seqlens_k_ptr,  # [num_seqs + 1] int32 (not IS_PAGED)
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32 (USE_CU_SEQLENS_Q)
    # [num_seqs, Hkv] fp32 (stride-0 views allowed); PER_TOKEN_SCALES: [num_blocks, PAGE_SIZE, Hkv] (IS_PAGED) or
    # [total_k, Hkv] fp32, indexed like the cache
    k_descale_ptr,
    v_descale_ptr,  # [num_seqs, Hkv] fp32, or per-token like k_descale_ptr (PER_TOKEN_SCALES)
    alibi_slopes_ptr,  # [num_seqs, Hq] fp32 (USE_ALIBI)
    sinks_ptr,  # [Hq] fp32 (USE_SINKS)
    output_scale_ptr,  # [1] fp32 (OUTPUT_FP8)
    q_descale_ptr,  # [num_seqs, Hkv] fp32, a view (strides may be 0) (Q_FP8); Q_PER_TOKEN: [total_q, Hq] fp32
    # [total_q, Hq, HEAD_SIZE] q dtype, fp32 or fp8 e4m3 (OUTPUT_FP8), or [num_splits, total_q, Hq, HEAD_SIZE] fp32
    # (IS_SPLIT)
    out_ptr,
    # [Hq, total_q] fp32, or [num_splits, Hq, total_q] fp32 (IS_SPLIT: a view of a [total_q, Hq, num_splits]
    # buffer, so the split-merge kernel reads a row's LSEs together); natural log
    lse_ptr,
    num_kv_heads,
    num_splits,
    total_q,  # q.shape[0]: query ranges are clamped to [0, total_q]
    kv_capacity,  # max_blocks * PAGE_SIZE (IS_PAGED) or total_k: KV lengths are clamped to it
    num_blocks,  # IS_PAGED: page ids are clamped to [0, num_blocks)
    stride_q_token,
    stride_q_head,
    stride_k_block,
    stride_k_token,
    stride_k_head,
    stride_v_block,
    stride_v_token,
    stride_v_head,
    stride_bt_seq,
    stride_kd_seq,  # PER_TOKEN_SCALES: the token (in-page) stride
    stride_kd_head,
    stride_vd_seq,  # PER_TOKEN_SCALES: the token (in-page) stride
    stride_vd_head,
    stride_kd_block,  # PER_TOKEN_SCALES and IS_PAGED only
    stride_vd_block,  # PER_TOKEN_SCALES and IS_PAGED only
    stride_alibi_seq,
    stride_alibi_head,
    stride_qd_seq,
    stride_qd_head,
    stride_o_split,
    stride_o_token,
    stride_o_head,
    stride_lse_split,
    stride_lse_token,
    stride_lse_head,
    softmax_scale,
    softcap,
    window_left,  # UNBOUNDED_WINDOW when unbounded
    window_right,  # UNBOUNDED_WINDOW when unbounded; 0 when causal
    GROUP: tl.constexpr,  # query heads per KV head
    KV_HEADS: tl.constexpr,  # KV heads per program (1 unless HEAD_CHUNKS == 1 and the rows have room)
    HEAD_CHUNKS: tl.constexpr,  # programs per KV head (cdiv(GROUP, BLOCK_H); 1 unless GROUP > 64)
    H_ROWS: tl.constexpr,  # query heads per token in a program's rows: GROUP, or BLOCK_H when HEAD_CHUNKS > 1
    Q_TOKENS: tl.constexpr,  # query tokens per chunk (1 when HEAD_CHUNKS > 1); Q_TOKENS * KV_HEADS * H_ROWS <= BLOCK_H
    BLOCK_H: tl.constexpr,  # rows per program (power of two >= 16, for tl.dot)
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of two >= HEAD_SIZE
    BLOCK_N: tl.constexpr,  # tokens per tile
    PAGE_SIZE: tl.constexpr,  # tokens per page (IS_PAGED)
    IS_PAGED: tl.constexpr,
    USE_SEQUSED: tl.constexpr,
    KV_FP8: tl.constexpr,
    IS_SPLIT: tl.constexpr,  # write fp32 partials for the split-merge kernel (sinks are added there)
    # (IS_SPLIT with DEFER_LONGER_SEQUENCES) partial rows by sequence, row seq * Q_TOKENS + token, so a mixed batch's
    # partial buffers hold its decode rows only (not its prefill chunks' tokens)
    PARTIAL_ROWS_BY_SEQUENCE: tl.constexpr,
    USE_CU_SEQLENS_Q: tl.constexpr,  # query ranges from cu_seqlens_q (else query s of sequence s, one each)
    DEFER_LONGER_SEQUENCES: tl.constexpr,  # sequences with more than Q_TOKENS queries are the prefill kernel's
    # (DEFER_LONGER_SEQUENCES) sequences with fewer queries are another decode launch's: a mixed batch over an FP8
    # cache runs its 1-query rows with the decode config (several KV heads per program) and its 2..Q_TOKENS-query
    # rows in a second launch (MIN_QUERIES 2); 0 serves every sequence up to Q_TOKENS
    MIN_QUERIES: tl.constexpr,
    ROW_MASK: tl.constexpr,  # mask keys per row (Q_TOKENS > 1: causal order within a chunk)
    DOT_FP32: tl.constexpr,  # dots in fp32: the Triton interpreter's bf16 tl.dot is wrong (docs/design.md, Tests)
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SINKS: tl.constexpr,
    FP8_V_FENCE: tl.constexpr,  # NVIDIA only: keep the fp8 -> fp16 conversion of V ahead of its relayout
    V_HALVES: tl.constexpr,  # PV as two dots over V's column halves (accumulate_pv: FP8 V at HEAD_PAD 128)
    # (not USE_CU_SEQLENS_Q) the one query per sequence as a runtime value, not the constant 1: the chunk loop then
    # stays a loop and ptxas schedules the tile loop differently (faster for some configs, slower for others)
    RUNTIME_QUERY_COUNT: tl.constexpr,
    OUTPUT_FP8: tl.constexpr,  # out = saturate(attention / output_scale) in fp8 e4m3 (never with IS_SPLIT)
    ROUND_IN_SOFTWARE: tl.constexpr,  # the interpreter: round to the fp8 grid before fp8 casts
    PER_TOKEN_SCALES: tl.constexpr,  # k/v descales per (stored token, KV head) (KV_FP8 only)
    Q_FP8: tl.constexpr,  # fp8 e4m3 q with q_descale (KV_FP8 only): converted to fp16, descale in the score scale
    Q_PER_TOKEN: tl.constexpr,  # (Q_FP8 only) q_descale per (token, query head): a per-row factor per chunk
    # IS_SPLIT with programmatic dependent launch: the merge launched next may start once every program is running
    # (it waits for the partials on the device)
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    tl.static_assert(Q_TOKENS * KV_HEADS * H_ROWS <= BLOCK_H, "the rows of a pass must fit BLOCK_H")
    tl.static_assert(HEAD_CHUNKS == 1 or KV_HEADS == 1, "a chunked group takes one KV head per program")
    # (the per-token scale tile is [BLOCK_N, KV_HEADS], split into its columns by head_columns)
    tl.static_assert(not PER_TOKEN_SCALES or KV_HEADS == 1 or KV_HEADS == 2 or KV_HEADS == 4,
                     "per-token descales: KV_HEADS 1, 2 or 4")  # fmt: skip
    # Per-token descales over head blocks, a scalar score scale, no softcap or ALiBi: the scores are the dots times the
    # K scales, and the score scale (times log2(e)) goes into the softmax's exp2 (online_softmax_step_scaled), as in the
    # chunked-prefill kernel.
    SCALE_IN_EXP2: tl.constexpr = PER_TOKEN_SCALES and KV_HEADS > 1 and not Q_FP8 and not (USE_SOFTCAP or USE_ALIBI)
    allow_dependent_launch(LAUNCH_DEPENDENTS)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    kv_head_blocks = tl.cdiv(num_kv_heads, KV_HEADS)
    chunk = pid % HEAD_CHUNKS
    kv_head = (pid // HEAD_CHUNKS) % kv_head_blocks * KV_HEADS  # the program's first KV head
    seq = pid // (HEAD_CHUNKS * kv_head_blocks)
    seq64 = seq.to(tl.int64)
    # The sequence's query rows [q_first, q_first + q_len), clamped to [0, total_q] (decreasing: empty).
    if USE_CU_SEQLENS_Q:
        q_first = tl.minimum(tl.maximum(tl.load(cu_seqlens_q_ptr + seq), 0), total_q)
        q_len = tl.minimum(tl.maximum(tl.load(cu_seqlens_q_ptr + seq + 1), q_first), total_q) - q_first
    else:
        q_first = seq
        if RUNTIME_QUERY_COUNT:  # one query (total_q == num_seqs), as a value the compiler cannot fold
            q_len = tl.minimum(total_q - seq, 1)
        else:
            q_len = 1
    if DEFER_LONGER_SEQUENCES:
        if (q_len > Q_TOKENS) | (q_len < MIN_QUERIES):
            return

    # Lengths are clamped to the addressable keys (index values are never checked on the host).
    if IS_PAGED:
        kv_len = tl.minimum(tl.maximum(tl.load(seqused_k_ptr + seq), 0), kv_capacity)
        kv_start = 0
    else:
        kv_start = tl.minimum(tl.maximum(tl.load(cu_seqlens_k_ptr + seq), 0), kv_capacity)
        kv_len = tl.minimum(tl.maximum(tl.load(cu_seqlens_k_ptr + seq + 1), kv_start), kv_capacity) - kv_start
        if USE_SEQUSED:
            kv_len = tl.maximum(tl.minimum(kv_len, tl.load(seqused_k_ptr + seq)), 0)

    rows = tl.arange(0, BLOCK_H)
    row_token = rows // (KV_HEADS * H_ROWS)  # [BLOCK_H] token of each row within a chunk
    row_kv = rows // H_ROWS % KV_HEADS  # [BLOCK_H] KV head of each row, counted from the program's first
    # [BLOCK_H] KV head of each row (clamped: a block past Hkv, never launched since KV_HEADS divides Hkv, would
    # re-read the last head for rows that head_mask drops)
    row_kv_head = tl.minimum(kv_head + row_kv, num_kv_heads - 1)
    group_head = chunk * H_ROWS + rows % H_ROWS  # [BLOCK_H] query head within the KV head's group
    q_heads = row_kv_head * GROUP + group_head
    head_mask = (row_token < Q_TOKENS) & (group_head < GROUP) & (kv_head + row_kv < num_kv_heads)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    offs_n = tl.arange(0, BLOCK_N)

    if Q_FP8 and not Q_PER_TOKEN:  # (q . k) * q_descale: a factor of the score scale like K's descale
        if KV_HEADS == 1:
            q_descale = tl.load(q_descale_ptr + seq * stride_qd_seq + kv_head * stride_qd_head)
        else:  # [BLOCK_H, 1]: each row's KV head's
            q_descale = tl.load(q_descale_ptr + seq * stride_qd_seq + row_kv_head * stride_qd_head, mask=head_mask)
            q_descale = q_descale[:, None]
        softmax_scale = softmax_scale * q_descale
    if PER_TOKEN_SCALES:  # per-token descales are read per tile (below)
        score_scale = softmax_scale
        v_descale = tl.full([], 1.0, dtype=tl.float32)
        if KV_HEADS == 1:  # the head's scales (head blocks index them per tile, below)
            kd_head_ptr = k_descale_ptr + kv_head.to(tl.int64) * stride_kd_head
            vd_head_ptr = v_descale_ptr + kv_head.to(tl.int64) * stride_vd_head
    elif KV_HEADS == 1:
        # K descale folds into the score scale: (q . k_stored) * k_descale = q . k_real.
        k_descale = tl.load(k_descale_ptr + seq * stride_kd_seq + kv_head * stride_kd_head)
        score_scale = softmax_scale * k_descale
        v_descale = tl.load(v_descale_ptr + seq * stride_vd_seq + kv_head * stride_vd_head)
    else:  # per row: [BLOCK_H, 1], each row's KV head's descales
        k_descale = tl.load(k_descale_ptr + seq * stride_kd_seq + row_kv_head * stride_kd_head, mask=head_mask)
        score_scale = softmax_scale * k_descale[:, None]
        v_descale = tl.load(v_descale_ptr + seq * stride_vd_seq + row_kv_head * stride_vd_head, mask=head_mask)
        v_descale = v_descale[:, None]
    if OUTPUT_FP8:  # the output scale's reciprocal, loaded once, folds into the V descale
        v_descale = v_descale * (1.0 / tl.load(output_scale_ptr))
    if USE_ALIBI:
        slopes = tl.load(alibi_slopes_ptr + seq * stride_alibi_seq + q_heads * stride_alibi_head, mask=head_mask)
    if USE_SINKS and not IS_SPLIT:
        sinks = tl.load(sinks_ptr + q_heads, mask=head_mask, other=0.0) * LOG2E

    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_v_head
    block_row_ptr = block_table_ptr + seq64 * stride_bt_seq

    for t0 in range(0, q_len, Q_TOKENS):
        token = t0 + row_token
        row_mask = head_mask & (token < q_len)
        q_rows = (q_first + token).to(tl.int64)  # [BLOCK_H] query rows of q, out and lse
        q_pos = kv_len - q_len + token  # [BLOCK_H] bottom-right aligned positions
        # Key range of the chunk (the union of its tokens' windows), then of this split: splits divide it
        # evenly, in whole tiles.
        pos_first = kv_len - q_len + t0
        pos_last = kv_len - q_len + tl.minimum(t0 + Q_TOKENS, q_len) - 1
        first_key = tl.maximum(pos_first - window_left, 0)
        key_end = tl.minimum(kv_len, tl.maximum(pos_last + 1 + window_right, 0))
        num_keys = tl.maximum(key_end - first_key, 0)
        keys_per_split = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
        split_start = first_key + split * keys_per_split
        split_end = tl.minimum(split_start + keys_per_split, key_end)

        q_offs = q_rows[:, None] * stride_q_token + q_heads[:, None] * stride_q_head + offs_d[None, :]
        chunk_scale = score_scale
        if Q_PER_TOKEN:  # [BLOCK_H, 1]: each row's (token, query head) descale joins the score scale
            qd_offs = q_rows * stride_qd_seq + q_heads * stride_qd_head
            row_qd = tl.load(q_descale_ptr + qd_offs, mask=row_mask, other=0.0)
            chunk_scale = score_scale * row_qd[:, None]
        q = tl.load(q_ptr + q_offs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if KV_FP8:
            q = q.to(tl.float16)
        if DOT_FP32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        if SCALE_IN_EXP2:  # [BLOCK_H]: the factor of the softmax's exp2 argument
            exp2_scale = tl.full([BLOCK_H], score_scale * LOG2E, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        # [BLOCK_H, HEAD_PAD], or with V_HALVES its first column half and acc_hi the second (joined after the loop)
        acc = tl.zeros([BLOCK_H, HEAD_PAD // 2 if V_HALVES else HEAD_PAD], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_H, HEAD_PAD // 2], dtype=tl.float32) if V_HALVES else 0.0
        if PER_TOKEN_SCALES:  # E: acc holds sum_j p_j * vscale_j * v_j / 2^E; one per row ([BLOCK_H]) with KV_HEADS > 1
            v_exp = tl.full([] if KV_HEADS == 1 else [BLOCK_H], -100.0, dtype=tl.float32)
        if IS_PAGED:
            # Page ids run one tile ahead of K/V, carried through the loop: when a tile's K/V addresses come
            # from a load in the same iteration, Triton's pipeliner treats K/V as indirect loads and waits for
            # every outstanding copy at the top of each iteration (cp.async.wait_group 0), so no K/V copy
            # overlaps the dots. With the page ids carried, num_stages = s keeps s - 2 tiles in flight.
            first_pos = split_start + offs_n
            next_page = tl.load(block_row_ptr + first_pos // PAGE_SIZE, mask=first_pos < split_end, other=0)
        for tile_start in range(split_start, split_end, BLOCK_N):
            pos = tile_start + offs_n
            valid = pos < split_end
            if IS_PAGED:
                # A bad page id never leaves the cache.
                page = tl.minimum(tl.maximum(next_page, 0), num_blocks - 1).to(tl.int64)
                ahead = pos + BLOCK_N
                next_page = tl.load(block_row_ptr + ahead // PAGE_SIZE, mask=ahead < split_end, other=0)
                in_page = (pos % PAGE_SIZE).to(tl.int64)
                k_rows = page * stride_k_block + in_page * stride_k_token
                v_rows = page * stride_v_block + in_page * stride_v_token
            else:
                key_token = (kv_start + pos).to(tl.int64)
                k_rows = key_token * stride_k_token
                v_rows = key_token * stride_v_token
            tile_scale = chunk_scale
            if PER_TOKEN_SCALES:  # [BLOCK_N] int64 offsets of the tile's scales from a KV head's first
                if IS_PAGED:
                    kd_rows = page * stride_kd_block + in_page * stride_kd_seq
                    vd_rows = page * stride_vd_block + in_page * stride_vd_seq
                else:
                    kd_rows = key_token * stride_kd_seq
                    vd_rows = key_token * stride_vd_seq
            if PER_TOKEN_SCALES and KV_HEADS > 1:
                # [BLOCK_N, KV_HEADS] fp32, the program's heads' scales of each token (one address per token), taken
                # to [BLOCK_H, BLOCK_N] (row r's head's) by selects, below. sm_90 SASS of the tile loop (D 128, one
                # warp): 915 instructions per tile of 2 heads (8 KiB of K and V), 1370 per tile of 4 (16 KiB), against
                # 795 and 1213 with per-head descales (993 and 1457 when the tile was gathered to the rows).
                block_heads = tl.minimum(kv_head + tl.arange(0, KV_HEADS), num_kv_heads - 1).to(tl.int64)
                k_scales = tl.load(k_descale_ptr + kd_rows[:, None] + block_heads[None, :] * stride_kd_head,
                                   mask=valid[:, None], other=0.0)  # fmt: skip
                v_scales = tl.load(v_descale_ptr + vd_rows[:, None] + block_heads[None, :] * stride_vd_head,
                                   mask=valid[:, None], other=0.0)  # fmt: skip
                # [BLOCK_H]: floor(log2) of the largest V scale of each row's head in the tile
                row_v_exp = tl.gather(column_scale_exponent(v_scales), row_kv, 0)
                if not (Q_FP8 or SCALE_IN_EXP2):  # a scalar score scale joins the [BLOCK_N, KV_HEADS] tile
                    # (KV_HEADS products a token, not BLOCK_H)
                    k_scales = k_scales * score_scale
                # Each head's [BLOCK_N] column in the layout of the score tile's columns (head_columns), selected
                # into the rows of that head. A tl.gather of the tile to the rows came out in a blocked layout and
                # took two conversions to the MMA layout a tile (shared-memory stores, loads and barriers).
                k_cols = head_columns(k_scales, KV_HEADS)
                v_cols = head_columns(v_scales, KV_HEADS)
                tile_scale = tl.broadcast_to(k_cols[0][None, :], [BLOCK_H, BLOCK_N])
                v_tok_scale = tl.broadcast_to(v_cols[0][None, :], [BLOCK_H, BLOCK_N])
                for h in tl.static_range(1, KV_HEADS):
                    tile_scale = tl.where((row_kv == h)[:, None], k_cols[h][None, :], tile_scale)
                    v_tok_scale = tl.where((row_kv == h)[:, None], v_cols[h][None, :], v_tok_scale)
                if Q_FP8:  # chunk_scale [BLOCK_H, 1]: each row's query descale (and the softmax scale)
                    tile_scale = tile_scale * chunk_scale
            elif PER_TOKEN_SCALES:
                k_tok_scale = tl.load(kd_head_ptr + kd_rows, mask=valid, other=0.0)  # [BLOCK_N] fp32
                v_tok_scale = tl.load(vd_head_ptr + vd_rows, mask=valid, other=0.0)  # [BLOCK_N] fp32
                if Q_PER_TOKEN:  # [BLOCK_H, BLOCK_N]: rows and columns
                    tile_scale = k_tok_scale[None, :] * chunk_scale
                else:
                    tile_scale = (k_tok_scale * score_scale)[None, :]  # [1, BLOCK_N]: scales the score columns
            if HEAD_PAD == HEAD_SIZE:
                kv_mask = valid[:, None]
            else:
                kv_mask = valid[:, None] & d_mask[None, :]
            if KV_HEADS == 1:
                k = load_kv_tile(k_head_ptr, k_rows, offs_d, kv_mask, KV_FP8, False, DOT_FP32)
                qk = tl.dot(q, tl.trans(k))  # [BLOCK_H, BLOCK_N] fp32
            else:
                # Every row's query against every KV head of the program; each row keeps its own head's scores.
                qk = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
                for h in tl.static_range(KV_HEADS):
                    # A head past Hkv (never, as launched: KV_HEADS divides Hkv) re-reads the last; its rows are masked.
                    head_h = tl.minimum(kv_head + h, num_kv_heads - 1).to(tl.int64)
                    k = load_kv_tile(k_ptr + head_h * stride_k_head, k_rows, offs_d, kv_mask, KV_FP8, False, DOT_FP32)
                    qk = tl.where((row_kv == h)[:, None], tl.dot(q, tl.trans(k)), qk)
            if SCALE_IN_EXP2:  # the K scales only: the score scale joins the softmax's exp2 argument (one FMA)
                scores = qk * tile_scale
            elif USE_SOFTCAP or USE_ALIBI:
                scores = qk * tile_scale
                if USE_SOFTCAP:
                    scores = softcap_scores(scores, softcap)
                if USE_ALIBI:
                    scores += alibi_bias(slopes, q_pos, pos)
                scores = scores * LOG2E
            else:
                scores = qk * (tile_scale * LOG2E)
            if ROW_MASK:
                # Only the chunk's edge tiles need the per-row mask: keys in [pos_last - window_left,
                # pos_first + window_right] are visible to every token of the chunk, so a full tile inside that
                # range takes no mask at all (a q_len 8 draft at 32 rows: 145 fewer instructions per tile).
                if (tile_start + BLOCK_N > split_end) | (tile_start < pos_last - window_left) | (
                    tile_start + BLOCK_N - 1 > pos_first + window_right
                ):
                    key = pos[None, :]
                    visible = (key >= q_pos[:, None] - window_left) & (key <= q_pos[:, None] + window_right)
                    scores = tl.where(visible & valid[None, :], scores, float("-inf"))
            else:
                scores = tl.where(valid[None, :], scores, float("-inf"))
            if SCALE_IN_EXP2:
                m_i, l_i, p, alpha = online_softmax_step_scaled(m_i, l_i, scores, exp2_scale)
            else:
                m_i, l_i, p, alpha = online_softmax_step(m_i, l_i, scores)
            if PER_TOKEN_SCALES and KV_HEADS == 1:
                p, alpha, v_exp = scale_p_columns(p, alpha, v_tok_scale, v_exp)
            elif PER_TOKEN_SCALES:  # scale_p_columns with each row's own scales and E
                new_exp = raise_scale_exponent(v_exp, row_v_exp)
                alpha = alpha * tl.math.exp2(v_exp - new_exp)
                p = p * (v_tok_scale * tl.math.exp2(-new_exp)[:, None])
                v_exp = new_exp
            acc = acc * alpha[:, None]
            if V_HALVES:
                acc_hi = acc_hi * alpha[:, None]
            if KV_HEADS == 1:
                acc, acc_hi = accumulate_pv(acc, acc_hi, p, v_head_ptr, v_rows, valid, HEAD_SIZE, HEAD_PAD, V_HALVES,
                                            KV_FP8, FP8_V_FENCE, DOT_FP32)  # fmt: skip
            else:
                # sum_h P_h V_h with P_h the rows of KV head h (other rows zero): each row meets only its own V.
                for h in tl.static_range(KV_HEADS):
                    head_h = tl.minimum(kv_head + h, num_kv_heads - 1).to(tl.int64)
                    acc, acc_hi = accumulate_pv(
                        acc, acc_hi, tl.where((row_kv == h)[:, None], p, 0.0), v_ptr + head_h * stride_v_head, v_rows,
                        valid, HEAD_SIZE, HEAD_PAD, V_HALVES, KV_FP8, FP8_V_FENCE, DOT_FP32,
                    )  # fmt: skip

        if V_HALVES:  # [BLOCK_H, HEAD_PAD]: the halves side by side
            acc = tl.reshape(tl.permute(tl.join(acc, acc_hi), (0, 2, 1)), [BLOCK_H, HEAD_PAD])
        if USE_SINKS and not IS_SPLIT:
            m_i, l_i, alpha = add_sink_to_denominator(m_i, l_i, sinks)
            acc = acc * alpha[:, None]
        out, lse = finalize_softmax(acc, m_i, l_i)
        if PER_TOKEN_SCALES and KV_HEADS == 1:
            out = out * tl.math.exp2(v_exp)
        elif PER_TOKEN_SCALES:
            out = out * tl.math.exp2(v_exp)[:, None]
        # V descale applies once to the normalised output: sum_j p_j * (v_j * s) = s * sum_j p_j * v_j.
        out = out * v_descale
        if OUTPUT_FP8:
            out = to_e4m3(out, ROUND_IN_SOFTWARE)
        else:
            out = out.to(out_ptr.dtype.element_ty)

        out_rows = q_rows
        if PARTIAL_ROWS_BY_SEQUENCE:
            out_rows = seq64 * Q_TOKENS + token  # one pass (DEFER_LONGER_SEQUENCES): token < Q_TOKENS
        o_offs = split.to(tl.int64) * stride_o_split + out_rows[:, None] * stride_o_token
        o_offs += q_heads[:, None] * stride_o_head
        tl.store(
            out_ptr + o_offs + offs_d[None, :],
            out,
            mask=row_mask[:, None] & d_mask[None, :],
        )
        lse_offs = split.to(tl.int64) * stride_lse_split + out_rows * stride_lse_token + q_heads * stride_lse_head
        tl.store(lse_ptr + lse_offs, lse, mask=row_mask)
