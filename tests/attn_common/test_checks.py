import pytest
import torch

from kvflash.attn_common import (
    check_block_size,
    check_gqa,
    check_head_size,
    check_index_tensor,
    check_kv_cache,
    check_same_device,
    check_tensor,
)


def test_check_tensor_accepts_and_returns():
    t = torch.zeros(3, 4, 8)
    assert check_tensor("q", t, dtypes=(torch.float32,), shape=(3, None, 8)) is t


@pytest.mark.parametrize(
    "kwargs, value, error, match",
    [
        ({}, [1, 2], TypeError, r"q: expected a torch.Tensor, got list"),
        (
            {"dtypes": (torch.float16, torch.bfloat16)},
            torch.zeros(2),
            TypeError,
            r"q: expected dtype float16 or bfloat16, got float32",
        ),
        ({"ndim": 3}, torch.zeros(2, 2), ValueError, r"q: expected a 3-D tensor, got 2-D with shape \(2, 2\)"),
        (
            {"shape": (2, None, 4)},
            torch.zeros(2, 3, 5),
            ValueError,
            r"q: expected shape \(2, '\*', 4\), got \(2, 3, 5\)",
        ),
        ({}, torch.zeros(4, 6)[:, ::2], ValueError, r"q: the last dimension must be contiguous"),
        ({"device": torch.device("meta")}, torch.zeros(2), ValueError, r"q: expected a tensor on meta"),
    ],
)
def test_check_tensor_errors_name_argument_expectation_and_value(kwargs, value, error, match):
    with pytest.raises(error, match=match):
        check_tensor("q", value, **kwargs)


def test_index_tensor_must_be_int32():
    with pytest.raises(TypeError, match=r"cu_seqlens_q: expected dtype int32, got int64"):
        check_index_tensor("cu_seqlens_q", torch.zeros(3, dtype=torch.int64), shape=(3,), device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected shape \(4,\), got \(3,\)"):
        check_index_tensor("cu_seqlens_q", torch.zeros(3, dtype=torch.int32), shape=(4,), device=torch.device("cpu"))


def test_same_device():
    check_same_device(a=torch.zeros(1), b=None, c=torch.zeros(1))
    with pytest.raises(ValueError, match=r"b: expected a tensor on cpu \(like a\), got one on meta"):
        check_same_device(a=torch.zeros(1), b=torch.zeros(1, device="meta"))


def test_scalar_checks_reject_tensors_and_wrong_types():
    from kvflash.attn_common import check_bool, check_int, check_real

    assert check_int("n", 3) == 3 and check_real("x", 2) == 2.0 and check_bool("b", False) is False
    with pytest.raises(TypeError, match=r"n: expected a Python int, got Tensor"):
        check_int("n", torch.tensor(3))
    with pytest.raises(TypeError, match=r"n: expected a Python int, got bool"):
        check_int("n", True)
    with pytest.raises(ValueError, match=r"n: expected an int >= -1, got -2"):
        check_int("n", -2, minimum=-1)
    with pytest.raises(TypeError, match=r"x: expected a Python float, got Tensor"):
        check_real("x", torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"b: expected a bool, got int"):
        check_bool("b", 1)


def test_kv_layout_checks_max_seqlen_k_against_capacity():
    q, k, table, used = _paged()  # 3 pages of 16 per sequence
    check_kv_cache(q, k, k, 2, block_table=table, seqused_k=used, cu_seqlens_k=None, max_seqlen_k=48)
    with pytest.raises(ValueError, match=r"max_seqlen_k: 49 keys do not fit: block_table addresses 3 pages x 16 48"):
        check_kv_cache(q, k, k, 2, block_table=table, seqused_k=used, cu_seqlens_k=None, max_seqlen_k=49)


def test_gqa_head_size_block_size():
    assert check_gqa(12, 2) == 6 and check_gqa(7, 1) == 7
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of the number of KV heads \(4\)"):
        check_gqa(6, 4)
    for d in (8, 24, 40, 64, 72, 80, 96, 112, 120, 128, 192, 256, 504, 512, 16):
        assert check_head_size(d) == d
    for d in (0, 4, 12, 520, 100):
        with pytest.raises(ValueError, match=rf"head size: expected a multiple of 8 between 8 and 512, got {d}"):
            check_head_size(d)
    assert check_block_size(1) == 1
    with pytest.raises(ValueError, match=r"block_size \(k.shape\[1\]\): expected a positive page size, got 0"):
        check_block_size(0)


def _paged(q_dtype=torch.float16, kv_dtype=None, hkv=2, d=64):
    q = torch.zeros(5, 4, d, dtype=q_dtype)
    k = torch.zeros(6, 16, hkv, d, dtype=kv_dtype or q_dtype)
    table = torch.zeros(2, 3, dtype=torch.int32)
    used = torch.zeros(2, dtype=torch.int32)
    return q, k, table, used


def test_kv_layout_paged_and_contiguous():
    q, k, table, used = _paged(kv_dtype=torch.float8_e4m3fn)
    layout = check_kv_cache(q, k, k, 2, block_table=table, seqused_k=used, cu_seqlens_k=None)
    assert layout.is_paged and layout.num_kv_heads == 2 and layout.types.kv_is_fp8
    kc = torch.zeros(9, 2, 64, dtype=torch.float16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    layout = check_kv_cache(q, kc, kc, 2, block_table=None, seqused_k=None, cu_seqlens_k=cu)
    assert not layout.is_paged and layout.head_size == 64


def test_kv_layout_strided_joint_cache_view_is_accepted():
    q = torch.zeros(5, 4, 64, dtype=torch.float16)
    joint = torch.zeros(6, 2, 16, 2, 64, dtype=torch.float16)
    table, used = torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    check_kv_cache(q, joint[:, 0], joint[:, 1], 2, block_table=table, seqused_k=used, cu_seqlens_k=None)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(seqused_k=None), ValueError, r"seqused_k: required with block_table"),
        (
            lambda a: a.update(cu_seqlens_k=torch.zeros(3, dtype=torch.int32)),
            ValueError,
            r"cu_seqlens_k: must be None when block_table",
        ),
        (lambda a: a.update(block_table=None), ValueError, r"cu_seqlens_k: required for a contiguous KV cache"),
        (
            lambda a: a.update(block_table=torch.zeros(2, 3, dtype=torch.int64)),
            TypeError,
            r"block_table: expected dtype int32, got int64",
        ),
        (
            lambda a: a.update(block_table=torch.zeros(3, 3, dtype=torch.int32)),
            ValueError,
            r"block_table: expected shape \(2, '\*'\)",
        ),
        (
            lambda a: a.update(seqused_k=torch.zeros(3, dtype=torch.int32)),
            ValueError,
            r"seqused_k: expected shape \(2,\)",
        ),
        (
            lambda a: a.update(v=torch.zeros(6, 16, 2, 32, dtype=torch.float16)),
            ValueError,
            r"v: expected shape \(6, 16, 2, 64\)",
        ),
        (
            lambda a: a.update(
                k=torch.zeros(6, 16, 3, 64, dtype=torch.float16), v=torch.zeros(6, 16, 3, 64, dtype=torch.float16)
            ),
            ValueError,
            r"query heads \(4\) must be a multiple of the number of KV heads \(3\)",
        ),
        (
            lambda a: a.update(k=torch.zeros(6, 16, 2, 64, dtype=torch.bfloat16)),
            TypeError,
            r"k and v must share one dtype",
        ),
        (lambda a: a.update(k=torch.zeros(16, 2, 64, dtype=torch.float16)), ValueError, r"k: expected a 4-D tensor"),
    ],
)
def test_kv_layout_errors(mutate, error, match):
    q, k, table, used = _paged()
    args = dict(k=k, v=k.clone(), block_table=table, seqused_k=used, cu_seqlens_k=None)
    mutate(args)
    with pytest.raises(error, match=match):
        check_kv_cache(q, args.pop("k"), args.pop("v"), 2, **args)
