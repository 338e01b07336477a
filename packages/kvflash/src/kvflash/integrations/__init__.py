"""kvflash.integrations: adapters that plug kvflash's kernels into inference engines.

- :mod:`kvflash.integrations.transformers` — Hugging Face transformers' ``AttentionInterface``
  (``"kvflash"`` for ``generate``, ``"paged|kvflash"`` for continuous batching).
- :mod:`kvflash.integrations.vllm` — a vLLM attention backend (``--attention-backend CUSTOM``).

Neither engine is a dependency of kvflash: each module imports its engine only when used and raises an
``ImportError`` naming it when it is missing.
"""
