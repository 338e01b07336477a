"""``python -m tools.bench`` on the CPU: the benchmark's and the sweeps' command lines answer ``--help`` (no GPU,
no kernel launched), the case list prints with ``--dry-run``, and a sweep spec string becomes its settings."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tools.bench.sweep import check_fields, parse_sweep

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_bench_help():
    run = _bench("--help")
    assert run.returncode == 0, run.stderr
    assert "--quick" in run.stdout and "--only" in run.stdout and "--out" in run.stdout and "sweep" in run.stdout


@pytest.mark.parametrize(
    "command, shown",
    [("sweep", "{decode,prefill,cache}"), ("sweep decode", "--sweep SPEC"), ("sweep decode", "--q-len"),
     ("sweep prefill", "--fp8-query"), ("sweep cache", "block_rows"), ("report", "--from")],
)  # fmt: skip
def test_subcommand_help(command, shown):
    run = _bench(*command.split(), "--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: python -m tools.bench {command}") and shown in run.stdout


def test_dry_run_lists_the_cases():
    run = _bench("--dry-run", "--quick", "--only", "decode,cache")
    assert run.returncode == 0, run.stderr
    assert "ceiling  copy" in run.stdout and "decode 64x4096" in run.stdout and "cache fp8_e4m3 kvflash" in run.stdout


def test_a_bad_spec_is_a_usage_error():
    run = _bench("sweep", "cache", "--sweep", "warps=four")
    assert run.returncode == 2 and "name=v1,v2" in run.stderr


def test_sweep_spec_is_the_product_of_its_fields():
    assert parse_sweep("kv_heads=1,4;block_n=32,64") == [
        {"kv_heads": 1, "block_n": 32},
        {"kv_heads": 1, "block_n": 64},
        {"kv_heads": 4, "block_n": 32},
        {"kv_heads": 4, "block_n": 64},
    ]
    assert parse_sweep(" warps=4 ; stages=2,3 ;") == [
        {"num_warps": 4, "num_stages": 2},
        {"num_warps": 4, "num_stages": 3},
    ]
    assert parse_sweep("splits=1,8") == [{"num_splits": 1}, {"num_splits": 8}]
    assert parse_sweep("") == []


@pytest.mark.parametrize("spec", ["block_n", "block_n=", "block_n=a", "=4", "block_n=1;block_n=2"])
def test_sweep_spec_errors(spec):
    with pytest.raises(ValueError, match="--sweep"):
        parse_sweep(spec)


def test_fields_are_checked_against_the_config():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Config:
        block_n: int
        num_warps: int

    check_fields(parse_sweep("block_n=16;warps=4,8"), Config)
    with pytest.raises(ValueError, match="no field"):
        check_fields(parse_sweep("block_m=64"), Config)
