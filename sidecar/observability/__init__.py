"""Logs, metrics and health of the sidecar."""
