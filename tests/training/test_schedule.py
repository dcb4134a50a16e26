import math

import pytest
import torch

from megatron_lite.config import OptimConfig
from megatron_lite.training.schedule import LRScheduler, learning_rate


def optim(**kw):
    base = dict(lr=1.0, min_lr=0.1, warmup_steps=10)
    base.update(kw)
    return OptimConfig(**base)


def test_warmup_is_linear_and_reaches_peak():
    cfg = optim(schedule="cosine")
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(4, cfg, 110) == pytest.approx(0.5)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)


def test_cosine_values():
    cfg = optim(schedule="cosine")
    assert learning_rate(10, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55)  # half way: mean of peak and floor
    assert learning_rate(35, cfg, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(500, cfg, 110) == pytest.approx(0.1)  # stays at the floor after decay


def test_linear_constant_and_decay_steps():
    assert learning_rate(60, optim(schedule="linear"), 110) == pytest.approx(0.55)
    assert learning_rate(85, optim(schedule="linear"), 110) == pytest.approx(1.0 - 0.9 * 0.75)
    assert learning_rate(100, optim(schedule="constant"), 110) == 1.0
    # decay_steps overrides max_steps as the end of the decay
    assert learning_rate(35, optim(schedule="linear", decay_steps=60), 1000) == pytest.approx(0.55)


def test_wsd_holds_then_decays_over_final_fraction():
    cfg = optim(schedule="wsd", wsd_decay_fraction=0.2)  # 100 steps: decay over steps 80..100
    assert learning_rate(50, cfg, 100) == 1.0
    assert learning_rate(79, cfg, 100) == 1.0
    assert learning_rate(80, cfg, 100) == pytest.approx(1.0)
    assert learning_rate(90, cfg, 100) == pytest.approx(0.55)
    assert learning_rate(100, cfg, 100) == pytest.approx(0.1)


def test_scheduler_sets_groups_and_round_trips():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=123.0)
    sched = LRScheduler(opt, optim(schedule="cosine"), 110)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(60):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)
    other = LRScheduler(torch.optim.SGD([param], lr=1.0), optim(schedule="cosine"), 110)
    other.load_state_dict(sched.state_dict())
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(0.55)


def test_run_shorter_than_warmup_stays_in_warmup():
    cfg = optim(schedule="cosine", warmup_steps=20)
    assert [learning_rate(s, cfg, 5) for s in range(5)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25])
