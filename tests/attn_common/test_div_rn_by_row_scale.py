"""div_rn_by_row_scale: ``x / s`` from one IEEE division per row, equal to ``div_rn`` bit for bit.

Why it is exact. Signs aside, write ``x = a 2^i`` and ``s = b 2^j`` with ``a, b`` in ``[1, 2)``: while no step
leaves the normal range, powers of two change nothing, so take ``x = a``, ``s = b > 1`` (``b = 1`` is exact). The
helper's ranges see to that: the scale it divides by lies in ``[2^-85, 2^126)``, so ``r`` is normal, and
``|x / s| >= 2^-40`` makes ``|x| >= 2^-102`` (after the power of two), so a residual below the normal range, a
multiple of ``2^(i - 47) >= 2^-149``, is exact. Let ``y = RN(1/b)``, ``|y - 1/b| <= 2^-25``, ``u = ulp(a/b)``.

1. ``q = RN(a y)``: ``|q - a/b| <= ulp(a y) / 2 + a 2^-25 = k u`` with ``k < 1.5`` (``k < 1`` when ``a/b >= 1``;
   when ``a y`` rounds up to 1 from ``a/b < 1``, ``|q - a/b| <= a 2^-25 < u``).
2. ``rho = RN(a - b q)``: ``|a - b q| <= k b u``, and ``rho`` is off by at most ``2^-24 |a - b q|``.
3. ``q + rho y - a/b = (q - a/b)(1 - b y) + (rho - (a - b q)) y``, so it is at most
   ``E = k u 2^-25 (b + 2 + 2^-23)`` away from ``a/b``.
4. A rounding midpoint ``m`` of the result's binade gives ``a - b m = N 2^-48`` (``u = 2^-24``) or ``N 2^-47``
   (``u = 2^-23``) for an integer ``N != 0``, so ``|a/b - m| >= N u 2^-24 / b``. The final FMA's ``RN`` is
   ``RN(a/b)`` unless that is ``<= E``, i.e. ``N <= k b (b + 2 + 2^-23) / 2 < 6.000001``.

The pairs with ``N <= 6`` are enumerated: with ``a = A 2^-23``, ``b = B 2^-23`` and ``m = M 2^-c`` (``M`` odd,
``c = 25`` below 1, else 24), ``B M = -+N (mod 2^c)`` fixes ``M`` modulo ``2^(c - tz(B))``, and ``8 | B`` leaves
none. ``tools/check_div_rn_by_row_scale.c`` checks every one of them (649 million placed pairs, none wrong)
and billions of other pairs; here a sample runs through an exact numpy model of the arithmetic and through the jit
helper itself (the interpreter when its ``tl.fma`` is fused, else the GPU).
"""

import fractions

import numpy as np
import pytest
import torch

from .attn_common_probe_kernels import div_rn_by_row_scale_kernel, fma_kernel

F32, F64 = np.float32, np.float64
FP8_FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fma32(a, b, c):
    """Correctly rounded float32 ``a * b + c``: the product is exact in float64, the sum is rounded to odd
    (53 >= 24 + 2 bits, so the final float32 rounding is then the single rounding of the exact value)."""
    p = a.astype(F64) * b.astype(F64)
    c = c.astype(F64)
    with np.errstate(all="ignore"):
        total = p + c
        t = total - p
        err = (p - (total - t)) + (c - t)  # TwoSum: total + err == p + c exactly
        bits = total.view(np.int64)
        fix = np.isfinite(total) & (err != 0) & ((bits & 1) == 0)
        bits = np.where(fix, bits + np.where((err > 0) == (total > 0), 1, -1), bits)
        return bits.view(F64).astype(F32)


def _helper(x, s, any_scale, wrong_reciprocal=False):
    """The jit helper's arithmetic in numpy float32 (IEEE: multiply, divide and cast round correctly)."""
    with np.errstate(all="ignore"):
        if any_scale:
            mag = np.abs(s)
            p = np.where(mag < F32(2.0**-62), F32(2.0**64), np.where(mag >= F32(2.0**64), F32(2.0**-64), F32(1)))
            p = np.where(s < 0, -p, p)
            s = s * p
            neg_x = x * (p * F32(-1))
        else:
            neg_x = x * F32(-1)
        neg_r = F32(-1) / s
        if wrong_reciprocal:
            neg_r = np.nextafter(neg_r, F32(0))
        s = np.clip(s, F32(-3.4028235e38), F32(3.4028235e38))
        q = np.fmin(np.fmax(neg_x * neg_r, F32(-(2.0**126))), F32(2.0**126))
        return _fma32(_fma32(q, s, neg_x), neg_r, q)


def _check(x, s, got, any_scale):
    """The helper's claims for float32 arrays: equal to IEEE ``x / s`` where ``2^-40 <= |x/s| < 2^126`` or
    ``x = +-0``; elsewhere the sign is kept and tiny stays below ``2^-39``, huge at least ``2^125``; the same FP8
    codes after the writer's clamp everywhere; NaN where IEEE gives NaN (0 / 0, inf / inf)."""
    with np.errstate(all="ignore"):
        want = (x.astype(F64) / s.astype(F64)).astype(F32)
    torch_want = (torch.from_numpy(x) / torch.from_numpy(s)).numpy()
    nan = np.isnan(want)
    assert np.array_equal(nan, np.isnan(torch_want))  # two references agree
    assert np.array_equal(want[~nan].view(np.uint32), torch_want[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()
    x, s, got, want = x[~nan], s[~nan], got[~nan], want[~nan]
    mag = np.abs(want)
    claim = (x == 0) | ((mag >= 2.0**-40) & (mag < 2.0**126))
    if any_scale:  # zero and infinite scales: IEEE's infinities and zeros
        claim |= (s == 0) | np.isinf(s)
    bad = claim & (got.view(np.uint32) != want.view(np.uint32))
    assert not bad.any(), f"{bad.sum()} differ, e.g. x={x[bad][:3]} s={s[bad][:3]} got={got[bad][:3]}"
    out = ~claim
    assert np.array_equal(np.signbit(got[out]), np.signbit(want[out]))
    assert (np.where(mag[out] < 2.0**-40, np.abs(got[out]) < 2.0**-39, np.abs(got[out]) >= 2.0**125)).all()
    for fmt in FP8_FORMATS:
        fmax = torch.finfo(fmt).max
        codes = [torch.from_numpy(v).clamp(-fmax, fmax).to(fmt).view(torch.uint8) for v in (got, want)]
        assert torch.equal(*codes), fmt


def _hard_pairs(b_ints):
    """Every mantissa pair ``(a, b)`` (float32 in ``[1, 2)``) with ``b`` in ``b_ints * 2^-23`` and ``a/b`` within
    ``N <= 6`` units of a rounding midpoint (module docstring)."""
    B = np.asarray(b_ints, dtype=np.int64)
    tz = np.log2(B & -B).astype(np.int64)
    odd = B >> tz
    found_a, found_b = [], []
    for c in (24, 25):
        mask = (np.int64(1) << (c - tz)) - 1
        inv = np.ones_like(B)
        for _ in range(6):  # Newton's iteration for the inverse of odd modulo 2^(c - tz)
            inv = (inv * ((2 - odd * inv) & mask)) & mask
        for n in range(1, 7):
            usable = (n % (1 << tz) == 0) & (((n >> tz) & 1) == 1)
            for sign in (-1, 1):
                m0 = (((sign * (n >> tz)) & mask) * inv) & mask
                for lift in range(4):
                    m = m0 + lift * (mask + 1)
                    ok = usable & (m < 2**c) & (m >= 2 ** (c - 1)) & ((m & 1) == 1)
                    num = B * m - sign * n
                    assert (num[ok] % 2**c == 0).all()
                    a_int = num >> c
                    ok &= (a_int >= 2**23) & (a_int < 2**24)
                    found_a.append(a_int[ok])
                    found_b.append(B[ok])
    return (np.ldexp(np.concatenate(v).astype(F64), -23).astype(F32) for v in (found_a, found_b))


def _sample_hard_pairs(seed, per_class=(3000, 1500, 800)):
    """Hard pairs for divisors ``B = odd * 2^tz`` drawn from each class ``tz = 0, 1, 2`` (the only ones with any)."""
    rng = np.random.default_rng(seed)
    bs = [(rng.integers(2 ** (22 - tz), 2 ** (23 - tz), n) * 2 + 1) << tz for tz, n in enumerate(per_class)]
    return _hard_pairs(np.concatenate(bs))


# (exponent of x, exponent of s): quotients near 1, huge, tiny; the smallest normal scale; ANY_SCALE rescaling.
PLACEMENTS = [(0, 0), (100, -20), (-100, 20), (-79, -126), (127, 125), (3, -5), (-60, -90), (-140, -140), (60, 127)]


def _placed(a, b, any_scale):
    xs, ss = [], []
    for i, j in PLACEMENTS:
        if not any_scale and not (-62 <= j < 126):
            continue
        x, s = np.ldexp(a.astype(F64), i).astype(F32), np.ldexp(b.astype(F64), j).astype(F32)
        xs += [x, -x, x] if any_scale else [x, -x]
        ss += [s, s, -s] if any_scale else [s, s]  # ANY_SCALE takes negative scales too
    return np.concatenate(xs), np.concatenate(ss)


def test_fma_model_matches_exact_rationals():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(3000) * np.exp2(rng.integers(-30, 30, 3000))).astype(F32)
    b = (rng.standard_normal(3000)).astype(F32)
    c = (-(a.astype(F64) * b) * (1 + rng.standard_normal(3000) * 2.0**-20)).astype(F32)  # heavy cancellation
    c[::3] = rng.standard_normal(1000).astype(F32)
    got = _fma32(a, b, c)
    for ai, bi, ci, gi in zip(a, b, c, got):
        exact = fractions.Fraction(float(ai)) * fractions.Fraction(float(bi)) + fractions.Fraction(float(ci))
        g = fractions.Fraction(float(gi))
        # gi is a nearest float32: the exact value is within half the gap to the neighbour on its side
        side = np.nextafter(gi, F32(np.inf) if exact >= g else F32(-np.inf))
        assert abs(exact - g) <= abs(fractions.Fraction(float(side)) - g) / 2


@pytest.mark.parametrize("any_scale", [True, False])
def test_model_exact_on_every_hard_pair_of_sampled_divisors(any_scale):
    a, b = _sample_hard_pairs(1)
    assert len(a) > 20000
    x, s = _placed(a, b, any_scale)
    _check(x, s, _helper(x, s, any_scale), any_scale)


def test_hard_pairs_bite():
    """Without the correction, or with a reciprocal one ulp off, the sampled hard pairs go wrong: they probe
    the edge the proof stands on, not easy quotients."""
    a, b = _sample_hard_pairs(2, (1500, 700, 400))
    want = (a.astype(F64) / b).astype(F32)
    uncorrected = a * (F32(1) / b)
    assert (uncorrected != want).mean() > 0.2
    assert (_helper(a, b, True, wrong_reciprocal=True) != want).mean() > 0.02


@pytest.mark.parametrize("any_scale", [True, False])
def test_model_exact_on_random_pairs(any_scale):
    """Any finite x (all bit patterns alike, subnormals and +-0 included), scales over the whole claimed range."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    x = bits[((bits >> 23) & 0xFF) != 0xFF].view(F32)
    lo, hi = (-149, 127) if any_scale else (-62, 125)
    mant = (1 + rng.random(len(x))).astype(F32)
    s = np.ldexp(mant.astype(F64), rng.integers(lo, hi + 1, len(x))).astype(F32)
    s = np.where(s == 0, F32(2.0**-149), s)
    if any_scale:
        s = np.where(rng.random(len(s)) < 0.5, -s, s)
    _check(x, s, _helper(x, s, any_scale), any_scale)


def test_model_gives_ieee_quotients_for_zero_and_infinite_scales():
    x = np.array([0.0, -0.0, 2.0**-149, -1.5, 3e38, np.inf, -np.inf], dtype=F32)
    for scale in (0.0, -0.0, np.inf, -np.inf):
        s = np.full_like(x, scale)
        got = _helper(x, s, True)
        with np.errstate(all="ignore"):
            want = x / s
        assert np.array_equal(got, want, equal_nan=True) and np.array_equal(np.signbit(got), np.signbit(want))


def _fma_is_fused(device) -> bool:
    one = torch.ones(2, device=device)
    a, b = one * (1 + 2.0**-23), one * (1 - 2.0**-23)
    out = torch.empty(2, device=device)
    fma_kernel[(1,)](a, b, -one, out, N=2)
    return bool((out == -(2.0**-46)).all())


# Scale exponents for the kernel test (ANY_SCALE adds subnormal and huge scales) and numerator exponent offsets.
KERNEL_SCALE_EXPONENTS = {True: (0, -20, 20, -126, 125, -90, 127, -140), False: (0, -20, 20, -62, 100, 125)}
SPECIAL_SCALES = np.array([0.0, -0.0, np.inf, -np.inf, -3.0, -(2.0**-140), -(2.0**127)], dtype=F32)
KERNEL_X_OFFSETS = (0, -1, 5, -5, 30, -30, 100, -100)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meeting inf, 0 and NaN
@pytest.mark.parametrize("any_scale", [True, False])
@pytest.mark.parametrize("scalar_scale", [False, True])
def test_jit_helper_equals_ieee_division(device, any_scale, scalar_scale):
    if not _fma_is_fused(device):
        pytest.skip("this Triton interpreter rounds tl.fma twice (x * y + z): the helper needs a fused FMA")
    a, b = _sample_hard_pairs(4, (300, 150, 80))
    exps = np.array(KERNEL_SCALE_EXPONENTS[any_scale])
    # One row per hard pair and scale exponent: the pair's numerator at several exponents (alternating signs),
    # then a random value and the edges.
    j = np.repeat(exps[None, :], len(a), 0).ravel()
    a, b = np.repeat(a, len(exps)).astype(F64), np.repeat(b, len(exps)).astype(F64)
    with np.errstate(all="ignore"):
        s = np.ldexp(b, j).astype(F32)
        hard = [(-1) ** k * np.ldexp(a, j + d) for k, d in enumerate(KERNEL_X_OFFSETS)]
        x = np.stack(hard, 1).astype(F32)
    rng = np.random.default_rng(5)
    edges = np.array([0.0, -0.0, 2.0**-149, -(2.0**-126), 3.4028235e38, np.inf, -np.inf], dtype=F32)
    x = np.concatenate([x, rng.standard_normal((len(x), 1)).astype(F32), np.tile(edges, (len(x), 1))], 1)
    block_rows, cols = 1024, x.shape[1]  # few programs: the interpreter pays per program
    rows = block_rows if scalar_scale else len(x) - len(x) % block_rows
    x, s = np.ascontiguousarray(x[:rows]), s[: 1 if scalar_scale else rows].copy()
    if any_scale and not scalar_scale:  # zero, infinite and negative scales on some rows
        s[: len(SPECIAL_SCALES)] = SPECIAL_SCALES
    out = torch.empty(rows, cols, device=device)
    div_rn_by_row_scale_kernel[(rows // block_rows,)](
        torch.from_numpy(x).to(device), torch.from_numpy(s).to(device), out,
        COLS=cols, BLOCK_ROWS=block_rows, ANY_SCALE=any_scale, SCALAR_SCALE=scalar_scale,
    )  # fmt: skip
    s_full = np.ascontiguousarray(np.broadcast_to(s[:, None] if not scalar_scale else s[:1, None], x.shape))
    _check(x.ravel(), s_full.ravel(), out.cpu().numpy().ravel(), any_scale)
