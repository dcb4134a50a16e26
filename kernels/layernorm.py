"""LayerNorm and RMSNorm over the last dimension in Triton.

Forward: a program normalizes a block of whole rows (statistics in fp32) and saves each
row's mean and 1/std in fp32 for the backward.

Backward: a fixed number of programs each walks a contiguous range of rows, writing dX and
keeping fp32 running sums of dY * x_hat (for dW) and dY (for dB) in registers. Each program
stores its partial sums in its own row of a (programs, N) buffer that a second kernel adds up
in a fixed order, so the weight gradients come out the same on every run (no atomics, no
locks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LaunchTuner, check_device, interpreting, multiprocessor_count, new_output

MAX_HIDDEN_SIZE = 65536


@triton.jit
def _norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,
    stride_x, stride_y, n_rows, n_cols, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (ROWS, BLOCK_N)
    if IS_RMS:
        x_c = x
    else:
        mean = tl.sum(x, 1) / n_cols
        x_c = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(x_c * x_c, 1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = x_c * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _load_rows(X, DY, rows, cols, mask, stride_x, stride_dy):
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    return x, dy


@triton.jit
def _normalized(x_raw, mean, rstd, mask, IS_RMS: tl.constexpr):
    """x_hat in fp32: x * rstd for RMSNorm, (x - mean) * rstd (zero outside the row) for LayerNorm."""
    if IS_RMS:
        x_hat = x_raw.to(tl.float32) * rstd[:, None]
    else:
        x_hat = tl.where(mask, (x_raw.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    return x_hat


@triton.jit
def _norm_bwd_kernel(
    X, DY, DX, W, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL,
    stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_program,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr, RELOAD_W: tl.constexpr, TWO_PASS: tl.constexpr, STAGES: tl.constexpr,
    EVEN_COLS: tl.constexpr, EVEN_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    # Rows that fill the block exactly (EVEN_COLS), and row counts that are a multiple of ROWS
    # (EVEN_ROWS), get masks that are constant true, which the compiler removes: fewer registers.
    if EVEN_COLS:
        col_ok = cols < BLOCK_N
    else:
        col_ok = cols < n_cols
    if not RELOAD_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    if PREFETCH:  # the next rows' loads are issued before this row's reductions, to hide their latency
        rows = first + tl.arange(0, ROWS)
        x_next, dy_next = _load_rows(X, DY, rows, cols, (rows < last)[:, None] & col_ok[None, :], stride_x, stride_dy)
    # STAGES > 1 has the compiler copy the next rows into shared memory (cp.async) while this
    # one is reduced, so a program keeps loads in flight without holding them in registers.
    for start in tl.range(first, last, ROWS, num_stages=STAGES):
        rows = start + tl.arange(0, ROWS)
        if EVEN_ROWS:
            row_ok = tl.arange(0, ROWS) < ROWS
        else:
            row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        if PREFETCH:
            x_raw, dy_raw = x_next, dy_next
            ahead = rows + ROWS
            x_next, dy_next = _load_rows(X, DY, ahead, cols, (ahead < last)[:, None] & col_ok[None, :], stride_x, stride_dy)
        elif TWO_PASS:
            x_raw = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0,
                            eviction_policy="evict_last")
            dy_raw = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0,
                             eviction_policy="evict_last")
        else:
            x_raw, dy_raw = _load_rows(X, DY, rows, cols, mask, stride_x, stride_dy)
        dy = dy_raw.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            mean = rstd  # unused
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        x_hat = _normalized(x_raw, mean, rstd, mask, IS_RMS)
        if RELOAD_W:  # long rows: the weight is read again (from cache) instead of held in registers
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        w_dy = w[None, :] * dy  # zero outside the row, since dy is
        if TWO_PASS:
            # Long rows: update the sums and keep only the row reductions; dX then reads the row
            # again (from cache, the first read asked to keep it there) instead of holding x_hat
            # and w * dy in registers across the reductions, which spills for 16k-wide rows.
            dw += dy * x_hat
            if HAS_BIAS:
                db += dy
        c1 = tl.sum(x_hat * w_dy, 1) / n_cols
        if not IS_RMS:
            c2 = tl.sum(w_dy, 1) / n_cols
        if TWO_PASS:
            x_raw = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0,
                            eviction_policy="evict_first")
            dy_raw = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0,
                             eviction_policy="evict_first")
            x_hat = _normalized(x_raw, mean, rstd, mask, IS_RMS)
            w_dy = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] * dy_raw.to(tl.float32)
        if IS_RMS:
            dx = (w_dy - x_hat * c1[:, None]) * rstd[:, None]
        else:
            dx = (w_dy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if not TWO_PASS:
            dw += dy * x_hat
            if HAS_BIAS:
                db += dy
    tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, 0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * n_cols + cols, tl.sum(db, 0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(DW_PARTIAL, DB_PARTIAL, DW, DB, programs, n_cols, HAS_BIAS: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dW (and dB) = the backward programs' partial sums added in a fixed order, written in the
    weight's dtype: one launch where torch takes a sum and a cast per gradient."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in tl.range(0, programs, BLOCK_P, num_stages=3):  # the next tiles' loads in flight
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < programs)[:, None] & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        dw += tl.sum(tl.load(DW_PARTIAL + offsets, mask=mask, other=0.0), 0)
        if HAS_BIAS:
            db += tl.sum(tl.load(DB_PARTIAL + offsets, mask=mask, other=0.0), 0)
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_ok)


_SUM_PROGRAMS, _SUM_COLUMNS = 32, 64  # a (partial rows x columns) tile of the final reduction


# Launch settings. Rows shorter than a few thousand elements are stacked ROWS to a program;
# warps are sized so each thread holds a fixed number of bytes of every tile: the forward keeps
# one tile alive, the backward several plus the fp32 partial sums, so it wants fewer bytes per
# thread to stay out of local memory. On GPU each shape's first call times the candidates below
# (LaunchTuner); the first candidate is the default elsewhere.
_FWD_BYTES_PER_THREAD = (64, 32, 128)
_BWD_BYTES_PER_THREAD = (32, 16, 64)
_BWD_PROGRAMS_PER_SM = (2, 1, 4)
_fwd_tuner = LaunchTuner()
_bwd_tuner = LaunchTuner()


def _stacked_rows(block_n: int) -> tuple[int, ...]:
    """Rows per program: enough to make about 8192 elements, and a quarter of that."""
    full = max(1, min(16, 8192 // block_n))
    return tuple(dict.fromkeys((full, max(1, full // 4))))


def _warps(elements: int, element_size: int, bytes_per_thread: int) -> int:
    return min(32, max(4, elements * element_size // (32 * bytes_per_thread)))


def _candidates(block_n: int, element_size: int, bytes_per_thread: tuple[int, ...]) -> list[tuple[int, int]]:
    """(ROWS, num_warps) pairs, default first, without repeats."""
    if interpreting():
        return [(2, 4)]
    pairs = [(rows, _warps(rows * block_n, element_size, b)) for rows in _stacked_rows(block_n) for b in bytes_per_thread]
    return list(dict.fromkeys(pairs))


def _tuning_key(x2d: torch.Tensor, weight: torch.Tensor, is_rms: bool, has_bias: bool) -> tuple:
    n_rows, n_cols = x2d.shape
    return n_cols, triton.next_power_of_2(n_rows), x2d.dtype, weight.dtype, is_rms, has_bias, x2d.device


def norm_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, is_rms: bool,
                 tuning_group=None):
    """x2d (M, N) -> (y (M, N), mean (M,) fp32 or None, rstd (M,) fp32); ``tuning_group`` as in ``layer_norm``."""
    n_rows, n_cols = x2d.shape
    y = new_output((n_rows, n_cols), x2d.dtype, x2d.device)
    mean = None if is_rms else new_output((n_rows,), torch.float32, x2d.device)
    rstd = new_output((n_rows,), torch.float32, x2d.device)
    block_n = triton.next_power_of_2(n_cols)

    def launch(setting: tuple[int, int]) -> None:
        rows, num_warps = setting
        _norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            x2d, y, weight, bias if bias is not None else weight, mean if mean is not None else rstd, rstd,
            x2d.stride(0), y.stride(0), n_rows, n_cols, eps,
            IS_RMS=is_rms, HAS_BIAS=bias is not None, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )

    def candidates() -> list[tuple[int, int]]:
        return _candidates(block_n, x2d.element_size(), _FWD_BYTES_PER_THREAD)

    launch(_fwd_tuner.pick(_tuning_key(x2d, weight, is_rms, bias is not None), candidates, launch, tuning_group))
    return y, mean, rstd


def _backward_programs(n_rows: int, rows: int, device: torch.device, per_sm: int = _BWD_PROGRAMS_PER_SM[0]) -> int:
    """Programs of the backward grid; each writes one row of partial weight-gradient sums."""
    if interpreting():
        return min(3, triton.cdiv(n_rows, rows))  # several programs, so the partial sums are really summed
    return max(1, min(per_sm * multiprocessor_count(device), triton.cdiv(n_rows, rows)))


def norm_backward(dy2d, x2d, weight, mean, rstd, has_bias: bool, tuning_group=None):
    """Returns (dx (M, N), dw (N,), db (N,) or None); dw and db in the weight's dtype."""
    block_n = triton.next_power_of_2(x2d.shape[1])
    dx = new_output(x2d.shape, x2d.dtype, x2d.device)

    def launch(setting: tuple[int, int, int, str]):
        return _backward_launch(dy2d, x2d, weight, mean, rstd, has_bias, dx, setting)

    def candidates() -> list[tuple[int, int, int, str]]:
        return backward_candidates(block_n, x2d.element_size())

    return launch(_bwd_tuner.pick(_tuning_key(x2d, weight, mean is None, has_bias), candidates, launch, tuning_group))


def backward_candidates(block_n: int, element_size: int) -> list[tuple[int, int, int, str]]:
    """Launch settings (ROWS, num_warps, programs per SM, variant) the backward tuner times, default first."""
    per_sm_options = _BWD_PROGRAMS_PER_SM if not interpreting() else _BWD_PROGRAMS_PER_SM[:1]
    return [(rows, warps, per_sm, variant)
            for rows, warps in _candidates(block_n, element_size, _BWD_BYTES_PER_THREAD)
            for per_sm in per_sm_options
            for variant in _backward_variants(rows, block_n)]


# Backward kernel variants: (PREFETCH, RELOAD_W, TWO_PASS, STAGES). "prefetch" loads the next rows
# into registers before reducing the current ones; "reload_weight" and "two_pass" trade cache reads
# for registers on long rows; the "pipelined" ones have the compiler stage the next rows' loads in
# shared memory instead (the long-row kind needs all of it: 160 KiB for 16k bf16 rows).
BACKWARD_VARIANTS = {
    "plain": (False, False, False, 1),
    "prefetch": (True, False, False, 1),
    "reload_weight": (False, True, False, 1),
    "two_pass": (False, True, True, 1),
    "pipelined": (False, False, False, 2),
    "two_pass_pipelined": (False, True, True, 2),
}
_LONG_ROW = 8192  # padded row length from which registers run short for whole rows and their sums


def _backward_variants(rows: int, block_n: int) -> tuple[str, ...]:
    if interpreting():
        return ("plain",)
    long_row = ("reload_weight", "two_pass", "two_pass_pipelined") if block_n >= _LONG_ROW else ()
    return ("plain", "pipelined") + (("prefetch",) if rows == 1 else ()) + long_row


def _backward_launch(dy2d, x2d, weight, mean, rstd, has_bias: bool, dx, setting: tuple[int, int, int, str]):
    """One backward with launch ``setting`` = (ROWS, num_warps, programs per SM, variant)."""
    rows, num_warps, per_sm, variant = setting
    prefetch, reload_w, two_pass, stages = BACKWARD_VARIANTS[variant]
    n_rows, n_cols = x2d.shape
    programs = _backward_programs(n_rows, rows, x2d.device, per_sm)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = new_output((programs, n_cols), torch.float32, x2d.device)
    db_partial = new_output((programs, n_cols), torch.float32, x2d.device) if has_bias else dw_partial
    _norm_bwd_kernel[(programs,)](
        x2d, dy2d, dx, weight, mean if mean is not None else rstd, rstd, dw_partial, db_partial,
        x2d.stride(0), dy2d.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
        IS_RMS=mean is None, HAS_BIAS=has_bias, ROWS=rows, BLOCK_N=triton.next_power_of_2(n_cols),
        PREFETCH=prefetch, RELOAD_W=reload_w, TWO_PASS=two_pass, STAGES=stages,
        EVEN_COLS=n_cols == triton.next_power_of_2(n_cols), EVEN_ROWS=n_rows % rows == 0, num_warps=num_warps,
    )
    dw = new_output((n_cols,), weight.dtype, x2d.device)
    db = new_output((n_cols,), weight.dtype, x2d.device) if has_bias else None
    _sum_partials_kernel[(triton.cdiv(n_cols, _SUM_COLUMNS),)](
        dw_partial, db_partial, dw, db if db is not None else dw, programs, n_cols,
        HAS_BIAS=has_bias, BLOCK_P=_SUM_PROGRAMS, BLOCK_C=_SUM_COLUMNS, num_warps=4,
    )
    return dx, dw, db


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, is_rms: bool, tuning_group):
        x2d = _rows_2d(x)
        y, mean, rstd = norm_forward(x2d, weight, bias, eps, is_rms, tuning_group)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.has_bias, ctx.tuning_group = bias is not None, tuning_group
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = norm_backward(_rows_2d(dy), x2d, weight, mean, rstd, ctx.has_bias, ctx.tuning_group)
        return dx.view(dy.shape), dw, db, None, None, None


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, name: str) -> None:
    hidden = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or hidden == 0 or x.numel() == 0:
        raise ValueError(f"{name} needs an input with a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name} supports float16, bfloat16 and float32 inputs, got {x.dtype}")
    if weight.shape != (hidden,):
        raise ValueError(f"{name}: weight shape {tuple(weight.shape)} does not match the hidden size {hidden}")
    if bias is not None and bias.shape != (hidden,):
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)} does not match the hidden size {hidden}")
    if hidden > MAX_HIDDEN_SIZE:
        raise ValueError(f"{name}: hidden size {hidden} is above the supported {MAX_HIDDEN_SIZE}")
    if eps <= 0:
        raise ValueError(f"{name}: eps must be positive, got {eps}")
    check_device(x, weight, *([bias] if bias is not None else []))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
               tuning_group=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension; differentiable.

    ``tuning_group``: ranks that compute the same norm (tensor-parallel ranks outside sequence
    parallelism) pass their process group, so they all pick one launch setting on the GPU and
    their results stay bit-identical (see ``LaunchTuner``).
    """
    _check(x, weight, bias, eps, "layer_norm")
    bias = None if bias is None else bias.contiguous()
    return _NormFunction.apply(x, weight.contiguous(), bias, float(eps), False, tuning_group)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, tuning_group=None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension; differentiable. ``tuning_group``
    as in ``layer_norm``."""
    _check(x, weight, None, eps, "rms_norm")
    return _NormFunction.apply(x, weight.contiguous(), None, float(eps), True, tuning_group)
