"""The router-signals study's context signals and its fit: the copy flags and the previous confidence per position,
and a logistic fit that gives the exit rule's confidences on the rule's own features."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from offramp.bench.router_signals import context_signals
from offramp.models.corpus import TextSequence
from offramp.models.router import fit_logistic, fit_logistic_weights, logistic_confidence


def test_copy_flags_and_previous_confidence_follow_each_position_of_its_own_text():
    seqs = [TextSequence("a", "chat", "calib", [10, 11, 12, 13, 14], 2), TextSequence("b", "chat", "calib", [20, 21, 22], 1)]
    # scored rows: a predicts from positions 1, 2, 3; b from 0, 1 (score_from - 1 to len - 2)
    data = SimpleNamespace(seq=torch.tensor([0, 0, 0, 1, 1], dtype=torch.int32))
    idx = np.array([0, 1, 2, 3, 4])
    tokens = np.array([10, 99, 12, 21, 99])  # row 0: 10 is in a[:2]; row 2: 12 in a[:4]; row 3: 21 not yet in b[:1]
    max_prob = np.array([0.9, 0.5, 0.7, 0.6, 0.8])
    s = context_signals(seqs, data, idx, tokens, max_prob)
    assert s["in_context"].tolist() == [1, 0, 1, 0, 0]
    assert s["previous_max_prob"].tolist() == [1.0, 0.9, 0.5, 1.0, 0.6]  # a text's first row has no previous
    np.testing.assert_allclose(s["max_prob_change"], max_prob - s["previous_max_prob"])


def test_the_weights_fit_gives_the_exit_rules_confidences():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 6))
    labels = (features[:, 0] + 0.5 * rng.normal(size=400)) > 0
    rule = fit_logistic(features, labels)
    np.testing.assert_allclose(logistic_confidence(features, fit_logistic_weights(features, labels)), rule.from_features(features))
