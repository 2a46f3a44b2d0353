"""metergate: an LLM gateway that meters every token."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metergate")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"
