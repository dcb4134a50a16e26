"""The parts of ``tools/bench_kernels.py``: ``check`` (correctness against float64), ``sweep``
(timing the registry's entries next to baselines) and ``report`` (Markdown, JSON and plots)."""
