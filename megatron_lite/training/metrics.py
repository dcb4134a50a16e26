"""Training metrics: one rank-0 console line per logged step, TensorBoard, and metrics.jsonl.

Throughput is measured per logging window (tokens trained since the last line over the
wall time since it). TFLOP/s is per device; MFU divides it by the device's peak dense
throughput, looked up by device name, or left null when the peak is unknown (CPUs).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from megatron_lite.config import LogConfig

# Dense (no sparsity) 16-bit tensor-core peaks in TFLOP/s, matched by substring of the
# device name, most specific first. fp32 training runs on TF32 tensor cores at half these.
PEAK_TFLOPS_16BIT: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak dense TFLOP/s for ``precision`` on the named device, or None when unknown."""
    for key, peak in PEAK_TFLOPS_16BIT:
        if key.lower() in device_name.lower():
            return peak if precision in ("bf16", "fp16") else peak / 2
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Metrics:
    """Collects per-step values, prints on rank 0 every ``log.interval`` steps, writes logs."""

    def __init__(
        self,
        log: LogConfig,
        is_logging_rank: bool,
        device: torch.device,
        precision: str,
        flops_per_token: float,
        num_devices: int,
        max_steps: int,
        peak: float | None = None,
    ):
        self.interval = log.interval
        self.enabled = is_logging_rank
        self.device = device
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.max_steps = max_steps
        self.peak = peak if peak is not None else peak_tflops(device_name(device), precision)
        self.writer = None
        self.jsonl_path = Path(log.dir) / "metrics.jsonl"
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        self._run_start = time.perf_counter()
        self._steps_this_run = 0
        if self.enabled:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            if log.tensorboard:
                self.writer = _tensorboard_writer(log.dir)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def restart_window(self) -> None:
        """Exclude time spent outside training steps (evaluation, checkpoints) from throughput."""
        self._window_start = time.perf_counter()
        self._window_tokens = 0

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int, **extra) -> dict | None:
        """Record one finished step (1-based ``step``); returns the logged record on logging steps
        and on a step with a ``loss_spike``, which is never left out of the log. The trainer calls
        it for every step, in order, when it reads the figures back (on logging steps), so the
        window's throughput is the wall time of its steps."""
        self._window_tokens += tokens
        self._steps_this_run += 1
        logging_step = step % self.interval == 0 or step == self.max_steps
        if not logging_step and "loss_spike" not in extra:
            return None
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        tokens_per_s = self._window_tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.num_devices / 1e12
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "memory_gib": memory_gib(self.device),
            **extra,
        }
        self._emit(record, self._console_line(record))
        if logging_step:  # a spike's record between logging steps reports the window so far and keeps it
            self.restart_window()
        return record

    def evaluation(self, step: int, val_loss: float, extra: dict | None = None) -> dict:
        """A validation record; ``extra`` (e.g. an RLHF stage's ``val_accuracy``) replaces the
        perplexity, which only a language-model loss has."""
        if extra is None:
            record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
            self._emit(record, f"step {step:>6} | validation loss {val_loss:.4f} | perplexity {record['val_ppl']:.2f}")
            return record
        return self.validation_figures(step, {"val_loss": val_loss, **extra})

    def validation_figures(self, step: int, figures: dict) -> dict:
        """A validation record of named figures (``val_loss``, ``val_accuracy``, ``val_reward``, ...)."""
        record = {"step": step, **figures}
        terms = " | ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in figures.items())
        self._emit(record, f"step {step:>6} | validation {terms}")
        return record

    def _console_line(self, r: dict) -> str:
        per_step = (time.perf_counter() - self._run_start) / max(1, self._steps_this_run)
        eta = _duration(per_step * (self.max_steps - r["step"]))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        parts = [
            f"step {r['step']:>6}/{self.max_steps}",
            f"loss {r['loss']:.4f}",
            f"lr {r['lr']:.3e}",
            f"grad norm {r['grad_norm']:.3f}",
            f"{r['tokens_per_s']:,.0f} tok/s",
            f"{r['tflops_per_device']:.3f} TFLOP/s",
            f"MFU {mfu}",
            f"mem {r['memory_gib']:.2f} GiB",
        ]
        parts += [f"{k.replace('_', ' ')} {v:.4g}" for k, v in r.items() if k not in _STANDARD and isinstance(v, float)]
        if r.get("loss_scale") is not None:
            parts.append(f"scale {r['loss_scale']:.0f}")
        if r.get("skipped"):
            parts.append("skipped (overflow)")
        return " | ".join(parts) + f" | eta {eta}"

    def _emit(self, record: dict, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_STANDARD = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "memory_gib",
             "loss_scale", "skipped"}


def _tensorboard_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed; metrics go to metrics.jsonl only (pip install tensorboard)", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=log_dir)
