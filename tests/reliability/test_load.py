"""Load: 64 edges at once through a real `offramp cloud serve` for most of a minute, with a KV budget small enough
that sessions are evicted and rebuilt all along: no error of any kind, tokens flowing, memory flat after warm-up,
the KV budget held, and no session left behind. `scripts/soak` runs the same driver for as long as asked."""

from __future__ import annotations

import pytest

from offramp.bench.load_driver import MB, LoadConfig, run_load
from tests.reliability.processes import Cloud, full_model, tiny_dir  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SESSIONS = 64
DURATION_S = 45.0
KV_BUDGET_MB = 1.0  # about 50 of the 64 sessions' deep KV: the budget binds
RSS_GROWTH_LIMIT = 48 * MB


@pytest.fixture
def budget_cloud(tiny_dir, tmp_path):  # noqa: F811
    cloud = Cloud(tiny_dir, tmp_path / "cloud.log", ["--kv-budget-mb", str(KV_BUDGET_MB), "--max-sessions-per-client", str(SESSIONS)])
    yield cloud.ensure()
    cloud.stop()


async def test_64_sessions_for_most_of_a_minute_without_an_error(budget_cloud, full_model) -> None:  # noqa: F811
    config = LoadConfig(url=budget_cloud.url, sessions=SESSIONS, duration_s=DURATION_S, warmup_s=10.0)
    report = await run_load(config, full_model, budget_cloud.pid)
    print(report.summary())
    assert report.errors == 0, report.summary()
    assert report.requests >= SESSIONS and report.cloud_tokens > 0 and report.edge_tokens > 0 and report.tokens_per_s > 0
    assert report.cloud_escalations >= report.cloud_tokens and report.cloud_uploads > 0  # eager catch-up ran too
    assert report.verified_tokens > 0  # cloud tokens were checked against the full model, and all were right
    assert report.evictions > 0 and report.kv_budget_bytes == KV_BUDGET_MB * MB
    assert report.kv_bytes_max <= report.kv_budget_bytes, report.summary()
    assert report.sessions_left == 0, report.summary()
    assert report.rss_growth is not None and report.rss_growth < RSS_GROWTH_LIMIT, report.summary()
    assert budget_cloud.alive()
