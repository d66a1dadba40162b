"""What the app needs to know: secrets from a provider, injected as headers or files.

The names below load on first use, so that the sidecar, which imports only the modules
it needs, does not load the Vault client (hvac, requests) unless Vault is configured.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EnvProvider": "sidecar.secrets.providers",
    "FileProvider": "sidecar.secrets.providers",
    "Secret": "sidecar.secrets.providers",
    "SecretsManager": "sidecar.secrets.manager",
    "VaultProvider": "sidecar.secrets.vault",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sidecar.secrets' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
