"""Kubernetes: sidecar injection (JSON patch) and the mutating admission webhook."""
