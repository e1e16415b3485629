"""The package version, in one place the facade and the serving metadata both read."""

__version__ = "0.1.0"
