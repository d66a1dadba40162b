"""What the app needs to know: secrets from a provider, injected as headers or files."""

from sidecar.secrets.manager import SecretsManager
from sidecar.secrets.providers import EnvProvider, FileProvider, Secret
from sidecar.secrets.vault import VaultProvider

__all__ = ["EnvProvider", "FileProvider", "Secret", "SecretsManager", "VaultProvider"]
