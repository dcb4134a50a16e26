"""AdamW construction, the fp16 loss scaler, and unscaling.

fp32 runs: the parameters are the master weights and torch's AdamW updates them in place.
bf16/fp16 runs (Megatron mixed precision): the model's weights are 16-bit for forward and
backward; the optimizer owns fp32 main copies (``MainParamsAdamW``, or the sharded slices of
``parallel.data_parallel.Zero1AdamW``), reads the fp32 main grads the gradient buckets
accumulate, and casts the updated masters back into the 16-bit weights after each step.
The global gradient norm and clipping live in ``parallel.grad_norm``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from megatron_lite.config import ConfigError, OptimConfig
from megatron_lite.parallel.layout import attach_layout, layout_of

NamedParams = list[tuple[str, torch.nn.Parameter]]


def apex_fused_adam() -> type | None:
    """NVIDIA apex's FusedAdam class when apex is installed with its CUDA extensions, else None."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - apex missing or built without its extensions
        return None
    return FusedAdam


@functools.lru_cache(maxsize=None)
def torch_fused_adamw_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has a fused AdamW kernel for ``dtype`` parameters on ``device`` (CPU since
    torch 2.4): one step on a one-element probe, since torch checks this lazily and differently by version."""
    try:
        probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def skips_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm gains and biases are vectors; embeddings are lookup tables whose rows decay unevenly.
    The last pipeline stage's copy of a tied embedding (``layout.tied_embedding``) is the embedding too."""
    leaf = name.split(".")
    if layout_of(param).tied_embedding:
        return True
    return param.ndim < 2 or any("embed" in part or part in ("wte", "wpe") for part in leaf)


def param_groups(named_params: NamedParams, weight_decay: float) -> list[dict]:
    decay = [p for n, p in named_params if not skips_weight_decay(n, p)]
    no_decay = [p for n, p in named_params if skips_weight_decay(n, p)]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(named_params: NamedParams, optim: OptimConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over ``named_params``; returns the optimizer and which implementation was chosen."""
    groups = param_groups(named_params, optim.weight_decay)
    common = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    fused_adam = apex_fused_adam() if device.type == "cuda" else None
    if optim.fused == "apex" and fused_adam is None:
        raise ConfigError(
            "optim.fused=apex but apex.optimizers.FusedAdam is not importable on this device; "
            "install NVIDIA apex with its CUDA extensions or use optim.fused=auto"
        )
    if optim.fused in ("apex", "auto") and fused_adam is not None:
        return fused_adam(groups, adam_w_mode=True, **common), "apex FusedAdam"
    dtypes = sorted({param.dtype for _, param in named_params}, key=str)
    torch_fused = all(torch_fused_adamw_supports(device, dtype) for dtype in dtypes)
    if optim.fused == "torch" and not torch_fused:
        raise ConfigError(
            f"optim.fused=torch but torch {torch.__version__} has no fused AdamW for {dtypes} parameters "
            f"on {device.type}; use optim.fused=auto"
        )
    if optim.fused in ("torch", "auto") and torch_fused:
        return torch.optim.AdamW(groups, fused=True, **common), "torch AdamW (fused)"
    return torch.optim.AdamW(groups, foreach=False, **common), "torch AdamW"


class MainParamsAdamW:
    """AdamW for 16-bit weights over fp32 main copies of them (not sharded; ZeRO-1 shards its own).

    Each step reads the fp32 main grads the gradient buckets accumulated (``weight.main_grad``),
    updates the main params with the AdamW ``build_optimizer`` picks for fp32, and casts them into
    the 16-bit weights. The LR schedule sees ``param_groups``; checkpoints see the main params'
    state by name and, through ``full_precision_weights()``, the main params as the weights.
    """

    def __init__(self, named_params: NamedParams, optim: OptimConfig, device: torch.device):
        self.weights = [p for _, p in named_params]
        # The main params carry their weight's layout: weight decay, clipping and the norm ask it.
        self.main_params = [
            attach_layout(torch.nn.Parameter(p.detach().to(torch.float32, copy=True)), layout_of(p))
            for p in self.weights
        ]
        self.named_main_params = [(n, m) for (n, _), m in zip(named_params, self.main_params)]
        self.inner, kind = build_optimizer(self.named_main_params, optim, device)
        self.kind = f"{kind} over fp32 main params"

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @torch.no_grad()
    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """``found_inf`` (a device scalar, 1 = skip): see ``step_unless_found_inf``."""
        for weight, main in zip(self.weights, self.main_params):
            main.grad = weight.main_grad
        if found_inf is None:
            self.inner.step()
        else:
            step_unless_found_inf(self.inner, found_inf)
        for weight, main in zip(self.weights, self.main_params):
            weight.copy_(main)

    def state_dict_by_param_name(self) -> dict:
        return optimizer_state_by_name(self.inner, self.named_main_params)

    def load_state_dict_by_param_name(self, saved: dict) -> None:
        load_optimizer_state_by_name(self.inner, self.named_main_params, saved)

    @contextlib.contextmanager
    def full_precision_weights(self) -> Iterator[None]:
        """Inside, each weight's storage is its fp32 main param, so a checkpoint saves the masters and
        a load writes straight into them; on leaving, the 16-bit weights are cast from them."""
        held = {}
        for weight, main in zip(self.weights, self.main_params):
            held[weight] = weight.data
            weight.data = main.data
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, data in held.items():
                    data.copy_(weight.data)
                    weight.data = data


def step_unless_found_inf(optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` (a device scalar) is 1. Torch's fused AdamW reads the
    flag on the device (``found_inf``, as its grad scaler passes it); any other optimizer needs it
    on the host: one wait."""
    if isinstance(optimizer, torch.optim.Optimizer) and optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, named_params: NamedParams) -> dict:
    """Per-parameter state keyed by parameter name, so it can be resharded like the weights."""
    per_param = {}
    for name, param in named_params:
        state = optimizer.state.get(param)
        if state:
            per_param[name] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"per_param": per_param, "groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, named_params: NamedParams, saved: dict) -> None:
    for group, saved_group in zip(optimizer.param_groups, saved["groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    # torch keeps AdamW's step counter on the CPU unless the fused/capturable kernels read it on the device
    step_on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    for name, param in named_params:
        if name in saved["per_param"]:
            optimizer.state[param] = {
                k: _to_state_device(v, param.device, step_on_device) for k, v in saved["per_param"][name].items()
            }


def _to_state_device(value, device: torch.device, scalars_on_device: bool):
    if not torch.is_tensor(value):
        return value
    if value.ndim > 0 or scalars_on_device:
        return value.to(device=device)
    return value


class LossScaler:
    """Dynamic loss scale for fp16: halve and skip on overflow, double after a clean window.

    A scale halved below ``min_scale`` is ``exhausted``: the overflows are not the scale's fault
    and the trainer stops the run (``training.divergence``). With ``dynamic=False`` the scale is a
    constant 1 and ``update`` never changes it (fp32, bf16).
    """

    def __init__(self, initial_scale: float = 2.0**16, window: int = 1000, dynamic: bool = True, min_scale: float = 1.0):
        self.dynamic = dynamic
        self.scale = float(initial_scale) if dynamic else 1.0
        self.window = window
        self.min_scale = min_scale
        self.clean_steps = 0

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self.scale /= 2.0
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.window:
            self.scale *= 2.0
            self.clean_steps = 0

    @property
    def exhausted(self) -> bool:
        return self.dynamic and self.scale < self.min_scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "dynamic": self.dynamic}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


def unscale_grads(params: list[torch.Tensor], scale: float) -> None:
    if scale != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.div_(scale)
