"""Inputs a caller gets wrong, and inputs the CPU path used to get wrong: never a crash, never a silent wrong
number, and with ``KVFLASH_VALIDATE=1`` an error naming the argument and the first bad index.

The memory-safety cases (index values past what the tensors hold) run in a child process through
``tools/memcheck_cases.py`` (the same script the GPU tier runs under compute-sanitizer): a kernel that reads
or writes out of bounds may kill its process, and that must fail one test here, not the whole session.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from kvflash.attn_common import validation_enabled
from kvflash.attn_common.launch import fast_launch_enabled
from kvflash.attn_common.testing import poison

from ..cases import check_against_reference, make_case

ROOT = pathlib.Path(__file__).resolve().parents[2]
MEMCHECK_CASES = [
    "seqused_k_beyond_block_table_prefill",
    "seqused_k_beyond_block_table_decode",
    "block_ids_out_of_range_prefill",
    "block_ids_out_of_range_decode",
    "cu_seqlens_q_past_total_q",
    "cu_seqlens_q_not_from_zero",
    "cu_seqlens_q_decreasing",
    "cu_seqlens_q_garbage_decode_route",
    "cu_seqlens_k_past_total_k",
    "query_lengths_2_0_on_the_decode_route",
    "writer_slots_outside_the_cache",
    "normal_prefill_fp8",
    "normal_decode_fp8",
    "normal_writer_fp8",
]


@pytest.fixture(scope="module")
def memcheck_lines() -> tuple[dict[str, str], str]:
    """Run every case of tools/memcheck_cases.py once in a child process; its result line per case."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "memcheck_cases.py"), "--device", device],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    lines = {}
    for line in run.stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.strip().split(":")[0]
        if status in ("ok", "FAIL"):
            lines[name] = line
    log = f"exit status {run.returncode}\nstdout:\n{run.stdout}\nstderr (tail):\n{run.stderr[-3000:]}"
    return lines, log


@pytest.mark.parametrize("name", MEMCHECK_CASES)
def test_malformed_index_values_stay_in_bounds(memcheck_lines, name):
    lines, log = memcheck_lines
    assert name in lines, f"{name}: no result line (the child process died before it?)\n{log}"
    assert lines[name].startswith("ok "), f"{lines[name]}\n{log}"


DECODE_MIX = [(1, 37), (1, 1), (1, 70), (1, 0)]
MIXED_MIX = [(1, 37), (9, 9), (5, 41), (1, 1), (3, 0)]


@pytest.mark.parametrize("mix", [DECODE_MIX, MIXED_MIX], ids=["decode", "mixed"])
@pytest.mark.parametrize("block_size", [16, None], ids=["paged", "contiguous"])
def test_bf16_q_and_cache_on_every_device(device, mix, block_size):
    """bf16 q over a bf16 cache: right under the interpreter too (its bf16 tl.dot is wrong; the kernels
    take fp32 dots there), on both routes."""
    case = make_case(mix, num_q_heads=6, num_kv_heads=2, q_dtype=torch.bfloat16, block_size=block_size, device=device,
                     seed=41)  # fmt: skip
    features = dict(causal=True, window_size=(20, -1), softcap=4.0)
    out = poison(torch.empty_like(case.q))
    _, lse = case.attend(out=out, return_softmax_lse=True, **features)
    check_against_reference(case, out, lse, **features)


@pytest.mark.parametrize(
    "q_lens", [[2, 0], [0, 2], [0, 3, 0], [1, 2, 0], [0, 0, 1, 2]], ids=lambda q: "-".join(map(str, q))
)
@pytest.mark.parametrize("num_splits, causal, window", [(1, True, (9, -1)), (3, True, (9, -1)), (3, False, (5, 2))])
@pytest.mark.parametrize("block_size", [16, None], ids=["paged", "contiguous"])
def test_decode_route_serves_any_split_of_the_rows(device, q_lens, num_splits, causal, window, block_size):
    """max_seqlen_q=1 with total_q == num_seqs goes to the decode kernel even when a sequence has two or more
    queries (the caller's max_seqlen_q is wrong): every row must still be right, at its own position."""
    mix = [(n, kv) for n, kv in zip(q_lens, [23, 40, 7, 31])]
    case = make_case(mix, num_q_heads=4, num_kv_heads=2, block_size=block_size, device=device,
                     seed=sum(q_lens) + len(q_lens))  # fmt: skip
    case = dataclasses.replace(case, max_seqlen_q=1)
    slopes = torch.rand(4, device=device) * 0.2
    features = dict(causal=causal, window_size=window, alibi_slopes=slopes, s_aux=torch.randn(4, device=device))
    out = poison(torch.empty_like(case.q))
    _, lse = case.attend(out=out, return_softmax_lse=True, num_splits=num_splits, **features)
    check_against_reference(case, out, lse, **features)


def _reread_validate_mode():
    """Validate mode is read once, and the fast launch (hence call plans, whose replays skip the checks) reads it
    too: both caches are cleared so a plan built before the switch cannot serve a call made after it."""
    validation_enabled.cache_clear()
    fast_launch_enabled.cache_clear()


@pytest.fixture
def validate_on(monkeypatch):
    monkeypatch.setenv("KVFLASH_VALIDATE", "1")
    _reread_validate_mode()
    yield
    monkeypatch.delenv("KVFLASH_VALIDATE")
    _reread_validate_mode()


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _bad_block_table(case, device):
    table = case.kv_args["block_table"].clone()
    table[1, 0] = case.k.shape[0] + 3
    return dict(block_table=table)


VALIDATE_CASES = [
    # (id, sequence mix, change to the call, message pattern)
    ("cu_q_not_from_zero", MIXED_MIX, lambda c, d: dict(cu_seqlens_q=c.cu_seqlens_q + 1),
     r"cu_seqlens_q: must start at 0, got cu_seqlens_q\[0\] = 1"),
    ("cu_q_decreasing", MIXED_MIX, lambda c, d: dict(cu_seqlens_q=_i32([0, 1, 10, 8, 16, 19], d)),
     r"cu_seqlens_q: must not decrease, got cu_seqlens_q\[3\] = 8 < cu_seqlens_q\[2\] = 10"),
    ("cu_q_past_total", MIXED_MIX, lambda c, d: dict(cu_seqlens_q=_i32([0, 1, 10, 15, 16, 25], d)),
     r"cu_seqlens_q: must end at total_q = 19, got cu_seqlens_q\[5\] = 25"),
    ("max_seqlen_q_lie", [(2, 20), (0, 9)], lambda c, d: dict(max_seqlen_q=1),
     r"max_seqlen_q: sequence 0 has 2 queries"),
    ("block_id", MIXED_MIX, _bad_block_table, r"block_table: page ids must be in \[0, num_blocks = \d+\), "
     r"got block_table\[1, 0\]"),
    ("seqused_past_max", MIXED_MIX, lambda c, d: dict(seqused_k=_i32([37, 9, 42, 1, 0], d)),
     r"seqused_k: expected values in \[0, max_seqlen_k = 41\], got seqused_k\[2\] = 42"),
    ("seqused_negative_decode", DECODE_MIX, lambda c, d: dict(seqused_k=_i32([37, -1, 70, 0], d)),
     r"seqused_k: expected values in \[0, max_seqlen_k = 70\], got seqused_k\[1\] = -1"),
]  # fmt: skip


@pytest.mark.parametrize("mix, change, match", [c[1:] for c in VALIDATE_CASES], ids=[c[0] for c in VALIDATE_CASES])
def test_validate_mode_names_the_first_bad_index(device, validate_on, mix, change, match):
    case = make_case(mix, device=device, seed=3)
    _attend_changed(case, change(case, device), match)


def _attend_changed(case, changes, match):
    """``case.attend`` with ``changes``: the case's own fields are replaced, the rest passed as arguments."""
    fields = {f.name for f in dataclasses.fields(case)}
    case = dataclasses.replace(case, **{n: v for n, v in changes.items() if n in fields})
    with pytest.raises(ValueError, match=match):
        case.attend(**{n: v for n, v in changes.items() if n not in fields})


def test_validate_mode_contiguous_lengths(device, validate_on):
    case = make_case(MIXED_MIX, block_size=None, device=device, seed=4)
    total_k = case.k.shape[0]
    _attend_changed(case, dict(cu_seqlens_k=_i32([0, 37, 30, 76, 77, total_k], device)),
                    r"cu_seqlens_k: must not decrease, got cu_seqlens_k\[2\] = 30")
    _attend_changed(case, dict(cu_seqlens_k=_i32([0, 37, 46, 87, 88, total_k + 1], device)),
                    rf"cu_seqlens_k: must end at most at {total_k} \(the rows of k\)")
    _attend_changed(case, dict(max_seqlen_k=40), r"max_seqlen_k: sequence 2 has 41 keys")  # fmt: skip


@pytest.mark.parametrize("mix", [DECODE_MIX, MIXED_MIX], ids=["decode", "mixed"])
def test_validate_mode_accepts_good_calls(device, validate_on, mix):
    case = make_case(mix, device=device, seed=5)
    out = case.attend(causal=True)
    assert torch.isfinite(out).all()


def test_validate_mode_is_off_by_default_and_read_once(monkeypatch):
    monkeypatch.delenv("KVFLASH_VALIDATE", raising=False)
    validation_enabled.cache_clear()
    assert validation_enabled() is False
    monkeypatch.setenv("KVFLASH_VALIDATE", "1")
    assert validation_enabled() is False, "the variable is read once, at the first call"
    validation_enabled.cache_clear()
