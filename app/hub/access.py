"""How we reach the Hub: endpoint, token, cache folder and offline flag, plus the keyring-backed token.

The token lives only in the OS keyring (service "Kestrel", user "huggingface"), never in a plain file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import HubOfflineError, TokenStoreError

KEYRING_SERVICE = "Kestrel"
KEYRING_USER = "huggingface"


def _keyring_failure(action: str, exc: BaseException) -> TokenStoreError:
    return TokenStoreError(
        f"cannot {action} the Hugging Face token in the OS keyring ({exc.__class__.__name__}: {exc})",
        hint="Install/unlock a keyring service (GNOME Keyring, KWallet, macOS Keychain, Windows Credential "
             "Manager), or set the HF_TOKEN environment variable instead.",
    )


def get_token() -> str | None:
    """The stored token, or None when there is none or no keyring backend exists (public repos still work)."""
    import keyring
    from keyring.errors import KeyringError

    try:
        return keyring.get_password(KEYRING_SERVICE, KEYRING_USER) or None
    except (KeyringError, RuntimeError, OSError):
        return None


def set_token(token: str) -> None:
    """Store the token in the OS keyring; raises TokenStoreError when there is no usable backend."""
    import keyring
    from keyring.errors import KeyringError

    token = token.strip()
    if not token:
        raise TokenStoreError("the token is empty", hint="Paste a token from huggingface.co/settings/tokens.")
    try:
        keyring.set_password(KEYRING_SERVICE, KEYRING_USER, token)
    except (KeyringError, RuntimeError, OSError) as e:
        raise _keyring_failure("store", e) from e


def delete_token() -> None:
    """Remove the stored token; no error when none was stored."""
    import keyring
    from keyring.errors import KeyringError, PasswordDeleteError

    try:
        keyring.delete_password(KEYRING_SERVICE, KEYRING_USER)
    except PasswordDeleteError:
        return
    except (KeyringError, RuntimeError, OSError) as e:
        raise _keyring_failure("delete", e) from e


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class HubAccess:
    """Connection settings passed to every hub call, so tests and mirrors can point elsewhere.

    endpoint: None means huggingface_hub's default (HF_ENDPOINT or https://huggingface.co).
    token: None means the keyring token, then huggingface_hub's own (HF_TOKEN, `hf auth login`).
    cache_dir: where small files (config.json, README) are cached; None = the HF cache.
    offline: True, or HF_HUB_OFFLINE=1 in the environment, forbids all network access.
    """

    endpoint: str | None = None
    token: str | None = None
    cache_dir: str | None = None
    offline: bool = False

    @property
    def is_offline(self) -> bool:
        return self.offline or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")

    def resolved_token(self) -> str | None:
        """Explicit token, else the keyring's; None lets huggingface_hub use its own stored token."""
        return self.token or get_token()

    def token_in_use(self) -> bool:
        """Whether requests will carry a token (decides between 'add a token' and 'token refused')."""
        if self.resolved_token():
            return True
        from huggingface_hub import get_token as hf_get_token

        return bool(hf_get_token())

    def api(self):  # -> huggingface_hub.HfApi (imported lazily: the import costs ~0.3 s)
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.resolved_token())

    def require_online(self, what: str) -> None:
        if self.is_offline:
            raise HubOfflineError("offline mode is on, so the Hub cannot be reached", path=what,
                                  hint="Turn offline mode off (or unset HF_HUB_OFFLINE), or use a model "
                                       "already in your library.")
