"""The prefill isolation tool (tools/prefill_isolation.py) off the GPU: both rewritten copies build from the package's
current source (everything they look for found, the copies valid Python) and do what their names say."""

import ast

import pytest

from tools import prefill_isolation as isolation
from tools.prefill_case import PACKAGE


def _functions(path):
    return {f.name: f for f in ast.walk(ast.parse(path.read_text())) if isinstance(f, ast.FunctionDef)}


def _calls(function) -> list[str]:
    return [ast.unparse(c.func) for c in ast.walk(function) if isinstance(c, ast.Call)]


def test_the_producer_alone_copy_hands_slots_back_and_keeps_the_signatures(tmp_path):
    folder = isolation.build_variant(tmp_path, "producer alone")
    copy = _functions(folder / "kvflash" / "chunk_prefill" / "hopper_key_tiles.py")
    landed = _functions(PACKAGE / "hopper_key_tiles.py")
    for name in ("_consumer_step_pv_fp8", "item_tiles_pv16"):  # the fp8 step, the 16-bit walk
        assert ast.unparse(copy[name].args) == ast.unparse(landed[name].args)
        calls = _calls(copy[name])
        assert not {"warpgroup_mma", "warpgroup_mma_wait", "_softmax", "_consumer_step"} & set(calls), name
        assert calls.count("mbarrier.wait") == 2 and "mbarrier.arrive" in calls, name
        assert name + "_landed" in copy  # the landed body stays, renamed and unused
    # the fp8 walk no longer issues the first S (the landed walk does)
    assert "warpgroup_mma" not in _calls(copy["item_tiles_pv_fp8"])
    assert "warpgroup_mma" in _calls(landed["item_tiles_pv_fp8"])


def test_the_consumers_alone_copy_loads_nothing(tmp_path):
    folder = isolation.build_variant(tmp_path, "consumers alone")
    copy = _functions(folder / "kvflash" / "chunk_prefill" / "hopper_producer.py")
    landed = _functions(PACKAGE / "hopper_producer.py")
    calls = _calls(copy["_load_item_k_as_stored"])
    assert not {"_gather_kv", "transpose_v_tile", "widen_tile", "widen_v_tile"} & set(calls)
    assert _calls(landed["_load_item_k_as_stored"]).count("_gather_kv") == 2
    # it still takes every free slot and publishes it
    assert {"mbarrier.wait", "mbarrier.arrive"} <= set(calls)
    # and the bf16 query comes to it: the copy's launcher chooses no TMA loader (the landed one does)
    chooses = "tma_loader = kv_fp8 and head_size in TMA_LOADER_HEAD_SIZES.get(q.dtype, ())"
    assert chooses in (PACKAGE / "hopper_op.py").read_text()
    op_copy = (folder / "kvflash" / "chunk_prefill" / "hopper_op.py").read_text()
    assert chooses not in op_copy and "    tma_loader = False" in op_copy


def test_the_landed_variant_is_the_package(tmp_path):
    folder = isolation.build_variant(tmp_path, "landed")
    for name in ("hopper_key_tiles.py", "hopper_producer.py", "hopper_op.py"):
        assert (folder / "kvflash" / "chunk_prefill" / name).read_text() == (PACKAGE / name).read_text()


def test_an_unknown_variant_and_a_changed_source_are_errors(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        isolation.build_variant(tmp_path, "neither")
    with pytest.raises(RuntimeError, match="_load_item_k_as_stored"):
        isolation.consumers_alone_edits("def f():\n    pass\n")
    with pytest.raises(RuntimeError, match="item_tiles_pv_fp8"):
        isolation.producer_alone_edits("def f():\n    pass\n")
    with pytest.raises(RuntimeError, match="TMA loader"):
        isolation.no_tma_loader_edits("def f():\n    pass\n")
