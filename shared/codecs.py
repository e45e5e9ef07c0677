"""Hidden-state codecs: how layer-K states [n, H] travel from edge to cloud.

int8 keeps one float32 absmax scale per token (H + 4 bytes a token, vs 4H for fp32), which is what makes the
upload cheap; fp16 halves fp32 at no measurable cost in agreement; fp32 is exact (lossless mode, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from offramp.shared.errors import OfframpError


class CodecError(OfframpError, ValueError):
    """A payload that does not decode to the declared shape, or an unknown codec name."""


class HiddenCodec(Protocol):
    name: str

    def encode(self, hidden: np.ndarray) -> bytes: ...

    def decode(self, payload: bytes, rows: int, width: int) -> np.ndarray: ...

    def nbytes(self, rows: int, width: int) -> int: ...


def _check_matrix(hidden: np.ndarray) -> np.ndarray:
    if hidden.ndim != 2:
        raise CodecError(f"hidden states must be 2-D [positions, hidden], got shape {hidden.shape}")
    if not np.isfinite(hidden).all():
        raise CodecError("hidden states contain NaN or inf")
    return np.ascontiguousarray(hidden, dtype=np.float32)


def _check_size(payload: bytes, expected: int, codec: str, rows: int, width: int) -> None:
    if rows < 0 or width <= 0:
        raise CodecError(f"{codec}: bad shape [{rows}, {width}]")
    if len(payload) != expected:
        raise CodecError(f"{codec}: payload of {len(payload)} bytes does not match shape [{rows}, {width}] ({expected} bytes)")


@dataclass(frozen=True)
class FloatCodec:
    name: str
    dtype: str

    def nbytes(self, rows: int, width: int) -> int:
        return rows * width * np.dtype(self.dtype).itemsize

    def encode(self, hidden: np.ndarray) -> bytes:
        return _check_matrix(hidden).astype(self.dtype).tobytes()

    def decode(self, payload: bytes, rows: int, width: int) -> np.ndarray:
        _check_size(payload, self.nbytes(rows, width), self.name, rows, width)
        out = np.frombuffer(payload, dtype=self.dtype).reshape(rows, width).astype(np.float32)
        if not np.isfinite(out).all():
            raise CodecError(f"{self.name}: decoded hidden states contain NaN or inf")
        return out


@dataclass(frozen=True)
class Int8AbsmaxCodec:
    """Symmetric int8 per token: scale = max|x| / 127, stored as float32 before the int8 rows."""

    name: str = "int8"

    def nbytes(self, rows: int, width: int) -> int:
        return rows * (width + 4)

    def encode(self, hidden: np.ndarray) -> bytes:
        hidden = _check_matrix(hidden)
        scale = np.abs(hidden).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(hidden / scale[:, None]), -127, 127).astype(np.int8)
        return scale.tobytes() + q.tobytes()

    def decode(self, payload: bytes, rows: int, width: int) -> np.ndarray:
        _check_size(payload, self.nbytes(rows, width), self.name, rows, width)
        scale = np.frombuffer(payload, dtype=np.float32, count=rows)
        if not np.isfinite(scale).all():
            raise CodecError("int8: scales contain NaN or inf")
        q = np.frombuffer(payload, dtype=np.int8, offset=4 * rows).reshape(rows, width)
        with np.errstate(over="ignore"):
            out = q.astype(np.float32) * scale[:, None]
        if not np.isfinite(out).all():  # a finite scale near float32's max overflows times 127
            raise CodecError(f"int8: scales up to {float(np.abs(scale).max()):.3g} overflow float32 when applied")
        return out


@dataclass(frozen=True)
class Int8OutlierCodec:
    """int8 absmax, but each token's `k` largest-magnitude channels travel apart (uint16 index + fp16 value).

    Llama-family hidden states carry a few huge channels (here max/median |h| is ~60x per token), so plain absmax
    leaves the other channels a handful of levels. Taking the outliers out first restores fine steps for the rest
    at H + 4 + 4k bytes a token. Measured on the default model at K=15, teacher-forced on held-out text (3,504
    positions: the deep layers' argmax on decoded states vs on exact ones): int8 88.2%, k=4 99.26%, k=8 99.54%,
    k=16 99.60%, fp16 99.94%; per-block int8 scales without outliers 96.5% (block 64). k=8 is the default: the
    first to reach 99.5% (lossless mode's agreement target with the default codec), at 612 bytes a token for
    H=576 (1.06x H; fp16 1,152).
    """

    name: str = "int8o"
    k: int = 8

    def nbytes(self, rows: int, width: int) -> int:
        return rows * (width + 4 + 4 * self.k)

    def encode(self, hidden: np.ndarray) -> bytes:
        hidden = _check_matrix(hidden)
        k = min(self.k, hidden.shape[1])
        idx = np.argpartition(-np.abs(hidden), k - 1, axis=1)[:, :k].astype(np.uint16)
        rows = np.arange(hidden.shape[0])[:, None]
        values = hidden[rows, idx].astype(np.float16)
        rest = hidden.copy()
        rest[rows, idx] = 0.0
        scale = np.abs(rest).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(rest / scale[:, None]), -127, 127).astype(np.int8)
        pad = self.k - k  # narrower than k channels: repeat the first outlier, harmless on decode
        if pad:
            idx = np.concatenate([idx, np.repeat(idx[:, :1], pad, axis=1)], axis=1)
            values = np.concatenate([values, np.repeat(values[:, :1], pad, axis=1)], axis=1)
        return scale.tobytes() + q.tobytes() + idx.astype("<u2").tobytes() + values.astype("<f2").tobytes()

    def decode(self, payload: bytes, rows: int, width: int) -> np.ndarray:
        _check_size(payload, self.nbytes(rows, width), self.name, rows, width)
        scale = np.frombuffer(payload, dtype=np.float32, count=rows)
        if not np.isfinite(scale).all():
            raise CodecError(f"{self.name}: scales contain NaN or inf")
        offset = 4 * rows
        q = np.frombuffer(payload, dtype=np.int8, count=rows * width, offset=offset).reshape(rows, width)
        offset += rows * width
        idx = np.frombuffer(payload, dtype="<u2", count=rows * self.k, offset=offset).reshape(rows, self.k)
        values = np.frombuffer(payload, dtype="<f2", count=rows * self.k, offset=offset + 2 * rows * self.k)
        if rows and int(idx.max()) >= width:
            raise CodecError(f"{self.name}: outlier channel index {int(idx.max())} outside width {width}")
        with np.errstate(over="ignore"):
            out = q.astype(np.float32) * scale[:, None]
        out[np.arange(rows)[:, None], idx] = values.reshape(rows, self.k).astype(np.float32)
        if not np.isfinite(out).all():
            raise CodecError(f"{self.name}: decoded hidden states contain NaN or inf")
        return out


CODECS: dict[str, HiddenCodec] = {
    "fp32": FloatCodec("fp32", "<f4"),
    "fp16": FloatCodec("fp16", "<f2"),
    "int8": Int8AbsmaxCodec(),
    "int8o": Int8OutlierCodec(),
}


# int8o: fp16-like agreement at about half fp16's bytes (see Int8OutlierCodec). fp32 is the only exact one.
DEFAULT_CODEC = "int8o"


def get_codec(name: str) -> HiddenCodec:
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"unknown hidden-state codec {name!r}; known: {sorted(CODECS)}") from None
