"""The consumers' walk over one work item's key tiles in the Hopper prefill kernel (Gluon; jit only): the online
softmax step, ``S = Q K^T`` and ``O += P V`` as async wgmma, in the two forms of PV: 16-bit (``P_{j-1} V_{j-1}``
issued beside ``S_j``, P loop-carried: :func:`item_tiles_pv16`) and fp8 (``PV_FP8``, an fp8 query: P rounded to
e4m3 against V^T as the producer transposed it, a fresh accumulator per tile: :func:`item_tiles_pv_fp8`). Called
by :mod:`kvflash.chunk_prefill.hopper_consumer` per work item and warpgroup.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from kvflash.chunk_prefill.hopper_pv_fp8 import P_LOG2, p_to_e4m3


@gluon.jit
def _shifted(m, P_SHIFT: gl.constexpr):
    """``m - P_SHIFT`` (nothing emitted for 0)."""
    if P_SHIFT:
        m = m - P_SHIFT
    return m


@gluon.jit
def _softmax(s, m_i, l_i, qk, qk_scalar, q_pos, start_n, MASKED: gl.constexpr, ROW_SCALE: gl.constexpr,
             P_SHIFT: gl.constexpr = 0):
    """Online-softmax step in the log2 domain: returns (P in fp32, alpha, m, l). ``qk`` is the score scale: a scalar,
    or with ``ROW_SCALE`` one per query row (``[M]``, each ``qk_scalar`` over a positive power of two, so all of
    ``qk_scalar``'s sign).

    P stays fp32 (in S's registers) here and is packed to bf16 by :func:`_to_operand` after the previous PV wgmma
    has completed: the packed P is loop-carried and shares registers with the P that wgmma reads.

    ``P_SHIFT``: P comes out times ``2^P_SHIFT``, and so does ``l`` (the shift joins the row maximum subtracted in the
    exponent: no multiply per score; the two cancel in the epilogue's ``o / l``)."""
    if ROW_SCALE:  # qk: [M], one score scale per query row (a per-row query rewrite)
        scale = gl.expand_dims(qk, 1)
    else:
        scale = qk
    if MASKED:
        # Scale first, then hide: with K's descale negative or zero, a hidden -inf score would scale to +inf or NaN.
        cols = start_n + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        visible = gl.expand_dims(cols, 0) <= gl.expand_dims(q_pos, 1)
        t = gl.where(visible, s * scale, gl.full_like(s, float("-inf")))
        m_new = gl.maximum(m_i, gl.max(t, axis=1))
        # a row with nothing visible yet keeps m = -inf; subtract 0 instead (no inf - inf)
        m_use = gl.where(m_new == float("-inf"), gl.zeros_like(m_new), m_new)
        p = gl.exp2(t - gl.expand_dims(_shifted(m_use, P_SHIFT), 1))
    else:
        # Every score visible and finite: the largest scaled score of a row is its largest score times a
        # non-negative scale, or its smallest times a negative one (K's descale may be negative); one FFMA per score.
        if qk_scalar >= 0:
            row_top = gl.max(s, axis=1)
        else:
            row_top = gl.min(s, axis=1)
        m_new = gl.maximum(m_i, row_top * qk)
        m_use = m_new
        p = gl.exp2(s * scale - gl.expand_dims(_shifted(m_use, P_SHIFT), 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _to_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, ASM_CVT: gl.constexpr):
    if ASM_CVT:  # one cvt.rn.bf16x2 per pair in the order the wgmma operand wants (no PRMT fix-ups)
        p16 = gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [p], dtype=gl.bfloat16,
                                        is_pure=False, pack=2)
    else:
        p16 = p.to(dtype)
    return gl.convert_layout(p16, p_layout)


@gluon.jit
def _qk(q_mma, q_lo, k_tile, s_acc, Q_SPLIT: gl.constexpr):
    """Issue ``S = Q K^T`` (async wgmma, not waited for); with ``Q_SPLIT`` two fp8 dots, ``q_mma`` holding the query's
    high e4m3 terms and ``q_lo`` its low ones, into one accumulator."""
    s_acc = warpgroup_mma(q_mma, k_tile, s_acc, use_acc=False, is_async=True)
    if Q_SPLIT:
        s_acc = warpgroup_mma(q_lo, k_tile, s_acc, is_async=True)
    return s_acc


@gluon.jit
def _consumer_step(j, g, t, q_view, q_lo, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, s_acc, o, p, m_i,
                   l_i, qk_scale, qk_scalar, q_pos, p_layout: gl.constexpr, o_layout: gl.constexpr, WG: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, MASKED: gl.constexpr,
                   ASM_CVT: gl.constexpr, Q_SPLIT: gl.constexpr):
    """Key tile j of the item (ring slot of global tile g = it + j; turn wait number t)."""
    sk = g % STAGES
    phk = (g // STAGES) & 1
    sv = (g - 1) % STAGES
    phv = ((g - 1) // STAGES) & 1
    mbarrier.wait(k_ready.index(sk), phk)
    mbarrier.wait(v_ready.index(sv), phv)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), t & 1)
    s_acc = _qk(q_view, q_lo, k_smem.index(sk).permute((1, 0)), s_acc, Q_SPLIT)
    o = warpgroup_mma(p, v_smem.index(sv), o, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    s_acc = warpgroup_mma_wait(1, deps=(s_acc, ))  # the QK^T group(s): issued before the PV one
    mbarrier.arrive(k_empty.index(sk))
    p32, alpha, m_i, l_i = _softmax(s_acc, m_i, l_i, qk_scale, qk_scalar, q_pos, j * BLOCK_N, MASKED, Q_SPLIT)
    o = warpgroup_mma_wait(0, deps=(o, ))
    p = _to_operand(p32, p.dtype, p_layout, ASM_CVT)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
    o = o * gl.expand_dims(alpha_o, 1)
    mbarrier.arrive(v_empty.index(sv))
    return s_acc, o, p, m_i, l_i


@gluon.jit
def _consumer_step_pv_fp8(j, g, t, q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, s_acc, o, m_i, l_i,
                          qk_scale, qk_scalar, q_pos, p_layout: gl.constexpr, o_layout: gl.constexpr,
                          WG: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                          PINGPONG: gl.constexpr, MASKED: gl.constexpr, NEXT: gl.constexpr):
    """Key tile j with PV on fp8 operands (``PV_FP8``); ring slot of global tile g = it + j, turn wait number t.

    ``S_j`` was issued by the previous step (``s_acc``, in flight). Wait for it, run the softmax, pack ``P_j`` to
    e4m3, issue ``T = P_j V_j`` into a fresh accumulator (the fp8 dot's own sum covers one tile: two-level
    accumulation), wait for it, ``O = O * alpha_j + T`` in fp32 (one FFMA per element); then, with ``NEXT``, issue
    ``S_{j+1}``. P is packed and consumed in one step: a loop-carried e4m3 P is 64 i8 values to LLVM, which unpacks
    and repacks them around the back edge (about 180 instructions per tile). Issuing ``S_{j+1}`` beside ``T`` instead
    measured 591-604 TFLOP/s against 617 (H200, 4 x (2048 + 2048), page 16)."""
    s = g % STAGES
    ph = (g // STAGES) & 1
    s_acc = warpgroup_mma_wait(0, deps=(s_acc, ))
    mbarrier.arrive(k_empty.index(s))
    p32, alpha, m_i, l_i = _softmax(s_acc, m_i, l_i, qk_scale, qk_scalar, q_pos, j * BLOCK_N, MASKED, False, P_LOG2)
    p = p_to_e4m3(p32, p_layout, BLOCK_N)
    s1 = (g + 1) % STAGES
    mbarrier.wait(v_ready.index(s), ph)
    if NEXT:
        mbarrier.wait(k_ready.index(s1), ((g + 1) // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), t & 1)
    fresh = gl.zeros([p.shape[0], HEAD_D], gl.float32, o_layout)
    t_acc = warpgroup_mma(p, v_smem.index(s).permute((1, 0)), fresh, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    t_acc = warpgroup_mma_wait(0, deps=(t_acc, ))
    o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + t_acc
    mbarrier.arrive(v_empty.index(s))
    if NEXT:
        s_acc = warpgroup_mma(q_mma, k_smem.index(s1).permute((1, 0)), s_acc, use_acc=False, is_async=True)
    return s_acc, o, m_i, l_i


@gluon.jit
def item_tiles_pv_fp8(q_mma, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, it, tc, n_tiles, n_full,
                      qk_scale, qk_scalar, q_pos, s_acc, o, m_i, l_i, p_layout: gl.constexpr, o_layout: gl.constexpr,
                      WG: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                      PINGPONG: gl.constexpr):
    """The item's key tiles with ``PV_FP8``: ``S_0`` issued here, then one :func:`_consumer_step_pv_fp8` per tile
    (tile 0 masked, the unmasked ones, the diagonal / sequence-end ones, the last one without a next S). Turn waits:
    ``n_tiles + 1``, as the 16-bit loop's."""
    s0 = it % STAGES
    mbarrier.wait(k_ready.index(s0), (it // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), tc & 1)
    s_acc = warpgroup_mma(q_mma, k_smem.index(s0).permute((1, 0)), s_acc, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    if n_tiles > 1:
        s_acc, o, m_i, l_i = _consumer_step_pv_fp8(0, it, tc + 1, q_mma, k_smem, v_smem, k_ready, k_empty, v_ready,
                                                   v_empty, turn, s_acc, o, m_i, l_i, qk_scale, qk_scalar, q_pos,
                                                   p_layout, o_layout, WG, BLOCK_N, HEAD_D, STAGES, PINGPONG, True,
                                                   True)
        for j in range(1, gl.minimum(n_full, n_tiles - 1)):
            s_acc, o, m_i, l_i = _consumer_step_pv_fp8(j, it + j, tc + 1 + j, q_mma, k_smem, v_smem, k_ready, k_empty,
                                                       v_ready, v_empty, turn, s_acc, o, m_i, l_i, qk_scale, qk_scalar,
                                                       q_pos, p_layout, o_layout, WG, BLOCK_N, HEAD_D, STAGES,
                                                       PINGPONG, False, True)
        for j in range(gl.maximum(n_full, 1), n_tiles - 1):
            s_acc, o, m_i, l_i = _consumer_step_pv_fp8(j, it + j, tc + 1 + j, q_mma, k_smem, v_smem, k_ready, k_empty,
                                                       v_ready, v_empty, turn, s_acc, o, m_i, l_i, qk_scale, qk_scalar,
                                                       q_pos, p_layout, o_layout, WG, BLOCK_N, HEAD_D, STAGES,
                                                       PINGPONG, True, True)
    jl = n_tiles - 1  # masked: harmless when every key is visible
    s_acc, o, m_i, l_i = _consumer_step_pv_fp8(jl, it + jl, tc + 1 + jl, q_mma, k_smem, v_smem, k_ready, k_empty,
                                               v_ready, v_empty, turn, s_acc, o, m_i, l_i, qk_scale, qk_scalar, q_pos,
                                               p_layout, o_layout, WG, BLOCK_N, HEAD_D, STAGES, PINGPONG, True, False)
    return o, m_i, l_i


@gluon.jit
def item_tiles_pv16(q_mma, q_lo, k_smem, v_smem, q_empty_bar, k_ready, k_empty, v_ready, v_empty, turn, it, tc,
                    n_tiles, n_full, qk_scale, qk_scalar, q_pos, s_acc, o, m_i, l_i, p_layout: gl.constexpr,
                    o_layout: gl.constexpr, WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    PINGPONG: gl.constexpr, ASM_CVT: gl.constexpr, Q_SPLIT: gl.constexpr):
    """The item's key tiles with PV in 16 bits: ``S_j`` and ``P_{j-1} V_{j-1}`` issued together, P loop-carried."""
    # ---- tile 0 (peeled, masked) ----
    s0 = it % STAGES
    mbarrier.wait(k_ready.index(s0), (it // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), tc & 1)
    s_acc = _qk(q_mma, q_lo, k_smem.index(s0).permute((1, 0)), s_acc, Q_SPLIT)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    s_acc = warpgroup_mma_wait(0, deps=(s_acc, ))
    mbarrier.arrive(k_empty.index(s0))
    p32, alpha, m_i, l_i = _softmax(s_acc, m_i, l_i, qk_scale, qk_scalar, q_pos, 0, True, Q_SPLIT)
    p = _to_operand(p32, v_smem.dtype, p_layout, ASM_CVT)  # P meets V in V's dtype (fp16 over an FP8 cache)

    # ---- unmasked tiles, then the diagonal / sequence-end tiles ----
    for j in range(1, n_full):
        s_acc, o, p, m_i, l_i = _consumer_step(j, it + j, tc + j, q_mma, q_lo, k_smem, v_smem, k_ready, k_empty,
                                               v_ready, v_empty, turn, s_acc, o, p, m_i, l_i, qk_scale, qk_scalar,
                                               q_pos, p_layout, o_layout, WG, BLOCK_N, STAGES, PINGPONG, False,
                                               ASM_CVT, Q_SPLIT)
    for j in range(gl.maximum(n_full, 1), n_tiles):
        s_acc, o, p, m_i, l_i = _consumer_step(j, it + j, tc + j, q_mma, q_lo, k_smem, v_smem, k_ready, k_empty,
                                               v_ready, v_empty, turn, s_acc, o, p, m_i, l_i, qk_scale, qk_scalar,
                                               q_pos, p_layout, o_layout, WG, BLOCK_N, STAGES, PINGPONG, True,
                                               ASM_CVT, Q_SPLIT)
    mbarrier.arrive(q_empty_bar)  # every QK wgmma of the item is complete: Q may be overwritten

    # ---- PV of the last tile ----
    gl_ = it + n_tiles - 1
    sv = gl_ % STAGES
    mbarrier.wait(v_ready.index(sv), (gl_ // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (tc + n_tiles) & 1)
    o = warpgroup_mma(p, v_smem.index(sv), o, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    o = warpgroup_mma_wait(0, deps=(o, ))
    mbarrier.arrive(v_empty.index(sv))
    return o, m_i, l_i
