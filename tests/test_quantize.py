"""Token quantization: float16 exactness, int8 per-token absmax error bounds, torch/numpy agreement."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from morphcache.store.quantize import (
    bytes_per_view,
    dequantize,
    dequantize_torch,
    quantization_fidelity,
    quantize,
    token_cosine,
)


def _tokens(seed=0, shape=(4, 49, 64)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 3] *= 20.0  # an outlier channel, as real ViT features have
    return x


def test_float16_round_trip_is_exact_to_fp16():
    x = _tokens()
    q, scales = quantize(x, "float16")
    assert scales is None and q.dtype == np.float16
    np.testing.assert_array_equal(dequantize(q, scales), x.astype(np.float16).astype(np.float32))


def test_int8_error_is_at_most_half_a_step_per_token():
    x = _tokens(1)
    q, scales = quantize(x, "int8")
    assert q.dtype == np.int8 and scales.dtype == np.float16 and scales.shape == x.shape[:-1]
    assert q.min() >= -127 and q.max() <= 127
    y = dequantize(q, scales)
    step = scales.astype(np.float32)[..., None]
    # the scale is rounded to fp16 (relative error <= 2**-11), which can push |x|/scale just past 127
    assert np.all(np.abs(x - y) <= 0.5 * step + np.abs(x) * 2.0**-10 + 1e-7)
    assert token_cosine(x, y).min() > 0.999


def test_int8_zero_token_stays_zero():
    x = _tokens(2)
    x[0, 5] = 0.0
    q, scales = quantize(x, "int8")
    assert scales[0, 5] == 0 and not q[0, 5].any()
    assert not dequantize(q, scales)[0, 5].any()


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (3, 5, 16), elements=st.floats(-1e4, 1e4, width=32)))
def test_int8_bound_holds_for_any_input(x):
    q, scales = quantize(x, "int8")
    y = dequantize(q, scales)
    absmax = np.abs(x).max(-1, keepdims=True)
    assert np.all(np.abs(x - y) <= absmax / 127 * 0.5 * (1 + 2.0**-9) + 1e-6)


def test_dequantize_torch_matches_numpy():
    x = _tokens(3)
    for dtype in ("int8", "float16"):
        q, scales = quantize(x, dtype)
        np.testing.assert_array_equal(dequantize_torch(q, scales).numpy(), dequantize(q, scales))
        assert dequantize_torch(torch.from_numpy(q), None if scales is None else torch.from_numpy(scales)).dtype == torch.float32


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="bfloat8"):
        quantize(_tokens(), "bfloat8")


def test_fidelity_and_bytes():
    x = _tokens(4)
    f8, f16 = quantization_fidelity(x, "int8"), quantization_fidelity(x, "float16")
    assert f8["bytes_per_token"] == 64 + 2 and f16["bytes_per_token"] == 128
    assert 0.999 < f8["cos_mean"] < f16["cos_mean"] <= 1.0
    assert f8["cos_min"] <= f8["cos_p001"] <= f8["cos_mean"]
    assert bytes_per_view("int8", 49, 64, 32) == 49 * 66 + 64 + 36
    assert bytes_per_view("float16", 49, 64, 32) == 49 * 128 + 64 + 36
