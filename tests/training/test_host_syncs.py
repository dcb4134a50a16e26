"""A training step waits for the device only where its figures are read back: logging and save steps
(and every fp16 step, whose loss scaler needs the overflow on the host)."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_lite.training.setup import setup_dims
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
from tests.training.tiny import tiny_config

RUN = ["log.interval=4", "train.max_steps=8", "train.eval_interval=0"]


class HostReads(TorchDispatchMode):
    """Counts what copies a tensor's value to the host: ``.item()``, ``bool()``, ``float()``
    (all ``aten._local_scalar_dense``), ``.tolist()`` and ``.numpy()``."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_host_reads(monkeypatch_context):
    reads = HostReads()
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.count += 1
            return _original(self, *args, **kwargs)

        monkeypatch_context.setattr(torch.Tensor, name, counted)
    with reads:
        yield reads


def host_reads_per_step(trainer: Trainer) -> list[int]:
    """The trainer's run, counting the host reads of each step (its evaluation and save included)."""
    counts, run_step = [], trainer._run_step

    def counted_step(result):
        with pytest.MonkeyPatch.context() as patch, counting_host_reads(patch) as reads:
            stop = run_step(result)
        counts.append(reads.count)
        return stop

    trainer._run_step = counted_step
    trainer.train()
    return counts


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_between_logging_steps_reads_nothing_back(tiny_data, tmp_path, precision):
    trainer = Trainer(tiny_config(tiny_data, tmp_path, RUN + [f"train.precision={precision}"]))
    counts = host_reads_per_step(trainer)
    assert [count == 0 for count in counts] == [True, True, True, False] * 2, counts
    # a logging step reads the figures of its window once, and the stop agreement
    assert counts[3] == counts[7] == 2, counts


def test_fp16_reads_the_overflow_back_every_step(tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path, RUN + ["train.precision=fp16"]))
    assert all(count > 0 for count in host_reads_per_step(trainer))


def test_a_save_step_reads_back_and_checks_before_it_saves(tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path, RUN + [f"checkpoint.save={tmp_path}/ck", "checkpoint.interval=2"]))
    counts = host_reads_per_step(trainer)
    assert [count == 0 for count in counts] == [True, False] * 4, counts


def _two_ranks(rank, world, data, root):
    cfg = tiny_config(data, f"{root}/dp2", RUN)
    return host_reads_per_step(Trainer(cfg, setup_dims(cfg)))


def test_data_parallel_steps_read_nothing_back_either(tiny_data, tmp_path):
    for counts in run_distributed(_two_ranks, 2, tiny_data, str(tmp_path)):
        assert [count == 0 for count in counts] == [True, True, True, False] * 2, counts


def _adamw_pair(fused: bool):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params, torch.optim.AdamW(params, lr=0.1, fused=fused)


def _zero1_state(zero, name: str) -> torch.Tensor:
    """One of ZeRO-1's per-bucket slices (master, exp_avg, exp_avg_sq), laid end to end."""
    return torch.cat([getattr(sharded, name) for sharded in zero._sharded])


def test_a_skipped_step_leaves_fused_adamw_and_zero1_untouched_without_reading_the_flag():
    from megatron_lite.parallel.data_parallel import Zero1AdamW
    from megatron_lite.training.step import step_unless

    params, adamw = _adamw_pair(fused=True)
    before = [p.detach().clone() for p in params]
    with pytest.MonkeyPatch.context() as patch, counting_host_reads(patch) as reads:
        step_unless(adamw, torch.tensor(True))
        assert reads.count == 0
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(float(adamw.state[p]["step"]) == 0 for p in params)  # the step counter did not advance
    step_unless(adamw, torch.tensor(False))
    reference, plain = _adamw_pair(fused=True)
    plain.step()
    assert all(torch.equal(p, r) for p, r in zip(params, reference))  # an applied step is the ordinary one

    params, _ = _adamw_pair(fused=False)
    zero = Zero1AdamW(params, None, lr=0.1, weight_decay=0.01)
    master = _zero1_state(zero, "master").clone()
    with pytest.MonkeyPatch.context() as patch, counting_host_reads(patch) as reads:
        zero.step(found_inf=torch.tensor(1.0))
        assert reads.count == 0
    assert torch.equal(_zero1_state(zero, "master"), master)
    assert not _zero1_state(zero, "exp_avg").any() and not _zero1_state(zero, "exp_avg_sq").any()
    reference_params, _ = _adamw_pair(fused=False)
    reference = Zero1AdamW(reference_params, None, lr=0.1, weight_decay=0.01)
    zero.step_count = 0
    zero.step(found_inf=torch.tensor(0.0))
    reference.step()
    assert torch.equal(_zero1_state(zero, "master"), _zero1_state(reference, "master"))
    assert torch.equal(_zero1_state(zero, "exp_avg_sq"), _zero1_state(reference, "exp_avg_sq"))
