"""The benchmark's CPU smoke sweep runs end to end and writes its report."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_kernels  # noqa: E402
from kernel_bench.sweep import attention_flops  # noqa: E402


def test_smoke_sweep_checks_and_writes_report(tmp_path):
    assert bench_kernels.main(["--smoke", "--check", "--out-dir", str(tmp_path)]) == 0
    markdown = (tmp_path / "bench_kernels_smoke.md").read_text()
    assert "### Attention" in markdown and "### Norms" in markdown and "Correctness (--check): 10/10" in markdown
    raw = json.loads((tmp_path / "bench_kernels_smoke.json").read_text())
    ours = [r for r in raw["attention"] if r["provider"] == "triton"]
    assert {(r["seq"], r["causal"]) for r in ours} == {(16, True), (16, False), (32, True), (32, False)}
    assert all(r["fwd_tflops"] > 0 and r["fwd_bwd_tflops"] > 0 for r in ours)
    assert all(r["fwd_gbs"] > 0 and r["bwd_gbs"] > 0 for r in raw["norms"])
    assert raw["copy_gbs"] > 0 and all(c["passed"] for c in raw["checks"])
    # Each norm backward launch setting is checked on its own (the interpreter offers one).
    settings = {c["name"] for c in raw["checks"] if " backward " in c["name"]}
    assert settings == {"layer_norm N=300 backward plain ROWS=2 warps=4", "rms_norm N=300 backward plain ROWS=2 warps=4"}
    for name in ("bench_attention_smoke.png", "bench_norms_smoke.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_attention_flop_count():
    assert attention_flops(2, 3, 128, 64, causal=False) == 4 * 2 * 3 * 128 * 128 * 64
    assert attention_flops(2, 3, 128, 64, causal=True) == 2 * 2 * 3 * 128 * 128 * 64


def test_only_times_the_named_sections(tmp_path):
    assert bench_kernels.main(["--smoke", "--check", "--only", "norms,cross_entropy", "--out-dir", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "bench_kernels_smoke.json").read_text())
    assert {c["name"].split()[0] for c in raw["checks"]} == {"layer_norm", "rms_norm", "cross_entropy",
                                                             "vocab_parallel_cross_entropy"}
    assert "cross_entropy V=300 padded to 320 BLOCK_V=128 warps=4" in {c["name"] for c in raw["checks"]}
    assert raw["attention"] == [] and {r["kind"] for r in raw["norms"]} == {"layer_norm", "rms_norm", "cross_entropy"}
    markdown = (tmp_path / "bench_kernels_smoke.md").read_text()
    assert "### Attention" not in markdown and "| cross_entropy | 300 |" in markdown
    assert not (tmp_path / "bench_attention_smoke.png").exists()
    assert (tmp_path / "bench_norms_smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_section_is_named(capsys):
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--smoke", "--only", "norms,softmax"])
    assert "unknown section(s) softmax in --only: choose from attention, norms, elementwise, cross_entropy" in \
        capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full sweep is refused only without a GPU")
def test_full_sweep_without_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--check"])
    assert "no CUDA GPU: only --smoke runs here" in capsys.readouterr().err
