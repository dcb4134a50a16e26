"""RoPE inverse frequencies, plain or scaled for a longer context (``model.rope_scaling``).

Each scaling type computes its frequencies with the same float32 operations, in the same order,
as Hugging Face transformers does, so a converted model's cos/sin tables agree to the last bit
where the arithmetic allows: linear divides every frequency by ``factor``; llama3 (Llama 3.1)
divides only the long wavelengths and blends the middle band; yarn blends interpolated and
extrapolated frequencies over a ramp of rotation counts and scales cos and sin by an attention
factor. The tables themselves are built in ``gpt.rope_tables`` and are inputs to every rope
kernel, so the kernels need nothing of their own.
"""

from __future__ import annotations

import math

import torch

from megatron_lite.config import RopeScaling

YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # rotation counts bounding the ramp, when the config leaves them unset


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                        device=None) -> tuple[torch.Tensor, float]:
    """(hd/2,) float32 inverse frequencies and the factor cos and sin are multiplied by."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    plain = 1.0 / (theta**exponents)  # (hd/2,)
    if scaling is None:
        return plain, 1.0
    if scaling.type == "linear":
        return plain / scaling.factor, 1.0
    if scaling.type == "llama3":
        return _llama3(plain, scaling), 1.0
    return _yarn(theta**exponents, head_dim, theta, scaling), yarn_attention_factor(scaling)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Wavelengths above original / low_freq_factor are divided by factor, those below
    original / high_freq_factor kept, and the band between blended linearly in original / wavelength."""
    original = s.original_max_position_embeddings
    long_wavelength, short_wavelength = original / s.low_freq_factor, original / s.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > long_wavelength, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    middle = ~(wavelength < short_wavelength) * ~(wavelength > long_wavelength)
    return torch.where(middle, blended, scaled)


def _yarn(position_freqs: torch.Tensor, head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """Dimensions that rotate more than beta_fast times over the original context keep their frequency,
    those rotating fewer than beta_slow times are interpolated (/ factor), a linear ramp between."""
    beta_fast, beta_slow = s.beta_fast or YARN_BETA_FAST, s.beta_slow or YARN_BETA_SLOW
    low = math.floor(_dimension_of_rotations(beta_fast, head_dim, theta, s.original_max_position_embeddings))
    high = math.ceil(_dimension_of_rotations(beta_slow, head_dim, theta, s.original_max_position_embeddings))
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).to(position_freqs.device)  # 1: extrapolate (keep), 0: interpolate
    interpolated, extrapolated = 1.0 / (s.factor * position_freqs), 1.0 / position_freqs
    return interpolated * (1 - keep) + extrapolated * keep


def _dimension_of_rotations(rotations: float, head_dim: int, theta: float, context: int) -> float:
    """The (fractional) dimension index whose frequency turns ``rotations`` times over ``context`` positions."""
    return (head_dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def yarn_attention_factor(s: RopeScaling) -> float:
    """The cos/sin scale: given, or 0.1 ln(factor) + 1 (weighted by mscale / mscale_all_dim when both are set)."""
    if s.attention_factor is not None:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return float(_mscale(s.factor, s.mscale) / _mscale(s.factor, s.mscale_all_dim))
    return _mscale(s.factor)


def _mscale(factor: float, weight: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0
