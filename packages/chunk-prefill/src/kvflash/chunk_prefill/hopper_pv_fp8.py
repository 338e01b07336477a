"""The two operands of the Hopper prefill kernel's fp8 PV dot (``PV_FP8``; Gluon, jit only): V^T and P in e4m3.

An 8-bit wgmma wants its B operand K-major: ``V^T [HEAD_D, BLOCK_N]`` with the keys contiguous, while the cache
stores V with D contiguous. The producer transposes each staged fp8 V tile (:func:`transpose_v_tile`): 16 KB read
and 16 KB written per 128 x 128 tile, against the 16 KB read and 32 KB written of widening V to fp16.

P needs no data movement. For the e4m3 A operand (``k_width`` 4) a thread holds keys ``4q .. 4q+3`` (and ``+16``)
of each 32-key block; the S accumulator holds keys ``2q, 2q+1`` (and ``+8, +16, +24``). Relabel the keys within
each 16-key group: operand key bits ``(k3, k2, k1, k0)`` take the accumulator's ``(c2, c1, c3, c0)``, higher bits
equal. Then the accumulator's registers *are* the operand's (:func:`p_to_e4m3`), and the producer writes row ``d``
of V^T with its keys in the same relabelled order.

P is scaled by ``2^P_LOG2`` before the rounding to e4m3 (so probabilities down to ``2^-16`` keep a normal or
subnormal e4m3 value): the consumer folds the shift into the row maximum it subtracts in the exponent, so ``l`` is
scaled alike and the two cancel in ``o / l``; the LSE subtracts ``P_LOG2``.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.runtime.jit import constexpr_function

P_LOG2 = gl.constexpr(7)  # P in e4m3 as P * 2^7, as the portable kernel's P_FP8_SCALE = 128


@constexpr_function
def _log2(x):
    return x.bit_length() - 1


@constexpr_function
def vt_shared_layout(BLOCK_N, HEAD_D):
    """The consumers' V^T ring, ``[HEAD_D, BLOCK_N]`` fp8 with the keys contiguous (the 8-bit wgmma's B operand)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=min(BLOCK_N, 128), element_bitwidth=8, rank=2)


@constexpr_function
def vt_staging_slots(STAGES):
    """Slots of the V staging ring: a power of two (the dimensions of a linear layout are)."""
    return 1 << (STAGES - 1).bit_length()


@constexpr_function
def vt_staging_layout(BLOCK_N, HEAD_D):
    """The fp8 V staging tile ``[BLOCK_N, HEAD_D]`` (keys x d), filled by cp.async in 16-byte row pieces and read
    only by the transpose. Byte offset bits: d bits 0..3 (within a piece), then the piece index XOR the key's 16-key
    group, so that both the transposing reads (16 keys of one group per thread, the groups across lanes) and the
    16-byte writes hit distinct banks; then the key bits."""
    nd = _log2(HEAD_D)
    ng = _log2(BLOCK_N // 16)
    bases = [[0, 1 << b] for b in range(4)]  # d within a 16-byte piece
    bases += [[0, 1 << b] for b in range(4, nd)]  # piece index
    # rows under 128 bytes: the highest group bits fill the 128-byte bank line (rows of other groups side by side)
    fill = min(max(0, 7 - nd), ng)
    groups = list(range(ng))
    for i in groups[ng - fill:]:
        bases.append([16 << i, 0])
    # key bits 0..3, then the remaining group bits, each also XOR-ing a piece bit
    bases += [[1 << b, 0] for b in range(4)]
    for n, i in enumerate(groups[:ng - fill]):
        piece_bit = min(nd, 7) - (ng - fill) + n  # the highest piece bits inside the 128-byte bank line
        bases.append([16 << i, (1 << piece_bit) if piece_bit < nd else 0])
    return gl.SharedLinearLayout(offset_bases=bases)


@constexpr_function
def _transpose_bits(BLOCK_N, HEAD_D, NUM_WARPS):
    """``(ng, nw, td)`` of the transpose's register layouts: key-group bits (lanes), warp bits, and d bits per thread
    (the d bits past the 5 - ng lanes and the warps; at least 2: 4 bytes of d per key, the 32-bit words prmt
    transposes)."""
    ng = _log2(BLOCK_N // 16)
    nw = _log2(NUM_WARPS)
    td = _log2(HEAD_D) - (5 - ng) - nw
    assert td >= 2, (BLOCK_N, HEAD_D)
    return ng, nw, td


@constexpr_function
def _vt_load_layout(BLOCK_N, HEAD_D, NUM_WARPS):
    """Registers of the transposing read of a staging tile ``[BLOCK_N, HEAD_D]``: each thread 16 keys (one 16-key
    group) x TD bytes of d (one TD-byte shared load per key), the key groups over the low lanes (so that a quarter
    warp's 16-byte stores of V^T rows cover 8 different chunks of a row), then d over the other lanes and warps."""
    ng, nw, td = _transpose_bits(BLOCK_N, HEAD_D, NUM_WARPS)
    reg = [[0, 1 << b] for b in range(td)] + [[1 << b, 0] for b in range(4)]
    lane = [[16 << i, 0] for i in range(ng)] + [[0, 1 << (td + i)] for i in range(5 - ng)]
    warp = [[0, 1 << (td + 5 - ng + i)] for i in range(nw)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                      shape=[BLOCK_N, HEAD_D])


@constexpr_function
def _vt_store_layout(BLOCK_N, HEAD_D, NUM_WARPS):
    """The elements of :func:`_vt_load_layout` after the relabelling and the transpose, as ``[HEAD_D, BLOCK_N]``:
    register bits keys first (one 16-byte store per d row), then d."""
    ng, nw, td = _transpose_bits(BLOCK_N, HEAD_D, NUM_WARPS)
    reg = [[0, 1 << b] for b in range(4)] + [[1 << b, 0] for b in range(td)]
    lane = [[0, 16 << i] for i in range(ng)] + [[1 << (td + i), 0] for i in range(5 - ng)]
    warp = [[1 << (td + 5 - ng + i), 0] for i in range(nw)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                      shape=[HEAD_D, BLOCK_N])


@gluon.jit
def transpose_v_tile(src, dst, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_WARPS: gl.constexpr):
    """``dst [HEAD_D, BLOCK_N]`` = ``src [BLOCK_N, HEAD_D]`` transposed (fp8 both, ``dst`` in
    :func:`vt_shared_layout`, ``src`` in :func:`vt_staging_layout`), the keys of each 16-key group relabelled: one
    TD-byte shared load per key and thread, 4 x 4 byte blocks transposed by ``prmt``, one 16-byte store per d row and
    thread. Rows of ``src`` past the sequence are zero (the masked cp.async fills them), and so are their columns."""
    x = src.load(_vt_load_layout(BLOCK_N, HEAD_D, NUM_WARPS))
    x = x.reshape([BLOCK_N // 16, 2, 2, 2, 2, HEAD_D])  # (key group, c3, c2, c1, c0, d)
    x = x.permute((0, 2, 3, 1, 4, 5))  # (group, k3 = c2, k2 = c1, k1 = c3, k0 = c0, d)
    # 4 x 4 byte blocks (4 keys x 4 d) transposed by 8 prmt (LLVM's own byte shuffling takes 12):
    # x_{k1 k0} [BLOCK_N / 4, HEAD_D], one 32-bit word = 4 d of one key
    x = x.reshape([BLOCK_N // 4, 2, 2, HEAD_D]).permute((0, 3, 1, 2))  # (key quad, d, k1, k0)
    x_0, x_1 = x.split()  # k0
    x00, x10 = x_0.split()  # k1
    x01, x11 = x_1.split()
    dt = src.dtype
    y0, y1, y2, y3 = gl.inline_asm_elementwise(
        "{ .reg .b32 t0, t1, t2, t3; prmt.b32 t0, $4, $5, 0x5140; prmt.b32 t1, $4, $5, 0x7362; "
        "prmt.b32 t2, $6, $7, 0x5140; prmt.b32 t3, $6, $7, 0x7362; prmt.b32 $0, t0, t2, 0x5410; "
        "prmt.b32 $1, t0, t2, 0x7632; prmt.b32 $2, t1, t3, 0x5410; prmt.b32 $3, t1, t3, 0x7632; }",
        "=r,=r,=r,=r,r,r,r,r", [x00, x01, x10, x11], dtype=[dt, dt, dt, dt], is_pure=True, pack=4)
    # y_j[key quad, 4m + b] = x[key 4 quad + b, d 4m + j]
    z = gl.join(gl.join(y0, y1), gl.join(y2, y3))  # (quad, 4m + b, j0, j1): z[.., a, c] = y_{2c + a}
    z = z.reshape([BLOCK_N // 4, HEAD_D // 4, 4, 2, 2])  # (quad, m, b, j0, j1)
    x = z.permute((1, 4, 3, 0, 2)).reshape([HEAD_D, BLOCK_N])  # (m, j1, j0, quad, b) = (d, key)
    x = gl.convert_layout(x, _vt_store_layout(BLOCK_N, HEAD_D, NUM_WARPS), assert_trivial=True)
    dst.store(x)


@gluon.jit
def p_to_e4m3(p32, p_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """P ``[M, BLOCK_N]`` fp32 (already times ``2^P_LOG2``, in the S accumulator's registers) as the e4m3 A operand
    of the PV wgmma (``p_layout``), with no data movement: the keys relabelled as V^T's (the layout conversion is
    trivial), then four values at a time (one operand register) by two ``cvt.rn.satfinite.e4m3x2.f32`` (Triton's
    own fp32 -> fp8 conversion unpacks and repacks the bytes)."""
    M: gl.constexpr = p32.shape[0]
    p = p32.reshape([M, BLOCK_N // 16, 2, 2, 2, 2])  # (row, group, c3, c2, c1, c0)
    p = p.permute((0, 1, 3, 4, 2, 5))  # (row, group, k3 = c2, k2 = c1, k1 = c3, k0 = c0)
    p = p.reshape([M, BLOCK_N])
    p = gl.convert_layout(p, gl.to_linear_layout(p_layout, [M, BLOCK_N]), assert_trivial=True)
    p8 = gl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [p], dtype=gl.float8e4nv, is_pure=True, pack=4)
    return gl.convert_layout(p8, p_layout, assert_trivial=True)
