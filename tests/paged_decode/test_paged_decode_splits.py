"""Split-KV: forced split counts give the same answer as no split; sinks are counted once across splits."""

import pytest
import torch

from kvflash.paged_decode import paged_decode_attention
from kvflash.paged_decode.launch_config import RESIDENT_PROGRAMS_PER_SM, choose_paged_decode_config, resolve_num_splits

from ..cases import check_paged_decode, make_case


@pytest.mark.parametrize("with_sinks", [False, True])
def test_forced_splits_agree(device, with_sinks):
    # 300 keys = 19 tiles of 16 under the interpreter: 16 splits really are 16 (short rows leave some empty).
    case = make_case([(1, 300), (1, 5), (1, 0), (1, 131)], num_q_heads=4, num_kv_heads=2, device=device, seed=21)
    features = {"s_aux": torch.tensor([1.5, -0.5, 0.0, 3.0], device=device)} if with_sinks else {}
    outs = [check_paged_decode(case, num_splits=n, **features) for n in (1, 3, 16)]
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], atol=2e-3, rtol=0)
        torch.testing.assert_close(lse, outs[0][1], atol=1e-4, rtol=1e-4)


def test_sinks_on_empty_sequence(device):
    """No keys but a sink: out = 0 and lse = the sink's logit (with and without splits)."""
    case = make_case([(1, 0), (1, 40)], num_q_heads=2, num_kv_heads=1, device=device, seed=22)
    sinks = torch.tensor([0.7, -2.0], device=device)
    for n in (1, 4):
        out, lse = paged_decode_attention(case.q, case.k, case.v, case.max_seqlen_k, s_aux=sinks, num_splits=n,
                                          return_lse=True, **case.kwargs)  # fmt: skip
        assert torch.all(out[0] == 0)
        torch.testing.assert_close(lse[:, 0], sinks)


def test_automatic_splits_from_shapes_only():
    common = dict(num_kv_heads=8, group=4, head_size=128, kv_itemsize=2, window_left=-1, num_splits=0,
                  multiprocessor_count=132, interpreter=False)  # fmt: skip
    many = choose_paged_decode_config(num_seqs=128, max_seqlen_k=8192, **common)
    long_one = choose_paged_decode_config(num_seqs=1, max_seqlen_k=131072, **common)
    short_one = choose_paged_decode_config(num_seqs=1, max_seqlen_k=100, **common)
    windowed = choose_paged_decode_config(num_seqs=1, max_seqlen_k=131072, **{**common, "window_left": 127})
    assert many.num_splits == 1
    assert long_one.num_splits > 16
    assert short_one.num_splits == 1
    assert windowed.num_splits == 1
    assert long_one == choose_paged_decode_config(num_seqs=1, max_seqlen_k=131072, **common)
    # Splits fill one wave of programs without passing it (a partial second wave leaves a slow tail).
    four = choose_paged_decode_config(num_seqs=4, max_seqlen_k=32768, **common)
    per_sm = RESIDENT_PROGRAMS_PER_SM[2]
    assert 4 * 8 * four.num_splits <= 132 * per_sm < 4 * 8 * (four.num_splits + 1)


def test_forced_split_count_is_an_upper_bound():
    kw = dict(num_programs=8, block_n=64, multiprocessor_count=132, programs_per_sm=4)
    assert resolve_num_splits(1, max_keys=10**6, **kw) == 1
    assert resolve_num_splits(5, max_keys=10**6, **kw) == 5
    assert resolve_num_splits(16, max_keys=100, **kw) == 2  # only two tiles of keys
    assert resolve_num_splits(0, max_keys=0, **kw) == 1
