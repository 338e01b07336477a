"""``@triton.jit`` kernel that writes new keys and values into the paged KV cache (optionally as FP8).

Work is split over *rows*: row ``r = token * Hkv + head`` is one ``[D]`` vector of keys and one of values.
A program handles ``BLOCK_ROWS`` consecutive rows, so no lanes are wasted on a head count that is not a
power of two, and both the input and the cache are touched in long contiguous runs (the heads of one
token are adjacent in both).

``PER_TOKEN_SCALES`` (per-token-head ``kv_cache_dtype`` strings): each row computes its own scale,
``max(amax(|x|) / FP8_MAX, SCALE_FLOOR)`` (IEEE division), stores ``saturate(x / scale)`` and writes the scale
into ``[num_blocks, block_size, Hkv]`` float32 at the row's slot and head.
"""

import triton
import triton.language as tl

from kvflash.attn_common.jit_helpers import div_rn_by_row_scale, saturate_to_fp8_range


@triton.jit
def _divide(x, scale, ANY_SCALE: tl.constexpr, ROUND_IN_SOFTWARE: tl.constexpr):
    """``x / scale`` rounded as IEEE division, so stored bytes equal :func:`kvflash.attn_common.saturate_to_fp8`'s.

    ``ROUND_IN_SOFTWARE`` is set exactly when the interpreter runs the kernel, whose ``tl.fma`` may round twice
    (Triton 3.6): there ``div_rn`` itself. On GPUs one division per row (``div_rn_by_row_scale``): ``div_rn`` per
    element was about a third of the writer's time.
    """
    if ROUND_IN_SOFTWARE:
        return tl.math.div_rn(x, scale)
    return div_rn_by_row_scale(x, scale, ANY_SCALE)


@triton.jit
def _write_rows(
    src_ptr,  # [num_tokens, Hkv, D] key or value
    cache_ptr,  # [num_blocks, block_size, Hkv, D] cache (fp8 or the input's dtype)
    scale_ptr,  # [1] or [Hkv] float (USE_SCALE_TENSOR); PER_TOKEN_SCALES: [num_blocks, block_size, Hkv] fp32, written
    scale_value,  # float32 scalar scale (used when not USE_SCALE_TENSOR)
    stride_scale_head,  # 0 (per tensor) or the [Hkv] tensor's stride; PER_TOKEN_SCALES: the head stride
    stride_scale_block,  # PER_TOKEN_SCALES only
    stride_scale_token,  # PER_TOKEN_SCALES only
    token,  # [BLOCK_ROWS] int64
    head,  # [BLOCK_ROWS] int64
    block,  # [BLOCK_ROWS] int64 cache block of each row
    offset,  # [BLOCK_ROWS] int64 position inside the block
    valid,  # [BLOCK_ROWS] bool: row exists and its slot is inside the cache
    dims,  # [HEAD_PAD] int32
    stride_src_token,
    stride_src_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    HEAD_SIZE: tl.constexpr,
    KV_FP8: tl.constexpr,
    USE_SCALE_TENSOR: tl.constexpr,
    FP8_MAX: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr,
    FP8_MIN_NORMAL: tl.constexpr,
    ROUND_IN_SOFTWARE: tl.constexpr,
    PER_TOKEN_SCALES: tl.constexpr,
    SCALE_FLOOR: tl.constexpr,
):
    mask = valid[:, None] & (dims[None, :] < HEAD_SIZE)
    src_rows = token * stride_src_token + head * stride_src_head
    x = tl.load(src_ptr + src_rows[:, None] + dims[None, :], mask=mask, other=0.0)
    if PER_TOKEN_SCALES:
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), 1)  # [BLOCK_ROWS]: masked lanes are 0
        scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), SCALE_FLOOR)
        scale_offs = block * stride_scale_block + offset * stride_scale_token + head * stride_scale_head
        tl.store(scale_ptr + scale_offs, scale, mask=valid)
        # The scale lies in [SCALE_FLOOR, float32 max / FP8_MAX], inside the helper's range without ANY_SCALE (or is
        # +inf when the row holds one: then +-0 and NaN, as IEEE division gives).
        x = _divide(x, scale[:, None], False, ROUND_IN_SOFTWARE)
        x = saturate_to_fp8_range(x, FP8_MAX, FP8_MANTISSA_BITS, FP8_MIN_NORMAL, ROUND_IN_SOFTWARE)
    elif KV_FP8:
        if USE_SCALE_TENSOR:
            scale = tl.load(scale_ptr + head * stride_scale_head, mask=valid, other=1.0).to(tl.float32)[:, None]
        else:
            scale = scale_value
        # The caller's scale: any value (tensor values are never checked), hence ANY_SCALE.
        x = _divide(x.to(tl.float32), scale, True, ROUND_IN_SOFTWARE)
        x = saturate_to_fp8_range(x, FP8_MAX, FP8_MANTISSA_BITS, FP8_MIN_NORMAL, ROUND_IN_SOFTWARE)
    cache_rows = block * stride_cache_block + offset * stride_cache_token + head * stride_cache_head
    tl.store(cache_ptr + cache_rows[:, None] + dims[None, :], x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, Hkv, D] fp16/bf16/fp32, stride(-1) == 1
    value_ptr,  # [num_tokens, Hkv, D] key's dtype
    key_cache_ptr,  # [num_blocks, block_size, Hkv, D] fp8 or key's dtype, stride(-1) == 1
    value_cache_ptr,  # [num_blocks, block_size, Hkv, D] key_cache's dtype
    slot_mapping_ptr,  # [num_tokens] int64: block * block_size + offset; < 0 = padding
    k_scale_ptr,  # [1] or [Hkv] float (USE_SCALE_TENSOR only); PER_TOKEN_SCALES: [num_blocks, block_size, Hkv] fp32
    v_scale_ptr,  # [1] or [Hkv] float (USE_SCALE_TENSOR only); PER_TOKEN_SCALES: [num_blocks, block_size, Hkv] fp32
    k_scale_value,  # float32 scalar (not USE_SCALE_TENSOR)
    v_scale_value,  # float32 scalar (not USE_SCALE_TENSOR)
    stride_k_scale_head,  # 0 (one element) or the [Hkv] tensor's stride; PER_TOKEN_SCALES: the head stride
    stride_v_scale_head,
    stride_k_scale_block,  # PER_TOKEN_SCALES only
    stride_k_scale_token,
    stride_v_scale_block,
    stride_v_scale_token,
    num_rows,  # num_tokens * Hkv
    num_kv_heads,
    num_slots,  # num_blocks * block_size: slots at or beyond it are skipped, never written
    block_size,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_key_cache_block,
    stride_key_cache_token,
    stride_key_cache_head,
    stride_value_cache_block,
    stride_value_cache_token,
    stride_value_cache_head,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    KV_FP8: tl.constexpr,
    USE_SCALE_TENSOR: tl.constexpr,
    FP8_MAX: tl.constexpr,
    FP8_MANTISSA_BITS: tl.constexpr,
    FP8_MIN_NORMAL: tl.constexpr,
    ROUND_IN_SOFTWARE: tl.constexpr,
    PER_TOKEN_SCALES: tl.constexpr,  # per-token-head dynamic scales, computed and written here (KV_FP8)
    SCALE_FLOOR: tl.constexpr,  # PER_TOKEN_SCALES: the smallest scale (an all-zero row gets it)
):
    # num_tokens * Hkv fits in int32; everything that addresses memory below is int64.
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_range = rows < num_rows
    token = (rows // num_kv_heads).to(tl.int64)
    head = (rows % num_kv_heads).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token, mask=in_range, other=-1)
    # Out-of-range slots cannot be rejected on the host without a sync: they are skipped like padding.
    valid = in_range & (slot >= 0) & (slot < num_slots)
    block = slot // block_size
    offset = slot % block_size
    dims = tl.arange(0, HEAD_PAD)
    _write_rows(
        key_ptr,
        key_cache_ptr,
        k_scale_ptr,
        k_scale_value,
        stride_k_scale_head,
        stride_k_scale_block,
        stride_k_scale_token,
        token,
        head,
        block,
        offset,
        valid,
        dims,
        stride_key_token,
        stride_key_head,
        stride_key_cache_block,
        stride_key_cache_token,
        stride_key_cache_head,
        HEAD_SIZE,
        KV_FP8,
        USE_SCALE_TENSOR,
        FP8_MAX,
        FP8_MANTISSA_BITS,
        FP8_MIN_NORMAL,
        ROUND_IN_SOFTWARE,
        PER_TOKEN_SCALES,
        SCALE_FLOOR,
    )
    _write_rows(
        value_ptr,
        value_cache_ptr,
        v_scale_ptr,
        v_scale_value,
        stride_v_scale_head,
        stride_v_scale_block,
        stride_v_scale_token,
        token,
        head,
        block,
        offset,
        valid,
        dims,
        stride_value_token,
        stride_value_head,
        stride_value_cache_block,
        stride_value_cache_token,
        stride_value_cache_head,
        HEAD_SIZE,
        KV_FP8,
        USE_SCALE_TENSOR,
        FP8_MAX,
        FP8_MANTISSA_BITS,
        FP8_MIN_NORMAL,
        ROUND_IN_SOFTWARE,
        PER_TOKEN_SCALES,
        SCALE_FLOOR,
    )
