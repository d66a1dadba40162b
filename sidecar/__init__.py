"""DotMac Sidecar: authenticate, authorize and instrument requests in front of an unchanged app."""

__version__ = "0.1.0"
