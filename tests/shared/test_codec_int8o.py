"""The outlier-aware int8 codec: fp16 outliers, int8 steps for the rest, the declared size, bad payloads refused."""

from __future__ import annotations

import numpy as np
import pytest

from offramp.shared.codecs import CodecError, get_codec


def _hidden(rows: int = 5, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(rows, width)).astype(np.float32)
    h[:, 7] *= 300.0  # massive activations, as in real Llama hidden states
    h[:, width - 3] *= -120.0
    return h


def test_outliers_travel_as_fp16_and_the_rest_beats_plain_int8() -> None:
    """Issue 14, defect 9: the outliers are fp16 (not exact, as the README said), k=8 of them at 4 bytes each."""
    h = _hidden()
    int8o, int8 = get_codec("int8o"), get_codec("int8")
    got = int8o.decode(int8o.encode(h), *h.shape)
    plain = int8.decode(int8.encode(h), *h.shape)
    assert np.allclose(got[:, [7, 61]], h[:, [7, 61]].astype(np.float16), rtol=0, atol=0)
    rest = np.ones(h.shape[1], bool)
    rest[[7, 61]] = False
    err_o = np.abs(got[:, rest] - h[:, rest]).max()
    err_plain = np.abs(plain[:, rest] - h[:, rest]).max()
    assert err_o < err_plain / 20
    assert len(int8o.encode(h)) == int8o.nbytes(*h.shape) == 5 * (64 + 4 + 4 * 8)


def test_narrow_rows_and_empty_input() -> None:
    codec = get_codec("int8o")
    h = np.array([[1.0, -2.0]], dtype=np.float32)  # narrower than k
    assert np.allclose(codec.decode(codec.encode(h), 1, 2), h)
    empty = np.zeros((0, 8), np.float32)
    assert codec.decode(codec.encode(empty), 0, 8).shape == (0, 8)


def test_bad_payloads_are_codec_errors() -> None:
    codec = get_codec("int8o")
    h = _hidden(2, 16)
    payload = bytearray(codec.encode(h))
    with pytest.raises(CodecError):
        codec.decode(bytes(payload[:-1]), 2, 16)
    payload[4 * 2 + 2 * 16] = 0xFF  # first outlier index -> 0x..FF, beyond the width
    payload[4 * 2 + 2 * 16 + 1] = 0xFF
    with pytest.raises(CodecError):
        codec.decode(bytes(payload), 2, 16)
    with pytest.raises(CodecError):
        codec.encode(np.full((1, 4), np.nan, np.float32))
