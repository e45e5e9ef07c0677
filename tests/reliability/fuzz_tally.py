"""A tally of fuzz inputs tried, printed in pytest's terminal summary (with or without -s), so a run says how
much input the "no bad input crashes anything" claims rest on. A plugin registered on first use: no conftest."""

from __future__ import annotations

from collections import Counter

import pytest

PLUGIN_NAME = "offramp-fuzz-tally"


class FuzzTally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.counts:
            return
        terminalreporter.write_sep("-", "fuzz inputs tried")
        for name, count in sorted(self.counts.items()):
            terminalreporter.write_line(f"{name}: {count}")


def fuzz_tally(config: pytest.Config) -> Counter[str]:
    """The run's counter (tests add `tally[name] += 1` per input sent); registers the summary plugin once."""
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None:
        plugin = FuzzTally()
        config.pluginmanager.register(plugin, PLUGIN_NAME)
    return plugin.counts
