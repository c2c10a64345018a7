"""photolens: photo stores into knowledge."""

__version__ = "0.1.0"
