"""kvflash's engine integrations where the engines are absent (the kernel packages' own test environments):
the modules import, name the missing engine in an ImportError, and no package depends on an engine."""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_TRANSFORMERS, reason="transformers is installed; tests/integrations covers it")
def test_transformers_register_names_transformers():
    import kvflash.integrations.transformers as kvflash_hf  # importing never needs transformers

    with pytest.raises(ImportError, match="transformers"):
        kvflash_hf.register()
    with pytest.raises(ImportError, match="transformers"):
        kvflash_hf.register_fp8()


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed; tests/integrations covers it")
def test_vllm_backend_names_vllm():
    import kvflash.integrations.vllm as kvflash_vllm  # importing never needs vLLM

    with pytest.raises(ImportError, match="vllm"):
        kvflash_vllm.register()
    for name in ("KvflashAttentionBackend", "KvflashAttentionImpl", "KvflashMetadataBuilder"):
        with pytest.raises(ImportError, match="vllm"):
            getattr(kvflash_vllm, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        kvflash_vllm.no_such_name  # noqa: B018


def _section(text: str, header: str) -> str:
    """The lines of one TOML table or array (plain text: tomllib is Python 3.11+ and we support 3.10)."""
    match = re.search(rf"^{re.escape(header)}\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def test_engines_are_extras_only():
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        text = pyproject.read_text()
        required = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
        assert "transformers" not in required and "vllm" not in required, f"{pyproject.parent.name}: {required}"
    text = (ROOT / "packages" / "kvflash" / "pyproject.toml").read_text()
    extras = _section(text, "[project.optional-dependencies]")
    assert re.search(r'^transformers = \["transformers', extras, re.M) and re.search(r'^vllm = \["vllm', extras, re.M)
    plugins = _section(text, '[project.entry-points."vllm.general_plugins"]')
    assert 'kvflash = "kvflash.integrations.vllm:register"' in plugins
