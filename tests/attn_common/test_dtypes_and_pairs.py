import pytest
import torch

from kvflash.attn_common import KVFlashDType, QKVTypePair


def test_enum_maps_to_torch():
    assert KVFlashDType.FLOAT16.torch_dtype == torch.float16
    assert KVFlashDType.FLOAT8_E4M3FNUZ.torch_dtype == torch.float8_e4m3fnuz
    for member in KVFlashDType:
        assert KVFlashDType.from_torch(member.torch_dtype) is member


def test_fp8_finite_max():
    assert KVFlashDType.FLOAT8_E4M3FN.finite_max == 448.0
    assert KVFlashDType.FLOAT8_E5M2.finite_max == 57344.0
    assert KVFlashDType.FLOAT8_E4M3FNUZ.finite_max == 240.0
    assert KVFlashDType.FLOAT8_E5M2.is_fp8 and not KVFlashDType.BFLOAT16.is_fp8


def test_from_torch_rejects_unknown_dtype_naming_it():
    with pytest.raises(TypeError, match=r"k: dtype torch.float32 is not supported"):
        KVFlashDType.from_torch(torch.float32, "k")


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn, torch.float8_e5m2])
def test_valid_pairs(q_dtype, kv_dtype):
    kv_dtype = kv_dtype or q_dtype
    pair = QKVTypePair.from_dtypes(q_dtype, kv_dtype, kv_dtype)
    assert pair.q_dtype.torch_dtype == q_dtype
    assert pair.kv_is_fp8 == (kv_dtype != q_dtype)


@pytest.mark.parametrize(
    "q_dtype, k_dtype, v_dtype, match",
    [
        (
            torch.float32,
            torch.float32,
            torch.float32,
            r"q: expected dtype float16, bfloat16 or float8_e4m3fn, got torch.float32",
        ),
        (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2, r"k torch.float8_e4m3fn and v torch.float8_e5m2"),
        (
            torch.bfloat16,
            torch.float16,
            torch.float16,
            r"k/v dtype torch.float16 does not pair with q dtype torch.bfloat16",
        ),
        (torch.float16, torch.int8, torch.int8, r"k: dtype torch.int8 is not supported"),
        (
            torch.float8_e4m3fn,
            torch.bfloat16,
            torch.bfloat16,
            r"q: a float8_e4m3fn query needs an FP8 KV cache \(k/v float8_e4m3fn or float8_e5m2\), got k/v",
        ),
        (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e4m3fnuz, r"q: a float8_e4m3fn query needs"),
        (torch.float8_e5m2, torch.float8_e5m2, torch.float8_e5m2, r"q: expected dtype float16, bfloat16 or float8"),
    ],
)
def test_invalid_pairs_name_both_dtypes(q_dtype, k_dtype, v_dtype, match):
    with pytest.raises(TypeError, match=match):
        QKVTypePair.from_dtypes(q_dtype, k_dtype, v_dtype)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_query_pairs_with_fp8_caches(kv_dtype):
    pair = QKVTypePair.from_dtypes(torch.float8_e4m3fn, kv_dtype, kv_dtype)
    assert pair.q_is_fp8 and pair.kv_is_fp8 and pair.kv_dtype.torch_dtype == kv_dtype
    assert not QKVTypePair.from_dtypes(torch.bfloat16, kv_dtype, kv_dtype).q_is_fp8


def test_from_tensors():
    q = torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(3, 16, 2, 64, dtype=torch.float8_e5m2)
    pair = QKVTypePair.from_tensors(q, k, k)
    assert pair.kv_dtype is KVFlashDType.FLOAT8_E5M2 and pair.kv_is_fp8
