"""What edge and cloud must agree on: wire protocol, hidden-state codecs, config, errors."""

from offramp.shared.version import __version__

__all__ = ["__version__"]
