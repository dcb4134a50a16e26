"""tools/kernel_resources.py compiles the norm kernels for an H100 without one and reads back
registers, spills and shared memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import triton

REPO = Path(__file__).resolve().parents[2]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _run(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(REPO / "tools" / "kernel_resources.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_reports_every_candidate_and_finds_the_long_row_spills(tmp_path, monkeypatch):
    assert (TOOLS / "ptxas").exists() and (TOOLS / "cuobjdump").exists(), "this Triton wheel ships no ptxas"
    out = tmp_path / "resources.json"
    proc = _run("--kinds", "layer_norm", "--direction", "backward", "--hiddens", "1024,16384",
                "--variants", "plain,two_pass", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    from megatron_lite.kernels import layernorm

    # One row per candidate the GPU tuner would time (rows per program x warps x variant), none left out.
    monkeypatch.setattr(layernorm, "interpreting", lambda: False)  # the candidates a GPU gets
    want = set()
    for hidden in (1024, 16384):
        for rows_per_block, warps in layernorm._candidates(hidden, 2, layernorm._BWD_BYTES_PER_THREAD):
            for variant in {"plain", "two_pass"} & set(layernorm._backward_variants(rows_per_block, hidden)):
                want.add((hidden, rows_per_block, warps, variant))
    assert len(want) == 9
    assert {(r["hidden"], r["rows"], r["warps"], r["variant"]) for r in rows} == want
    for r in rows:
        assert 16 <= r["registers"] <= 255
        assert r["shared_bytes"] > 0  # the row reductions go through shared memory
    # 1024-wide rows fit in registers; a whole 16384-wide row with its two fp32 running sums
    # cannot (32 registers per thread for the sums alone at 32 warps, out of 64), so the plain
    # kernel spills there, and reading the row twice spills less.
    assert all(r["spill_bytes"] == 0 and r["spill_stores"] == 0 for r in rows if r["hidden"] == 1024)
    long_rows = {(r["warps"], r["variant"]): r for r in rows if r["hidden"] == 16384}
    assert long_rows[(32, "plain")]["spill_bytes"] > 0 and long_rows[(32, "plain")]["spill_stores"] > 0
    assert long_rows[(32, "two_pass")]["spill_bytes"] < long_rows[(32, "plain")]["spill_bytes"]
    assert "| layer_norm backward | 16384 | 1 x 32 | plain |" in proc.stdout


def test_refuses_to_run_under_the_interpreter():
    proc = _run("--hiddens", "1024", interpret=True)
    assert proc.returncode != 0
    assert "unset TRITON_INTERPRET (the interpreter has no registers)" in proc.stderr


def test_unknown_variant_and_kernel_are_named():
    proc = _run("--variants", "plain,fast")
    assert proc.returncode == 2 and "unknown backward variant(s) fast: choose from plain, prefetch" in proc.stderr
    proc = _run("--kinds", "group_norm")
    assert proc.returncode == 2 and "unknown kernel 'group_norm'" in proc.stderr
