"""Policies: YAML rules compiled into an immutable snapshot, and the decisions they make."""

from sidecar.policy.decide import authorize, match
from sidecar.policy.load import load_policy
from sidecar.policy.model import Policy, Rule

__all__ = ["Policy", "Rule", "authorize", "load_policy", "match"]
