"""The offramp version, read from the installed distribution so there is one source of truth."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("offramp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
