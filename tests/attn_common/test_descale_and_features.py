import math

import pytest
import torch

from kvflash.attn_common import (
    UNBOUNDED_WINDOW,
    check_softcap,
    kernel_window,
    normalize_alibi_slopes,
    normalize_descale,
    normalize_sinks,
    normalize_window,
    resolve_softmax_scale,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("value, expected", [(None, 1.0), (0.25, 0.25), (3, 3.0)])
def test_descale_scalars_broadcast(value, expected):
    out = normalize_descale("k_descale", value, 3, 2, CPU)
    assert out.shape == (3, 2) and out.dtype == torch.float32 and out.stride() == (0, 0)
    assert torch.all(out == expected)


def test_descale_float32_tensors_are_views_without_copy():
    per_head = torch.tensor([0.5, 2.0])
    out = normalize_descale("k_descale", per_head, 3, 2, CPU)
    assert out.data_ptr() == per_head.data_ptr() and out.stride() == (0, 1)
    assert torch.equal(out, per_head.expand(3, 2))
    full = torch.rand(3, 2)
    out = normalize_descale("v_descale", full, 3, 2, CPU)
    assert out.data_ptr() == full.data_ptr() and out.stride() == (2, 1)
    one = torch.tensor([0.7])
    out = normalize_descale("v_descale", one, 3, 2, CPU)
    assert out.data_ptr() == one.data_ptr() and out.stride() == (0, 0)
    expanded = torch.tensor([[1.5]]).expand(3, 2)  # an expanded stride-0 view, as engines pass
    out = normalize_descale("v_descale", expanded, 3, 2, CPU)
    assert out.data_ptr() == expanded.data_ptr() and torch.all(out == 1.5)
    per_seq = torch.tensor([[1.0], [2.0], [3.0]])
    out = normalize_descale("v_descale", per_seq, 3, 2, CPU)
    assert out.stride() == (1, 0) and torch.equal(out[:, 1], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_descale_half_tensors_become_float32(dtype):
    out = normalize_descale("k_descale", torch.tensor([0.5, 0.25], dtype=dtype), 2, 2, CPU)
    assert out.dtype == torch.float32 and torch.equal(out[1], torch.tensor([0.5, 0.25]))


@pytest.mark.parametrize(
    "value, error, match",
    [
        (torch.ones(3), ValueError, r"k_descale: expected 1 element, \[Hkv\]=\[2\] .* got shape \[3\]"),
        (torch.ones(2, 3), ValueError, r"got shape \[2, 3\]"),
        (torch.ones(1, 3, 2), ValueError, r"got shape \[1, 3, 2\]"),
        (
            torch.ones(2, dtype=torch.int32),
            TypeError,
            r"k_descale: expected dtype float32, float16 or bfloat16, got torch.int32",
        ),
        ("1.0", TypeError, r"k_descale: expected None, a float or a tensor, got str"),
        (torch.ones(2, device="meta"), ValueError, r"k_descale: expected a tensor on cpu"),
    ],
)
def test_descale_errors(value, error, match):
    with pytest.raises(error, match=match):
        normalize_descale("k_descale", value, 3, 2, CPU)


def test_window_and_scale_and_softcap():
    assert normalize_window(None, False) == (-1, -1)
    assert normalize_window((8, 4), True) == (8, 0)
    assert normalize_window([3, -1], False) == (3, -1)
    assert kernel_window(-1, 0) == (UNBOUNDED_WINDOW, 0)
    with pytest.raises(ValueError, match=r"window_size: entries must be >= -1"):
        normalize_window((-2, 0), False)
    with pytest.raises(TypeError, match=r"window_size: expected None or a pair"):
        normalize_window(5, False)
    assert resolve_softmax_scale(None, 64) == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match=r"softmax_scale: expected a finite positive float, got -1"):
        resolve_softmax_scale(-1, 64)
    assert check_softcap(0.0) == 0.0 and check_softcap(30) == 30.0
    with pytest.raises(ValueError, match=r"softcap: expected 0 \(off\) or a finite positive float, got nan"):
        check_softcap(math.nan)


def test_alibi_and_sinks():
    slopes = torch.rand(4)
    out = normalize_alibi_slopes(slopes, 3, 4, CPU)
    assert out.shape == (3, 4) and out.stride() == (0, 1)
    per_seq = torch.rand(3, 4)
    assert normalize_alibi_slopes(per_seq, 3, 4, CPU) is per_seq
    with pytest.raises(
        ValueError, match=r"alibi_slopes: expected shape \[Hq\]=\[4\] or \[num_seqs, Hq\]=\[3, 4\], got \[5\]"
    ):
        normalize_alibi_slopes(torch.rand(5), 3, 4, CPU)
    with pytest.raises(TypeError, match=r"alibi_slopes: expected dtype float32"):
        normalize_alibi_slopes(torch.rand(4).half(), 3, 4, CPU)
    assert normalize_sinks(None, 4, CPU) is None
    assert normalize_sinks(torch.rand(4).bfloat16(), 4, CPU).dtype == torch.float32
    strided = torch.arange(8.0)[::2]
    assert normalize_sinks(strided, 4, CPU).is_contiguous() and torch.equal(normalize_sinks(strided, 4, CPU), strided)
    assert normalize_sinks(torch.tensor([2.0]).expand(4), 4, CPU).stride() == (1,)
    with pytest.raises(ValueError, match=r"s_aux: expected shape \(4,\), got \(2,\)"):
        normalize_sinks(torch.rand(2), 4, CPU)


def test_normalize_attention_features_combines_every_feature():
    from kvflash.attn_common import check_kv_cache, normalize_attention_features

    q = torch.zeros(5, 4, 64, dtype=torch.float16)
    k = torch.zeros(6, 16, 2, 64, dtype=torch.float8_e5m2)
    table, used = torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    layout = check_kv_cache(q, k, k, 3, block_table=table, seqused_k=used, cu_seqlens_k=None)
    f = normalize_attention_features(
        q, layout, k=k, softmax_scale=None, causal=True, window_size=(7, -1), softcap=30.0,
        alibi_slopes=torch.rand(4), s_aux=torch.arange(8.0)[::2], k_descale=0.5, v_descale=torch.tensor([1.0, 2.0]),
    )  # fmt: skip
    assert f.softmax_scale == pytest.approx(1 / 8) and (f.window_left, f.window_right) == (7, 0) and f.softcap == 30.0
    assert f.alibi_slopes.shape == (3, 4) and f.s_aux.is_contiguous() and torch.equal(f.s_aux, torch.arange(0.0, 8, 2))
    assert (
        f.k_descale.shape == (3, 2)
        and torch.all(f.k_descale == 0.5)
        and torch.equal(f.v_descale[2], torch.tensor([1.0, 2.0]))
    )
    with pytest.raises(TypeError, match=r"softcap: expected a Python float, got Tensor"):
        normalize_attention_features(
            q, layout, softmax_scale=None, causal=False, window_size=None, softcap=torch.tensor(1.0),
            alibi_slopes=None, s_aux=None, k_descale=None, v_descale=None, k=k,
        )  # fmt: skip
