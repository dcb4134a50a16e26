"""train.compile: each transformer layer compiled on its own trains as the eager model does."""

import shutil

import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.training.setup import seed_everything, setup_dims
from megatron_lite.training.trained_model import build_trained_model
from tests.training.tiny import TINY_MODEL

# Inductor writes C++ for the CPU and needs a compiler to build it.
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="torch.compile's CPU backend (inductor) needs a C++ compiler; none on PATH")


def tiny(compile_layers: bool, extra=()):
    return load_config(None, TINY_MODEL + ["model.vocab_size=300", "train.device=cpu", "optim.lr=1e-2",
                                           f"train.compile={str(compile_layers).lower()}", *extra])


def two_steps(cfg) -> list[dict]:
    """Loss, every gradient, and the weights after each of two optimizer steps."""
    seed_everything(0)
    model = build_trained_model(cfg, setup_dims(cfg))
    generator = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(2):
        micro = [tuple(torch.randint(0, 300, (2, 16), generator=generator) for _ in range(2)) for _ in range(2)]
        loss = model.parallel_step.forward_backward(micro, model.autocast())
        grads = {name: p.main_grad.clone() for name, p in model.named_params}  # fp32 main grads, also for 16-bit weights
        model.parallel_step.optimizer_step(model.scaler, model.grad_clip, torch.isfinite(loss))
        steps.append({"loss": loss, "grads": grads, "weights": {n: p.detach().clone() for n, p in model.named_params}})
    steps.append({"compiled": [block._compiled_call_impl is not None for block in model.chunks[0].layers.values()]})
    return steps


@needs_cxx
def test_compiled_layers_match_eager_loss_gradients_and_dropout():
    extra = ["model.dropout=0.1"]  # the compiled layers draw the same dropout masks (fallback_random)
    eager, compiled = two_steps(tiny(False, extra)), two_steps(tiny(True, extra))
    assert compiled[-1]["compiled"] == [True, True] and eager[-1]["compiled"] == [False, False]
    for step, (a, b) in enumerate(zip(eager[:-1], compiled[:-1]), start=1):
        assert b["loss"].item() == pytest.approx(a["loss"].item(), abs=1e-5), step
        for kind in ("grads", "weights"):
            for name, value in a[kind].items():
                torch.testing.assert_close(b[kind][name], value, atol=1e-5, rtol=1e-5, msg=f"step {step} {kind} {name}")


@needs_cxx
@pytest.mark.parametrize("extra", [
    ["train.recompute=selective", "model.dropout=0.1"],  # the attention core reruns inside the compiled layer
    ["train.recompute=full", "model.dropout=0.1"],  # the compiled layer reruns whole in backward
])
def test_compiled_layers_compose_with_recompute(extra):
    """Gradients to 1e-5; the weights to 1e-4, as Adam's normalised step turns the last bits of a
    near-zero gradient into up to 1e-5 of weight on its own."""
    eager, compiled = two_steps(tiny(False, extra)), two_steps(tiny(True, extra))
    assert compiled[-1]["compiled"] == [True, True]
    for step, (a, b) in enumerate(zip(eager[:-1], compiled[:-1]), start=1):
        assert b["loss"].item() == pytest.approx(a["loss"].item(), abs=1e-5), step
        for kind, atol in (("grads", 1e-5), ("weights", 1e-4)):
            for name, value in a[kind].items():
                torch.testing.assert_close(b[kind][name], value, atol=atol, rtol=1e-5, msg=f"step {step} {kind} {name}")


@needs_cxx
@pytest.mark.parametrize("extra", [[], ["train.recompute=selective"], ["train.recompute=full", "model.dropout=0.1"]])
def test_compiled_layers_compose_with_bf16_weights(extra):
    """Inductor computes the bf16 layers with other roundings than eager: the losses agree to bf16
    precision, each fp32 main grad to 3% of its largest element, and the weights to the two Adam
    steps' reach (an element whose gradient is near zero may step the other way: 2 lr per step)."""
    lr = 1e-2
    eager, compiled = (two_steps(tiny(flag, ["train.precision=bf16", *extra])) for flag in (False, True))
    assert compiled[-1]["compiled"] == [True, True]
    for step, (a, b) in enumerate(zip(eager[:-1], compiled[:-1]), start=1):
        assert b["loss"].item() == pytest.approx(a["loss"].item(), rel=1e-4), step
        for name, value in a["grads"].items():
            assert value.dtype == torch.float32
            scale = value.abs().max().item()
            torch.testing.assert_close(b["grads"][name], value, atol=0.03 * scale, rtol=0, msg=f"step {step} {name}")
        for name, value in a["weights"].items():
            assert value.dtype == torch.bfloat16
            torch.testing.assert_close(b["weights"][name].float(), value.float(), atol=2 * lr * step + 1e-2, rtol=0,
                                       msg=f"step {step} {name}")


def test_compile_refuses_triton_kernels_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = tiny(True, ["model.norm_backend=triton", "model.loss_backend=triton"])
    with pytest.raises(ConfigError, match=r"train.compile=true cannot apply: model.norm_backend, model.loss_backend="
                                          r"triton run in Triton's interpreter here \(TRITON_INTERPRET=1\), which "
                                          r"torch.compile cannot trace; use the torch backends or train.compile=false"):
        build_trained_model(cfg, setup_dims(cfg))


def _layouts(rank, world, data, root):
    from megatron_lite.training.trainer import Trainer
    from tests.training.tiny import tiny_config

    losses = {}
    for name, extra in (("tp2_sp", ["parallel.tp=2", "parallel.sequence_parallel=true"]), ("pp2", ["parallel.pp=2"])):
        cfg = tiny_config(data, f"{root}/{name}", extra + ["train.compile=true", "train.max_steps=3",
                                                            "train.eval_interval=0"])
        losses[name] = Trainer(cfg, setup_dims(cfg)).train().losses
    return losses


@needs_cxx
def test_compiled_layers_compose_with_tensor_sequence_and_pipeline_parallelism(tiny_data, tmp_path):
    from megatron_lite.training.trainer import Trainer
    from tests.distributed import run_distributed
    from tests.training.tiny import tiny_config

    eager = Trainer(tiny_config(tiny_data, tmp_path / "eager", ["train.max_steps=3", "train.eval_interval=0"])).train()
    for name, losses in run_distributed(_layouts, 2, tiny_data, str(tmp_path))[0].items():
        assert losses == pytest.approx(eager.losses, rel=1e-5), name
