"""Which FP8-cache calls the Hopper kernel serves with the one-warp TMA loader (hopper_op.launch_hopper_prefill's
launch arguments, captured instead of launched: no GPU needed)."""

import pytest
import torch

from kvflash.chunk_prefill import hopper_op


@pytest.mark.parametrize(
    "q_dtype, head_size, loader",
    [(torch.bfloat16, 128, True), (torch.bfloat16, 64, False), (torch.bfloat16, 256, False),
     (torch.float16, 128, True), (torch.float16, 64, True), (torch.float16, 256, False),
     (torch.float8_e4m3fn, 128, False)],
)
def test_which_exact_fp8_calls_take_the_tma_loader(monkeypatch, q_dtype, head_size, loader):
    captured = {}
    monkeypatch.setattr(hopper_op, "launch", lambda kernel, grid, _, **kwargs: captured.update(kwargs))
    monkeypatch.setattr(hopper_op, "multiprocessor_count", lambda device: 132)
    num_seqs, hkv = 2, 2
    q = torch.zeros(64, 4 * hkv, head_size).to(q_dtype)
    k = torch.zeros(32, 16, hkv, head_size).to(torch.float8_e4m3fn)
    descale = torch.ones(num_seqs, hkv)
    hopper_op.launch_hopper_prefill(
        q, k, k.clone(), torch.empty(64, 4 * hkv, head_size, dtype=torch.bfloat16), None,
        torch.tensor([0, 32, 64], dtype=torch.int32), block_table=torch.zeros(num_seqs, 16, dtype=torch.int32),
        seqused_k=torch.full((num_seqs,), 64, dtype=torch.int32), softmax_scale=0.1, k_descale=descale,
        v_descale=descale, skip_q_len=0, q_descale=descale if q_dtype == torch.float8_e4m3fn else None,
    )  # fmt: skip
    assert captured["TMA_LOADER"] is loader
    if loader:  # 16 warps: 128 registers each at launch, re-split by warpgroup
        assert captured["maxnreg"] == hopper_op.TMA_LOADER_MAX_REGISTERS
        assert (captured["CONSUMER_REGS"], captured["PRODUCER_REGS"], captured["LOADER_REGS"]) == (208, 56, 40)
        assert 2 * 128 * 208 + 128 * 56 + 128 * 40 <= 65536
