"""kvflash's benchmark and tuning sweeps, one package (run from the repository root).

    python -m tools.bench [--quick] [--only decode,prefill] [--out DIR] [--dry-run]   # the benchmark (GPU)
    python -m tools.bench report --from DIR/results.json                               # BENCHMARKS.md again
    python -m tools.bench sweep decode --sweep "kv_heads=1,4;block_n=32,64"            # tuning sweeps (GPU)
    python -m tools.bench.host_profile | python -m tools.bench.host_replay              # host cost, on the CPU

Modules: ``suite`` (the run), ``case`` (a case and its row), ``timing``, ``inputs``, ``ceilings`` (copy
bandwidth and matmul rates), ``cases_*`` (one per group), ``analysis`` / ``report`` / ``plot`` (from the
results JSON, no GPU), ``sweep`` (launch-config sweeps). Nothing is imported here: ``report`` runs without torch.
"""
