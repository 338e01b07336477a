import pytest
import torch

from kvflash.attn_common import gather_sequence_kv, platform
from kvflash.attn_common.testing import assert_close_fa_rule, encode_fp8, error_vs, make_paged_kv, poison


def test_interpreter_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert platform.interpreter_enabled() and platform.runs_triton(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not platform.interpreter_enabled() and not platform.runs_triton(torch.device("cpu"))
    assert platform.runs_triton(torch.device("cuda"))
    assert not platform.compiles_to_ptx(torch.device("cpu"))


@pytest.mark.parametrize(
    "value, off",
    [(None, False), ("1", False), ("", False), ("0", True), ("false", True), (" No ", True), ("OFF", True)],
)
def test_gluon_switch(monkeypatch, value, off):
    # Unset means on (the Hopper kernels are the default where they apply); 0 / false / no / off turn them off.
    if value is None:
        monkeypatch.delenv(platform.GLUON_ENV, raising=False)
    else:
        monkeypatch.setenv(platform.GLUON_ENV, value)
    assert platform.gluon_switched_off() == off
    assert not platform.hopper_gluon_available(torch.device("cpu"))  # never off a CUDA device


@pytest.mark.parametrize("value", ["0", "off", " False "])
def test_programmatic_launch_switch_and_devices(monkeypatch, value):
    # Never on the CPU or under the interpreter; KVFLASH_PDL=0 (any off word) turns it off on a GPU as well.
    monkeypatch.delenv(platform.PDL_ENV, raising=False)
    assert not platform.programmatic_launch_available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not platform.programmatic_launch_available(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(platform.PDL_ENV, value)
    assert not platform.programmatic_launch_available(torch.device("cuda"))


def test_compiles_to_ptx_on_nvidia_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert platform.compiles_to_ptx(torch.device("cuda")) == (not platform.is_rocm())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not platform.compiles_to_ptx(torch.device("cuda"))


def test_multiprocessor_count():
    if platform.gpu_available() and torch.cuda.is_available():
        assert platform.multiprocessor_count(torch.device("cuda")) >= 1
    assert platform.multiprocessor_count(torch.device("cpu")) == platform.INTERPRETER_MULTIPROCESSORS


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_make_paged_kv_round_trips_through_gather(joint, block_size):
    g = torch.Generator().manual_seed(1)
    ks = [torch.randn(n, 2, 16, generator=g).half() for n in (5, 0, 17)]
    vs = [torch.randn(n, 2, 16, generator=g).half() for n in (5, 0, 17)]
    cache = make_paged_kv(ks, vs, block_size, generator=g, joint_layout=joint)
    assert cache.k_cache.is_contiguous() != joint
    for s, (k, v) in enumerate(zip(ks, vs)):
        n = int(cache.seqused_k[s])
        assert torch.equal(gather_sequence_kv(cache.k_cache, s, n, block_table=cache.block_table, cu_seqlens_k=None), k)
        assert torch.equal(gather_sequence_kv(cache.v_cache, s, n, block_table=cache.block_table, cu_seqlens_k=None), v)


def test_encode_fp8_saturates_and_uses_per_head_scales():
    x = torch.tensor([[[1000.0, 1.0]], [[1.0, -1000.0]]]).expand(2, 2, 2).contiguous()  # [tokens, Hkv=2, D=2]
    scales = torch.tensor([1.0, 2.0])
    stored = encode_fp8(x, scales, torch.float8_e4m3fn)
    assert stored.float().abs().max() == 448.0
    assert torch.equal(stored[1, 1].float(), torch.tensor([0.5, -448.0]))


def test_poison_and_tolerance_rule():
    t = poison(torch.zeros(3))
    assert torch.isnan(t).all() and error_vs(t, torch.zeros(3)) == float("inf")
    exact = torch.zeros(4, dtype=torch.float64)
    assert_close_fa_rule(exact + 1e-3, exact, exact + 1e-3, atol=0)
    with pytest.raises(AssertionError, match="max error"):
        assert_close_fa_rule(exact + 3e-3, exact, exact + 1e-3, atol=0)
