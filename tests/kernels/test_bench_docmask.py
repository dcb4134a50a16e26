"""The document-mask benchmark: its synthetic packed documents, its kernel smoke run and its record."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_docmask  # noqa: E402
from kernel_bench.docmask import ragged_lengths, visible_pairs  # noqa: E402


def test_ragged_lengths_fill_the_sequence():
    rng = np.random.default_rng(0)
    for seq in (1, 7, 512, 8192):
        lengths = ragged_lengths(seq, 64, rng)
        assert sum(lengths) == seq and min(lengths) >= 1
    assert visible_pairs([[3, 1], [4]]) == 6 + 1 + 10


def test_synthetic_documents_end_in_eod():
    data = bench_docmask.PackedSyntheticDocuments(vocab_size=50, seq_length=64, num_samples=3, mean_document=8)
    row = data[1]
    assert row.shape == (65,) and row[-1] == bench_docmask.EOD and np.count_nonzero(row == bench_docmask.EOD) > 2
    assert row.max() < 50 and np.array_equal(row, data[1])


def test_kernel_smoke_run_writes_its_tables(tmp_path):
    assert bench_docmask.main(["kernels", "--smoke", "--out-dir", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "bench_docmask_smoke.json").read_text())
    providers = {r["provider"] for r in raw["results"]}
    assert providers == {"triton", "torch per-document sdpa", "sdpa block mask", "sdpa causal (no mask)",
                         "triton causal (no mask)"}
    assert all(r["fwd_tflops"] > 0 and r["fwd_bwd_tflops"] > 0 for r in raw["results"])
    assert all(0 < r["visible_fraction"] <= 1 for r in raw["results"])
    assert "| 48 | 2 x 2 x 32 |" in (tmp_path / "bench_docmask_smoke.md").read_text()


def test_record_appends_to_its_own_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Other\n\ntext\n")
    bench_docmask.record_row(docs, "| a |\n")
    bench_docmask.record_row(docs, "| b |\n")
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\n## Other\n\ntext\n") and text.count(bench_docmask.SECTION) == 1
    assert text.endswith(bench_docmask.TABLE_HEADER + "| a |\n| b |\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full kernel run is refused only without a GPU")
def test_full_kernel_run_without_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_docmask.parse_args(["kernels"])
    assert "no CUDA GPU: only kernels --smoke (Triton through the interpreter) or --torch-only runs here" in \
        capsys.readouterr().err


def test_torch_only_run_at_cpu_size(tmp_path):
    assert bench_docmask.main(["kernels", "--torch-only", "--seqs", "256", "--tokens", "512", "--heads", "2",
                               "--head-dim", "16", "--mean-document", "32", "--out-dir", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "bench_docmask.json").read_text())
    assert {r["provider"] for r in raw["results"]} == {"torch per-document sdpa", "sdpa block mask",
                                                       "sdpa causal (no mask)"}
    assert all(r["seq"] == 256 and r["batch"] == 2 and r["fwd_tflops"] > 0 for r in raw["results"])
