"""tools/kernel_resources.py compiles the kernels for an H100 without one and reads back
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
                          capture_output=True, text=True, timeout=900)


def test_reports_every_candidate_and_finds_the_long_row_spills(tmp_path, monkeypatch):
    assert (TOOLS / "ptxas").exists() and (TOOLS / "cuobjdump").exists(), "this Triton wheel ships no ptxas"
    out = tmp_path / "resources.json"
    proc = _run("--kernels", "norms,cross_entropy", "--norms", "layer_norm", "--direction", "backward",
                "--hiddens", "1024,16384", "--variants", "plain,two_pass", "--vocabs", "50304", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    from megatron_lite.kernels import layernorm

    # One row per candidate the GPU tuner would time (rows per program x warps x variant), none left out.
    monkeypatch.setattr(layernorm, "interpreting", lambda: False)  # the candidates a GPU gets
    want = set()
    for hidden in (1024, 16384):
        for rows_per_block, warps in layernorm._candidates(hidden, 2, layernorm._BWD_BYTES_PER_THREAD):
            for variant in {"plain", "two_pass"} & set(layernorm._backward_variants(rows_per_block, hidden)):
                want.add((hidden, f"{rows_per_block} x {warps}", variant))
    assert len(want) == 9
    norms = [r for r in rows if r["kernel"] == "layer_norm backward"]
    assert {(r["size"], r["setting"], r["variant"]) for r in norms} == want
    for r in rows:
        assert 16 <= r["registers"] <= 255
        assert r["shared_bytes"] > 0 or r["kernel"] == "cross_entropy backward"  # reductions use shared memory
    # 1024-wide rows fit in registers; a whole 16384-wide row with its two fp32 running sums
    # cannot (32 registers per thread for the sums alone at 32 warps, out of 64), so the plain
    # kernel spills there, and reading the row twice spills less.
    assert all(r["spill_bytes"] == 0 and r["spill_stores"] == 0 for r in norms if r["size"] == 1024)
    long_rows = {(r["setting"], r["variant"]): r for r in norms if r["size"] == 16384}
    plain, two_pass = long_rows[("1 x 32", "plain")], long_rows[("1 x 32", "two_pass")]
    assert plain["spill_bytes"] > 0 and plain["spill_stores"] > 0
    assert two_pass["spill_bytes"] < plain["spill_bytes"]
    # The cross-entropy backward streams its row: every chunk length compiles without a spill.
    loss_rows = [r for r in rows if r["kernel"] == "cross_entropy backward"]
    assert {r["setting"] for r in loss_rows} == {"4096 x 8", "2048 x 4", "8192 x 16", "16384 x 16", "16384 x 32"}
    assert all(r["spill_bytes"] == 0 for r in loss_rows)
    assert "| layer_norm backward | 16384 | 1 x 32 | plain |" in proc.stdout


def test_attention_configurations_stage_their_tiles(tmp_path):
    out = tmp_path / "attention.json"
    proc = _run("--kernels", "attention", "--direction", "forward", "--head-dims", "64", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    from megatron_lite.kernels import attention

    assert len(rows) == len(attention._FWD_CONFIGS) and all(r["kernel"] == "attention forward causal" for r in rows)
    for r in rows:
        # K/V tiles come through shared memory: by cp.async, or by bulk (TMA) copy where the
        # configuration asks for it, never both.
        if r["setting"].endswith("TMA"):
            assert r["bulk_copies"] > 0 and r["async_copies"] == 0
        else:
            assert r["async_copies"] > 0 and r["bulk_copies"] == 0
        assert r["shared_bytes"] >= 16 * 1024


def test_refuses_to_run_under_the_interpreter():
    proc = _run("--hiddens", "1024", interpret=True)
    assert proc.returncode != 0
    assert "unset TRITON_INTERPRET (the interpreter has no registers)" in proc.stderr


def test_unknown_names_are_named():
    proc = _run("--variants", "plain,fast")
    assert proc.returncode == 2 and "unknown backward variant(s) fast: choose from plain, prefetch" in proc.stderr
    proc = _run("--norms", "group_norm")
    assert proc.returncode == 2 and "unknown norm 'group_norm'" in proc.stderr
    proc = _run("--kernels", "norms,softmax")
    assert proc.returncode == 2 and "unknown kernel(s) softmax in --kernels: choose from norms, cross_entropy, attention" \
        in proc.stderr


def test_document_masked_attention_compiles_for_every_configuration(tmp_path):
    out = tmp_path / "documents.json"
    proc = _run("--kernels", "attention", "--direction", "backward", "--head-dims", "64", "--documents",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    from megatron_lite.kernels import attention

    kernels = [r["kernel"] for r in rows]
    assert kernels == (["attention backward dK/dV causal documents"] * len(attention._DKDV_CONFIGS)
                       + ["attention backward dQ causal documents"] * len(attention._DQ_CONFIGS))
    assert all(16 <= r["registers"] <= 255 and r["async_copies"] > 0 for r in rows)
