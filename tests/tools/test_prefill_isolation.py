"""The prefill isolation tool (tools/prefill_isolation.py) off the GPU: both rewritten copies build from the package's
current source (every anchor found once, the copies valid Python) and do what their names say."""

import ast

import pytest

from tools import prefill_isolation as isolation
from tools.source_edits import apply_anchor_edits


def _functions(path):
    return {f.name: f for f in ast.walk(ast.parse(path.read_text())) if isinstance(f, ast.FunctionDef)}


def _calls(function) -> list[str]:
    return [ast.unparse(c.func) for c in ast.walk(function) if isinstance(c, ast.Call)]


def test_the_producer_alone_copy_hands_slots_back_and_keeps_the_signature(tmp_path):
    folder = isolation.build_variant(tmp_path, "producer alone")
    copy = _functions(folder / "kvflash" / "chunk_prefill" / "hopper_key_tiles.py")
    landed = _functions(isolation.PACKAGE / "hopper_key_tiles.py")
    step = copy["_consumer_step_pv_fp8"]
    assert ast.unparse(step.args) == ast.unparse(landed["_consumer_step_pv_fp8"].args)
    calls = _calls(step)
    assert "warpgroup_mma" not in calls and "_softmax" not in calls
    assert calls.count("mbarrier.wait") == 2 and calls.count("mbarrier.arrive") == 2
    # the item walk no longer issues the first S (the landed walk does)
    assert "warpgroup_mma" not in _calls(copy["item_tiles_pv_fp8"])
    assert "warpgroup_mma" in _calls(landed["item_tiles_pv_fp8"])


def test_the_consumers_alone_copy_loads_nothing_for_an_fp8_query(tmp_path):
    folder = isolation.build_variant(tmp_path, "consumers alone")
    load = _functions(folder / "kvflash" / "chunk_prefill" / "hopper_producer.py")["_load_item_k_as_stored"]
    text = ast.unparse(load)
    assert "transpose_v_tile" not in _calls(load)
    assert text.count("if not PV_FP8:") == 2  # both gathers (tile 0 and the next tiles) guarded
    assert _calls(load).count("_gather_kv") == 2


def test_the_landed_variant_is_the_package(tmp_path):
    folder = isolation.build_variant(tmp_path, "landed")
    for name in ("hopper_key_tiles.py", "hopper_producer.py"):
        assert (folder / "kvflash" / "chunk_prefill" / name).read_text() == (isolation.PACKAGE / name).read_text()


def test_an_unknown_variant_and_a_missing_anchor_are_errors(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        isolation.build_variant(tmp_path, "neither")
    with pytest.raises(RuntimeError, match="occurs 0 times"):
        apply_anchor_edits("def f():\n    pass\n", isolation.consumers_alone_edits(), "hopper_producer.py")
    with pytest.raises(RuntimeError, match="_consumer_step_pv_fp8"):
        isolation.producer_alone_edits("def f():\n    pass\n")
