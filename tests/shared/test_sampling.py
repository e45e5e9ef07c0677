"""Token choice shared by edge and cloud."""

import numpy as np
import pytest

from offramp.shared.sampling import SamplingParams, pick_token


def test_greedy_is_argmax() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert pick_token(logits, SamplingParams(), u=0.99) == 1


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    params = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(0)
    counts = np.bincount([pick_token(logits, params, rng.random()) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_top_p_cuts_the_tail() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    params = SamplingParams(temperature=1.0, top_p=0.6)
    assert {pick_token(logits, params, u) for u in np.linspace(0, 0.999, 50)} == {0, 1}


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"temperature": float("nan")}])
def test_bad_params_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
