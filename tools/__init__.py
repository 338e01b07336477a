"""The repository's tools: the benchmark and tuning sweeps (:mod:`tools.bench`), the demo, the GPU test tier
(``gpu_check.py``) and the checks it runs on the device machine. Run from the repository root:
``python -m tools.bench ...``; the scripts also run by path (``python3 tools/demo.py``)."""
