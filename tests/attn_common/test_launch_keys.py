"""attn_common.launch: specialisation keys as Triton forms them, the launch registry and dry runs."""

import pytest
import torch

from kvflash.attn_common import platform
from kvflash.attn_common.launch import (
    describe_key,
    dry_run,
    launch,
    launch_key,
    launch_key_reference,
    record_launches,
)

from .launch_probe_kernels import scale_kernel, scale_kernel_unspecialized_n


def _args(x, out, n, scale=2.0, block=16, **extra):
    return dict(x_ptr=x, out_ptr=out, n=n, scale=scale, BLOCK=block, num_warps=4, **extra)


def test_key_follows_what_triton_specialises_on():
    x = torch.zeros(64)
    out = torch.zeros(64)
    base = launch_key(scale_kernel, _args(x, out, 32))
    spec = describe_key(base)
    assert spec["kernel"] == "scale_kernel" and spec["num_warps"] == 4
    assert spec["x_ptr"] == (torch.float32, True) and spec["n"] == (True, True) and spec["BLOCK"] == 16
    assert spec["scale"] is float
    same = [_args(x, out, 48), _args(x[4:], out, 32), _args(x, out, 32, scale=0.5)]  # 16 | 48; 16 bytes in
    for kw in same:
        assert launch_key(scale_kernel, kw) == base
    differs = [
        _args(x, out, 33),  # not divisible by 16
        _args(x, out, 1),  # 1 is a constant for Triton
        _args(x, out, 2**31),  # past int32
        _args(x[1:], out, 32),  # 4 bytes in: not 16-byte aligned
        _args(x.half(), out, 32),  # another dtype
        _args(x, out, 32, block=32),  # another constexpr
        dict(_args(x, out, 32), num_warps=8),  # another launch option
    ]
    keys = {launch_key(scale_kernel, kw) for kw in differs}
    assert base not in keys and len(keys) == len(differs)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 2**31 - 1, 2**31, -16, -5])
def test_generated_key_equals_the_reference_loop(n):
    x, out = torch.zeros(8), torch.zeros(8)
    for kernel in (scale_kernel, scale_kernel_unspecialized_n):
        for kw in (_args(x, out, n), _args(x[1:], out, n, scale=3), _args(x, out, n, scale=True)):
            assert launch_key(kernel, kw) == launch_key_reference(kernel, kw)


def test_do_not_specialize_is_honoured():
    x, out = torch.zeros(64), torch.zeros(64)
    keys = {launch_key(scale_kernel_unspecialized_n, _args(x, out, n)) for n in (1, 16, 17)}
    assert len(keys) == 1


def test_missing_parameter_is_named():
    x = torch.zeros(8)
    with pytest.raises(TypeError, match="out_ptr"):
        launch_key(scale_kernel, dict(x_ptr=x, n=8, scale=1.0, BLOCK=16))


def test_registry_and_dry_run(device):
    x = torch.arange(40, dtype=torch.float32, device=device)
    out = torch.full_like(x, -1.0)
    interpreter = platform.interpreter_enabled()
    with record_launches() as keys, dry_run():
        launch(scale_kernel, (3,), interpreter, **_args(x, out, 40))
    assert keys == {launch_key(scale_kernel, _args(x, out, 40))}
    assert (out == -1).all()  # nothing ran
    with record_launches() as outer:
        with record_launches() as inner:
            launch(scale_kernel, (3,), interpreter, **_args(x, out, 40))
        launch(scale_kernel, (3,), interpreter, **_args(x, out, 40))  # the same key twice: one entry
    assert inner == keys == outer
    torch.testing.assert_close(out, 2 * x)
    # Relaunches of a kept kernel (GPU) and Triton's own path give the same result.
    out.fill_(-1.0)
    launch(scale_kernel, (3,), interpreter, **_args(x, out, 40, scale=3.0))
    torch.testing.assert_close(out, 3 * x)


@pytest.mark.gpu
def test_kept_kernel_relaunch_matches_tritons_launch(monkeypatch):
    """On a GPU the second launch of a key goes through the kept compiled kernel: same results, per key; a new
    key (misaligned input, another n class) takes Triton's path and is kept too; with KVFLASH_VALIDATE=1 every
    launch goes through Triton and the kept kernel is checked to be the one Triton picks."""
    from kvflash.attn_common import launch as launch_module
    from kvflash.attn_common.validate import validation_enabled

    launch_module.fast_launch_enabled.cache_clear()
    assert launch_module.fast_launch_enabled(), "the relaunch is off on this GPU (Triton without knobs?)"
    before = len(launch_module._COMPILED)
    x = torch.randn(4096 + 8, device="cuda")
    for n, start in ((4096, 0), (4096, 0), (4001, 0), (4001, 0), (4096, 1), (4096, 1), (1, 0)):
        src = x[start : start + n]
        out = torch.full((n,), float("nan"), device="cuda")
        launch(scale_kernel, (-(-n // 128),), False, **_args(src, out, n, scale=1.5, block=128))
        torch.testing.assert_close(out, 1.5 * src)
    assert len(launch_module._COMPILED) - before == 4  # (4096, aligned), (4001: not 16 | n), (misaligned), (n == 1)
    monkeypatch.setenv("KVFLASH_VALIDATE", "1")
    validation_enabled.cache_clear()
    launch_module.fast_launch_enabled.cache_clear()
    try:
        out = torch.empty(4096, device="cuda")
        launch(scale_kernel, (32,), False, **_args(x[:4096], out, 4096, scale=2.0, block=128))
        torch.testing.assert_close(out, 2 * x[:4096])
    finally:
        monkeypatch.delenv("KVFLASH_VALIDATE")
        validation_enabled.cache_clear()
        launch_module.fast_launch_enabled.cache_clear()
