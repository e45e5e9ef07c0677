"""Token choice from logits, shared by edge and cloud so both sample the same way.

Randomness is a function of (seed, position): `position_uniforms` gives every position of a generation its own
uniform draws, so the cloud stays stateless, a seeded generation is reproducible whichever side picks a token,
and pipelined drafting (blocks of any size, rejections at any point) never changes which draw a position uses.

Lossless sampling is speculative sampling across the split: the edge draws a draft x from its own distribution q
(truncated to its top `DRAFT_SUPPORT` tokens, sent along as a sparse vector), the cloud accepts it with
probability min(1, p(x)/q(x)) and otherwise samples from the normalised residual max(0, p - q), so every token
is distributed exactly as the full model's p (Leviathan et al. 2023; Chen et al. 2023).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

DRAFT_SUPPORT = 32  # tokens of the edge's draft distribution q sent per draft (q is renormalised over them)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Uniforms:
    """The three independent draws a position may use: the edge's draft, the cloud's accept test, its resample."""

    draft: float
    accept: float
    sample: float


def position_uniforms(seed: int, position: int) -> Uniforms:
    """Uniforms in [0, 1) that depend only on (seed, position): a keyed hash, identical on every machine."""
    digest = hashlib.blake2b(int(position).to_bytes(8, "little"), digest_size=24, key=int(seed).to_bytes(8, "little")).digest()
    a, b, c = (int.from_bytes(digest[i : i + 8], "little") >> 11 for i in (0, 8, 16))
    scale = 1.0 / (1 << 53)
    return Uniforms(a * scale, b * scale, c * scale)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return z - np.log(np.exp(z).sum())


def token_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a token is drawn from: temperature, then top-p (the smallest set reaching top_p); float64 [V].

    Greedy is the one-hot at the argmax. A temperature so small that the logits overflow is greedy too.
    """
    if params.greedy:
        out = np.zeros(len(logits))
        out[int(np.argmax(logits))] = 1.0
        return out
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = logits / params.temperature
    if not np.isfinite(scaled).all():
        return token_distribution(logits, SamplingParams())
    probs = softmax(scaled)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = int(np.searchsorted(np.cumsum(probs[order]), params.top_p) + 1)
        kept = np.zeros_like(probs)
        kept[order[:keep]] = probs[order[:keep]]
        probs = kept / kept.sum()
    return probs


def pick_token(logits: np.ndarray, params: SamplingParams, u: float = 0.0) -> int:
    """Greedy argmax, or inverse-CDF sampling with draw `u` in [0, 1) over tokens in order of falling probability.

    The falling-probability order couples edge and cloud: with the same `u`, similar distributions pick the same
    token, which is what exit mode's sampled tokens rely on to stay close to the full model's.
    """
    if params.greedy:
        return int(np.argmax(logits))
    return sample_from(token_distribution(logits, params), u)


def sample_from(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from a probability vector, tokens in order of falling probability (ties by id)."""
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    index = int(np.searchsorted(cum, u * cum[-1], side="right"))
    return int(order[min(index, int(np.count_nonzero(probs)) - 1, len(order) - 1)])


@dataclass(frozen=True)
class SparseDistribution:
    """A draft distribution q over a few token ids (the rest have probability 0); probs sum to 1."""

    ids: np.ndarray  # [k] int64
    probs: np.ndarray  # [k] float64

    def prob(self, token: int) -> float:
        hit = np.nonzero(self.ids == token)[0]
        return float(self.probs[hit[0]]) if len(hit) else 0.0


def draft_distribution(logits: np.ndarray, params: SamplingParams, support: int = DRAFT_SUPPORT) -> SparseDistribution:
    """The edge's q: its token distribution cut to the `support` most likely tokens and renormalised."""
    probs = token_distribution(logits, params)
    k = min(support, int(np.count_nonzero(probs)))
    top = np.argpartition(-probs, k - 1)[:k]
    top = top[np.argsort(-probs[top], kind="stable")]
    kept = probs[top]
    return SparseDistribution(top.astype(np.int64), kept / kept.sum())


def draw_draft(q: SparseDistribution, u: float) -> int:
    """The edge's draft: an inverse-CDF draw from q (its ids are already in order of falling probability)."""
    index = int(np.searchsorted(np.cumsum(q.probs), u, side="right"))
    return int(q.ids[min(index, len(q.ids) - 1)])


def verify_draft(p: np.ndarray, q: SparseDistribution, draft: int, u: Uniforms) -> tuple[bool, int]:
    """Speculative sampling at one position: (accepted, token). `p` is the full model's token distribution.

    Accept with probability min(1, p(x)/q(x)); on rejection draw from max(0, p - q) normalised. The token is then
    distributed exactly as p, whatever q is.
    """
    qx = q.prob(draft)
    if qx > 0 and u.accept * qx < p[draft]:
        return True, draft
    residual = p.copy()
    residual[q.ids] = np.maximum(0.0, p[q.ids] - q.probs)
    total = residual.sum()
    if total <= 0:  # p == q on q's support: rejection has probability 0, but floats can land here
        return True, draft if p[draft] > 0 else sample_from(p, u.sample)
    return False, sample_from(residual, u.sample)
