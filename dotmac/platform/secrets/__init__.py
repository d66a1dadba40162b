"""`from dotmac.platform.secrets import SecretsManager, VaultProvider` (the seed's API)."""

from sidecar.secrets.manager import SecretsManager
from sidecar.secrets.providers import DecryptionError, EnvProvider, FileProvider, Secret
from sidecar.secrets.vault import VaultProvider

__all__ = [
    "DecryptionError",
    "EnvProvider",
    "FileProvider",
    "Secret",
    "SecretsManager",
    "VaultProvider",
]
