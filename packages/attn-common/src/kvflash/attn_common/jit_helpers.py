"""Shared ``@triton.jit`` helpers for the attention kernels and the cache writer (online softmax, masks,
softcap, ALiBi, LSE merge, FP8 rounding and saturation, division by a per-row scale). This module holds only jit
code (and the FP8 e4m3 constants it reads); Triton inlines these into the calling kernels.

Conventions
-----------
- Scores are kept in the *log2 domain* inside the kernels: ``s2 = (q . k) * softmax_scale * log2(e)``,
  so the softmax uses ``exp2``. LSE values leaving a kernel are natural logs.
- Row vectors are ``[BLOCK_M]``, key vectors ``[BLOCK_N]``, score tiles ``[BLOCK_M, BLOCK_N]``.
- An unbounded window edge is passed as :data:`kvflash.attn_common.feature_args.UNBOUNDED_WINDOW`
  (a large positive int), so the window test needs no branch.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as triton_cuda

# float8_e4m3fn, the format of fp8 attention outputs and of quantised probabilities: its largest finite value,
# mantissa bits and smallest normal, from torch's own table (no kernel spells them out).
_E4M3 = torch.finfo(torch.float8_e4m3fn)
E4M3_MAX = tl.constexpr(float(_E4M3.max))
E4M3_MANTISSA_BITS = tl.constexpr(3)
E4M3_MIN_NORMAL = tl.constexpr(float(_E4M3.smallest_normal))


@triton.jit
def softcap_scores(scores, softcap):
    """``softcap * tanh(scores / softcap)`` elementwise, stable for any magnitude (natural-scale scores)."""
    x = scores / softcap
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(x >= 0, t, -t)


@triton.jit
def alibi_bias(slopes, q_pos, k_pos):
    """ALiBi bias ``-slope * |p - j|``: ``slopes [BLOCK_M]`` fp32, ``q_pos [BLOCK_M]``, ``k_pos [BLOCK_N]``."""
    distance = tl.abs(q_pos[:, None] - k_pos[None, :]).to(tl.float32)
    return -slopes[:, None] * distance


@triton.jit
def key_visibility(q_pos, k_pos, kv_len, window_left, window_right):
    """``[BLOCK_M, BLOCK_N]`` bool: key ``j`` is in range and inside ``[p - left, p + right]``.

    ``q_pos [BLOCK_M]`` are bottom-right aligned positions ``kv_len - q_len + i``; causal masking is
    ``window_right == 0``. Unbounded edges are large ints, never -1.
    """
    k = k_pos[None, :]
    p = q_pos[:, None]
    return (k < kv_len) & (k >= p - window_left) & (k <= p + window_right)


@triton.jit
def online_softmax_step(m_i, l_i, scores_log2):
    """One step of the streaming softmax over a ``[BLOCK_M, BLOCK_N]`` tile of log2-domain scores.

    Masked entries are ``-inf``. Returns ``(m_new, l_new, p, alpha)``: the running max and denominator,
    the tile's unnormalised probabilities (fp32) and the factor to rescale the accumulator by. Rows that
    have seen no visible key keep ``m = -inf`` and produce ``p = 0``, ``alpha = 1`` (never NaN).
    """
    m_new = tl.maximum(m_i, tl.max(scores_log2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(scores_log2 - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, l_new, p, alpha


@triton.jit
def add_sink_to_denominator(m_i, l_i, sink_log2):
    """Add one extra logit (a sink, log2 domain) per row to the softmax denominator.

    Returns ``(m_new, l_new, alpha)``; the accumulator must be scaled by ``alpha``. The sink adds to the
    denominator only: it has no value row.
    """
    m_new = tl.maximum(m_i, sink_log2)
    alpha = tl.math.exp2(m_i - m_new)
    l_new = l_i * alpha + tl.math.exp2(sink_log2 - m_new)
    return m_new, l_new, alpha


@triton.jit
def finalize_softmax(acc, m_i, l_i):
    """Normalise the accumulator ``[BLOCK_M, D]`` and return ``(out, lse)``.

    ``lse`` is the natural log of the denominator; rows with an empty denominator give ``out = 0`` and
    ``lse = -inf``.
    """
    LN2: tl.constexpr = 0.6931471805599453
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def lse_merge_weights(lse, extra_lse, AXIS: tl.constexpr, USE_EXTRA: tl.constexpr):
    """The LSE merge of partial attentions over disjoint key sets: each part's weight, the denominator, the merged LSE.

    ``lse``: natural-log LSEs with the parts along ``AXIS`` (``[parts]`` with ``AXIS = 0``, ``[rows, parts]`` with
    ``AXIS = 1``), ``-inf`` for an empty part. ``extra_lse`` (``USE_EXTRA``): one more logit per row (a scalar or
    ``[rows]``) that counts in the denominator only, such as an attention sink.

    Returns ``(weights, m, denom, merged_lse)``: ``m`` the largest logit of the row, 0 when every one is ``-inf``
    (so ``m`` is finite and nothing below is NaN); ``weights = exp(lse - m)``, 0 for an empty part (whose output the
    caller zeroes or skips: it may hold anything); ``denom`` the sum of the weights (and ``exp(extra_lse - m)``),
    1 where that is 0. The merged output is ``sum_i weights_i * out_i / denom`` (0 when every part is empty) and
    ``merged_lse = m + log(denom)``, ``-inf`` when every part is empty. A caller that walks the parts in chunks
    recomputes ``exp(lse_i - m)`` per chunk: the same weights.
    """
    m = tl.max(lse, AXIS)
    if USE_EXTRA:
        m = tl.maximum(m, extra_lse)
    m = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(lse - tl.expand_dims(m, AXIS))
    denom = tl.sum(weights, AXIS)
    if USE_EXTRA:
        denom += tl.exp(extra_lse - m)
    empty = denom == 0.0
    denom = tl.where(empty, 1.0, denom)
    merged_lse = tl.where(empty, float("-inf"), m + tl.log(denom))
    return weights, m, denom, merged_lse


@triton.jit
def merge_lse_pair(out_a, lse_a, out_b, lse_b):
    """Merge two partial attentions over disjoint key sets (:func:`lse_merge_weights` with two parts).

    ``out_* [BLOCK_M, D]`` fp32 (each normalised by its own denominator, zeroed by the caller where its part is
    empty), ``lse_* [BLOCK_M]`` natural log, ``-inf`` for an empty part. Returns ``(out, lse)``; both parts empty
    gives ``out = 0``, ``lse = -inf``.
    """
    weights, _, denom, lse = lse_merge_weights(tl.join(lse_a, lse_b), 0.0, 1, False)
    w_a, w_b = tl.split(weights)
    out = (out_a * w_a[:, None] + out_b * w_b[:, None]) / denom[:, None]
    return out, lse


@triton.jit
def online_softmax_step_scaled(m_i, l_i, scores, scale_log2):
    """:func:`online_softmax_step` on *unscaled* scores, with the scale applied inside ``exp2``.

    ``scores [BLOCK_M, BLOCK_N]`` are raw dot products, ``-inf`` where masked; ``scale_log2 [BLOCK_M]``
    is a strictly positive per-row factor to the log2 domain (softmax scale times log2(e); pass 1.0 for
    scores already in the log2 domain). The factor goes into the ``exp2`` argument as one FMA per element
    instead of a multiply and a subtract; the row max is scaled after the reduction, which is exact for a
    positive factor. Rows that have seen no visible key keep ``m = -inf`` and get ``p = 0``, ``alpha = 1``.
    Returns ``(m_new, l_new, p, alpha)`` like :func:`online_softmax_step`.
    """
    m_new = tl.maximum(m_i, tl.max(scores, 1) * scale_log2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(scores * scale_log2[:, None] - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, l_new, p, alpha


@triton.jit
def round_to_fp8_grid(x, FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_NORMAL: tl.constexpr):
    """Round fp32 ``x`` (finite, inside the FP8 range) to the nearest FP8 value, ties to even; result in fp32.

    Only for the Triton interpreter, whose fp32 -> fp8 cast drops the carry of its rounding (31.6 becomes
    16 in e4m3) and flushes subnormals: casting a value already on the FP8 grid is exact there. GPUs round in
    the cast itself.
    """
    # Powers written as 2 ** n (not 1 << n): the format's constants may arrive as tl.constexpr objects, which
    # the interpreter cannot shift an int by.
    DROP: tl.constexpr = 23 - FP8_MANTISSA_BITS
    HALF_MINUS_ONE: tl.constexpr = 2 ** (DROP - 1) - 1
    KEEP: tl.constexpr = 0xFFFFFFFF - (2**DROP - 1)
    bits = x.to(tl.uint32, bitcast=True)
    # Normal range: round the fp32 mantissa to FP8_MANTISSA_BITS bits; a carry moves into the exponent.
    normal = (bits + HALF_MINUS_ONE + ((bits >> DROP) & 1)) & KEEP
    # Subnormal range: adding C makes the fp32 ulp equal the FP8 subnormal spacing, so the add rounds;
    # the sign bit is put back as a bit so that -0.0 stays -0.0.
    C: tl.constexpr = FP8_MIN_NORMAL * 2**DROP
    magnitude = (tl.abs(x) + C) - C
    subnormal = magnitude.to(tl.uint32, bitcast=True) | (bits & 0x80000000)
    rounded = tl.where(tl.abs(x) < FP8_MIN_NORMAL, subnormal, normal)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def saturate_to_fp8_range(
    x, FP8_MAX: tl.constexpr, FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_NORMAL: tl.constexpr,
    ROUND_IN_SOFTWARE: tl.constexpr,
):  # fmt: skip
    """fp32 ``x`` clamped to ``[-FP8_MAX, FP8_MAX]``, ready for the cast to that FP8 format (a plain cast turns
    values beyond the range into NaN for e4m3 and inf for e5m2). ``ROUND_IN_SOFTWARE``: under the interpreter,
    also round to the format's grid (see :func:`round_to_fp8_grid`). Result in fp32."""
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    if ROUND_IN_SOFTWARE:
        x = round_to_fp8_grid(x, FP8_MANTISSA_BITS, FP8_MIN_NORMAL)
    return x


@triton.jit
def div_rn_by_row_scale(x, scale, ANY_SCALE: tl.constexpr):
    """``tl.math.div_rn(x, scale)`` (IEEE division, ties to even, signed zeros kept) for fp32 ``x`` and a ``scale``
    that is constant along the last axis (a scalar or ``[rows, 1]``), with one division per row.

    Per element: two multiplies, a clamp and two FMAs (one multiply fewer without ``ANY_SCALE``), where ``div_rn``
    takes a reciprocal, five FMAs and a range check with a slow-path branch. With ``r = RN(1 / s)``,
    ``q = RN(x * r)`` is within 1.5 ulp of ``x / s``, one FMA gives the residual ``q * s - x`` (exact, or rounded
    once), and ``RN(q - residual * r)`` is ``RN(x / s)``: Markstein's correction.
    tests/attn_common/test_div_rn_by_row_scale.py derives the error bound and enumerates the quotients close enough
    to a rounding midpoint for it to leave doubt. The residual's sign is flipped (``q * s - x``, times ``-r``) so
    that an exact zero residual adds ``-0``, which keeps a zero ``q``'s sign (``x = -0`` gives ``-0``); ``x * -1.0``
    negates exactly and folds into the operands on the GPU (``-x`` would not: Triton 3.6 lowers it as ``0 - x``,
    ``+0`` for ``x = +0``).

    Bit for bit equal to ``div_rn`` when ``2**-40 <= |x / s| < 2**126`` or ``x = +-0``: for any finite nonzero
    ``scale`` with ``ANY_SCALE`` (a signed power of two per row brings the scale into ``[2**-85, 2**64)``; ``x``
    is scaled with it, which also keeps the residual of a tiny ``x`` from underflowing), else for
    ``2**-62 <= scale < 2**126``. Other quotients keep ``x``'s sign: below ``2**-40`` they stay below ``2**-39``,
    and from ``2**126`` up they are at least ``2**125`` (``q`` is clamped there, so an overflowing quotient gives
    ``inf``, not ``inf - inf``): once clamped to an FP8 range both round to the same FP8 value as the IEEE
    quotient. Zero and infinite scales (without ``ANY_SCALE``: ``+0`` and ``+inf``) give IEEE's quotients too:
    ``+-inf``, ``+-0``, NaN for ``0 / 0`` and ``inf / inf``.

    Needs a fused ``tl.fma``: Triton 3.6's interpreter computes it as ``x * y + z``, rounding twice.
    """
    if ANY_SCALE:
        magnitude = tl.abs(scale)
        # Powers of two: scaling x and the scale by one is exact, but where x overflows to inf or drops bits below
        # 2**-62, and then the quotient is beyond 2**126 or below 2**-126 anyway.
        # The scale's sign moves to x as well: the signs of zeros below need a positive scale.
        p = tl.where(magnitude < 2.0**-62, 2.0**64, tl.where(magnitude >= 2.0**64, 2.0**-64, 1.0))
        p = tl.where(scale < 0, -p, p)
        scale = scale * p
        neg_x = x * (p * -1.0)
    else:
        neg_x = x * -1.0
    neg_r = tl.math.div_rn(-1.0, scale)
    # An infinite scale: -r = -0 already gives the IEEE quotient +-0, and a finite stand-in in the residual keeps
    # it from 0 * inf = NaN.
    scale = tl.clamp(scale, -3.4028234663852886e38, 3.4028234663852886e38)
    q = tl.clamp(neg_x * neg_r, -(2.0**126), 2.0**126)
    residual = tl.fma(q, scale, neg_x)
    return tl.fma(residual, neg_r, q)


@triton.jit
def cast_to_e4m3(x, ROUND_IN_SOFTWARE: tl.constexpr):
    """fp32 ``x``, already inside ``[-448, 448]``, cast to ``float8_e4m3fn`` (round to nearest even; under the
    interpreter, ``ROUND_IN_SOFTWARE``, rounded to the grid first: see :func:`round_to_fp8_grid`)."""
    if ROUND_IN_SOFTWARE:
        x = round_to_fp8_grid(x, E4M3_MANTISSA_BITS, E4M3_MIN_NORMAL)
    return x.to(tl.float8e4nv)


@triton.jit
def to_e4m3(x, ROUND_IN_SOFTWARE: tl.constexpr):
    """fp32 ``x`` saturated to ``[-448, 448]`` and cast to ``float8_e4m3fn``: finite input never gives NaN."""
    return saturate_to_fp8_range(x, E4M3_MAX, E4M3_MANTISSA_BITS, E4M3_MIN_NORMAL, ROUND_IN_SOFTWARE).to(tl.float8e4nv)


@triton.jit
def column_scale_exponent(v_col_scale):
    """``floor(log2(max_j |vscale_j|))`` over a tile's keys ``j``, the first axis of ``v_col_scale`` (fp32, 0 for
    masked keys): ``[BLOCK_N]`` gives one exponent, a ``[BLOCK_N, KV_HEADS]`` tile one per KV head. Read from the
    float's exponent bits (exact, and two integer instructions instead of a log2). An all-zero (all-masked) tile gives
    -127, and a subnormal maximum at most -127, which :func:`raise_scale_exponent`'s clamp to -100 turns into no
    change."""
    v_max = tl.max(tl.abs(v_col_scale), 0)
    return ((v_max.to(tl.int32, bitcast=True) >> 23) - 127).to(tl.float32)


@triton.jit
def raise_scale_exponent(v_exp, tile_exp):
    """The running exponent ``E`` after a tile whose :func:`column_scale_exponent` is ``tile_exp``: the larger of the
    two, clamped to ``[-100, 100]`` (any shapes that broadcast)."""
    return tl.minimum(tl.maximum(tl.maximum(v_exp, tile_exp), -100.0), 100.0)


@triton.jit
def scale_p_columns(p, alpha, v_col_scale, v_exp):
    """Per-token V descales folded into the probabilities before the PV dot.

    ``p [BLOCK_M, BLOCK_N]`` fp32 (``<= 1``), ``alpha [BLOCK_M]`` the accumulator's rescale factor from the
    softmax step, ``v_col_scale [BLOCK_N]`` fp32 the tile's V descale per key (0 for masked keys), ``v_exp`` the
    running exponent ``E`` (fp32 scalar): the accumulator holds ``sum_j p_j * vscale_j * v_j / 2^E``. ``E`` becomes
    ``max(E, floor(log2(max_j |vscale_j|)))`` (clamped to ``[-100, 100]``), so ``p_j * vscale_j / 2^E`` stays
    below 2 and, for the tile's largest scales, above fp16's subnormals; the powers of two are exact. Returns
    ``(p * vscale / 2^E, alpha * 2^(E_old - E_new), E_new)``; multiply the final output by ``2^E``.
    """
    new_exp = raise_scale_exponent(v_exp, column_scale_exponent(v_col_scale))
    alpha = alpha * tl.math.exp2(v_exp - new_exp)
    p = p * (v_col_scale * tl.math.exp2(-new_exp))[None, :]
    return p, alpha, new_exp


@triton.jit
def wait_for_prior_grid(ENABLED: tl.constexpr):
    """``ENABLED`` (a kernel launched with programmatic dependent launch, sm_90+): block until the kernel launched
    before this one in the stream has finished and its memory writes are visible. Call it before the first read of
    anything that kernel wrote (``griddepcontrol.wait``)."""
    if ENABLED:
        triton_cuda.gdc_wait()


@triton.jit
def allow_dependent_launch(ENABLED: tl.constexpr):
    """``ENABLED``: let the kernel launched next with programmatic dependent launch start once every program of
    this kernel has passed here (``griddepcontrol.launch_dependents``); it still waits for this kernel's results
    in :func:`wait_for_prior_grid`. Without it the next kernel starts only as this one's programs exit."""
    if ENABLED:
        triton_cuda.gdc_launch_dependents()
