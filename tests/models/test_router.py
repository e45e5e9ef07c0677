"""Exit rules: numpy features, calibration to a target agreement, storage next to the head."""

from __future__ import annotations

import numpy as np
import pytest

from offramp.models.router import certified_threshold, clopper_pearson_upper, fit_logistic, pick_threshold
from offramp.shared.exit_rule import NEVER, ExitRule, load_exit_rule, logit_features, save_exit_rule
from offramp.shared.errors import ArtifactError, SplitConfigError


def test_features_match_softmax_statistics():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 50)) * 3
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    f = logit_features(z)
    ps = np.sort(p, -1)
    np.testing.assert_allclose(f[:, 0], ps[:, -1], rtol=1e-12)
    np.testing.assert_allclose(f[:, 2], -(p * np.log(p)).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(f[:, 3], ps[:, -1] - ps[:, -2], rtol=1e-10)
    np.testing.assert_allclose(logit_features(z[0]), f[0])  # one position [V], as the edge calls it


def test_default_rule_is_max_prob(tmp_path):
    rule = load_exit_rule(tmp_path)  # no router.json
    logits = np.array([2.0, 0.0, 0.0], dtype=np.float32)
    expected = np.exp(2) / (np.exp(2) + 2)
    assert rule.kind == "max_prob"
    assert rule.confidence(logits) == pytest.approx(expected)
    assert rule.confidence(logits, np.zeros(8, np.float32)) == pytest.approx(expected)


def test_pick_threshold_on_a_known_case():
    conf = np.array([0.99, 0.95, 0.95, 0.9, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1])
    agree = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 1], bool)
    # Exiting everything >= 0.8 costs one error out of 10 (the tie at 0.95 exits together).
    assert pick_threshold(conf, agree, 0.9) == (0.8, 0.5, 0.9)
    t, rate, agr = pick_threshold(conf, agree, 1.0)
    assert (t, rate, agr) == (0.99, 0.1, 1.0)  # 0.95 would bring in the wrong one
    assert pick_threshold(np.array([0.5]), np.array([False]), 0.99) == (NEVER, 0.0, 1.0)
    with pytest.raises(SplitConfigError, match="1.5"):
        pick_threshold(conf, agree, 1.5)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose max-prob is exactly P(agree): a calibrated edge, so the answer is known."""
    rng = np.random.default_rng(seed)
    p1 = rng.uniform(0.2, 1.0, n)
    logits = np.zeros((n, 16))
    logits[:, 0] = np.log(p1 * 15 / (1 - p1 + 1e-12))  # softmax max-prob = p1
    agree = rng.uniform(size=n) < p1
    return logits, agree


@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_calibration_meets_target_on_held_out_data(target):
    calib_logits, calib_agree = _synthetic(20_000, 0)
    test_logits, test_agree = _synthetic(20_000, 1)
    for rule in (ExitRule(kind="max_prob"), fit_logistic(logit_features(calib_logits), calib_agree)):
        rule.threshold, rate, agr = pick_threshold(rule.confidences(calib_logits), calib_agree, target)
        assert agr >= target and rate > 0
        exits = rule.confidences(test_logits) >= rule.threshold
        test_agreement = 1 - (exits & ~test_agree).mean()
        assert test_agreement >= target - 0.005
        # Known answer: exit the positions with p1 >= t where mean error of the exited mass = (1 - target).
        grid = np.linspace(0.2, 1.0, 100_001)
        err = np.array([((1 - grid[grid >= t]).sum()) / len(grid) for t in np.linspace(0.2, 1, 801)])
        best_rate = (1 - (np.linspace(0.2, 1, 801)[np.argmax(err <= 1 - target)] - 0.2) / 0.8)
        assert rate == pytest.approx(best_rate, abs=0.03)


def test_rule_round_trips_through_router_json(tmp_path):
    logits, agree = _synthetic(2000, 2)
    rule = fit_logistic(logit_features(logits), agree)
    rule.threshold = 0.77
    save_exit_rule(rule, tmp_path)
    loaded = load_exit_rule(tmp_path)
    assert loaded.threshold == 0.77 and loaded.kind == "logistic"
    np.testing.assert_allclose(loaded.confidences(logits[:5]), rule.confidences(logits[:5]))
    assert loaded.confidence(logits[0]) == pytest.approx(float(rule.confidences(logits[:1])[0]))
    (tmp_path / "router.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="router.json"):
        load_exit_rule(tmp_path)


def test_clopper_pearson_matches_known_bounds():
    # 0 errors in n: the "rule of three", 1 - 0.05**(1/n); 12 in 2,000: the research note's 0.97%.
    assert clopper_pearson_upper(0, 1000) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-6)
    assert clopper_pearson_upper(12, 2000) == pytest.approx(0.0097, abs=5e-5)
    assert clopper_pearson_upper(5, 100) == pytest.approx(0.1023, abs=5e-4)
    assert clopper_pearson_upper(10, 10) == 1.0
    with pytest.raises(SplitConfigError, match="1.5"):
        clopper_pearson_upper(1, 10, level=1.5)


def test_certified_threshold_exits_less_than_the_point_estimate_and_meets_its_bound():
    logits, agree = _synthetic(20_000, 3)
    conf = ExitRule(kind="max_prob").confidences(logits)
    point_t, point_rate, point_agr = pick_threshold(conf, agree, 0.99)
    t, rate, agr, bound = certified_threshold(conf, agree, 0.99)
    assert bound >= 0.99 and agr >= bound  # certified, and the observed agreement is above its own bound
    assert t >= point_t and rate <= point_rate  # the bound costs exits
    errors = round((1 - agr) * len(conf))
    assert 1 - clopper_pearson_upper(errors + 1, len(conf)) < 0.99 or rate == 1.0  # one more error would not certify
    # Too few positions to certify anything: no exits at all.
    assert certified_threshold(np.array([0.9, 0.8]), np.array([True, True]), 0.99)[:3] == (NEVER, 0.0, 1.0)
