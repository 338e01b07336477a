"""attn_common.validate (KVFLASH_VALIDATE=1): the checks of index values, each naming the argument and the
first bad index; off by default, where it reads nothing (meta tensors pass through untouched)."""

import pytest
import torch

from kvflash.attn_common import validate_index_tensors, validation_enabled


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setenv("KVFLASH_VALIDATE", "1")
    validation_enabled.cache_clear()
    yield
    monkeypatch.delenv("KVFLASH_VALIDATE")
    validation_enabled.cache_clear()


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


Q = torch.zeros(6, 2, 8)
PAGED_K = torch.zeros(5, 4, 1, 8)  # 5 pages of 4 tokens
GOOD = dict(cu_seqlens_q=i32(0, 2, 2, 6), block_table=i32(0, 4, 1, 2, 3, 0).view(3, 2), seqused_k=i32(5, 0, 8),
            cu_seqlens_k=None, max_seqlen_q=4, max_seqlen_k=8)  # fmt: skip


def test_off_by_default_reads_nothing(monkeypatch):
    monkeypatch.delenv("KVFLASH_VALIDATE", raising=False)
    validation_enabled.cache_clear()
    meta = {n: (t.to("meta") if isinstance(t, torch.Tensor) else t) for n, t in GOOD.items()}
    validate_index_tensors(Q.to("meta"), PAGED_K.to("meta"), **meta)  # would fail if it read a value


def test_good_paged_call_passes(enabled):
    validate_index_tensors(Q, PAGED_K, **GOOD)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cu_seqlens_q=i32(1, 2, 2, 6)), r"cu_seqlens_q: must start at 0, got cu_seqlens_q\[0\] = 1"),
        (dict(cu_seqlens_q=i32(0, 3, 2, 6)), r"cu_seqlens_q: must not decrease, got cu_seqlens_q\[2\] = 2"),
        (dict(cu_seqlens_q=i32(0, 2, 2, 5)), r"cu_seqlens_q: must end at total_q = 6, got cu_seqlens_q\[3\] = 5"),
        (dict(max_seqlen_q=3), r"max_seqlen_q: sequence 2 has 4 queries"),
        (dict(seqused_k=i32(5, 0, 9)), r"seqused_k: expected values in \[0, max_seqlen_k = 8\], got seqused_k\[2\]"),
        (dict(block_table=i32(0, 5, 1, 2, 3, 0).view(3, 2)), r"block_table: .*got block_table\[0, 1\] = 5"),
        (dict(block_table=i32(0, 4, 1, 2, -1, 0).view(3, 2)), r"block_table: .*got block_table\[2, 0\] = -1"),
    ],
)  # fmt: skip
def test_bad_values_name_the_argument_and_index(enabled, change, match):
    with pytest.raises(ValueError, match=match):
        validate_index_tensors(Q, PAGED_K, **{**GOOD, **change})


def test_unused_table_entries_are_not_checked(enabled):
    """Entries past a sequence's pages are padding (engines fill them with anything, -1 included)."""
    validate_index_tensors(Q, PAGED_K, **{**GOOD, "block_table": i32(0, 4, -1, 99, 3, 0).view(3, 2)})


def test_contiguous_offsets(enabled):
    k = torch.zeros(10, 1, 8)
    base = dict(GOOD, block_table=None, seqused_k=None, cu_seqlens_k=i32(0, 4, 4, 10))
    validate_index_tensors(Q, k, **base)
    with pytest.raises(ValueError, match=r"cu_seqlens_k: must end at most at 10 \(the rows of k\), got cu_seqlens_k"):
        validate_index_tensors(Q, k, **{**base, "cu_seqlens_k": i32(0, 4, 4, 11)})
    with pytest.raises(ValueError, match=r"max_seqlen_k: sequence 2 has 6 keys"):
        validate_index_tensors(Q, k, **{**base, "max_seqlen_k": 5})
    # seqused_k caps the length: then 6 keys become 5
    validate_index_tensors(Q, k, **{**base, "max_seqlen_k": 5, "seqused_k": i32(4, 0, 5)})
