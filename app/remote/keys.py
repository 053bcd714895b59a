"""API keys of remote endpoints and of the app's local server, kept only in the OS keyring.

Service "Kestrel" (as the Hugging Face token), user "endpoint:<id>" per endpoint row in the chat
database, and "local-server" for the key of the app's own server. Never in SQLite or settings files.
"""

from __future__ import annotations

import secrets

from .errors import RemoteError

KEYRING_SERVICE = "Kestrel"
LOCAL_SERVER_USER = "local-server"


class KeyStoreError(RemoteError):
    """The OS keyring cannot store or delete a key."""

    title = "The key could not be saved"


def _user(endpoint_id: int) -> str:
    return f"endpoint:{int(endpoint_id)}"


def _failure(action: str, exc: BaseException) -> KeyStoreError:
    return KeyStoreError(
        f"cannot {action} the API key in the OS keyring ({exc.__class__.__name__}: {exc})",
        hint="Install/unlock a keyring service (GNOME Keyring, KWallet, macOS Keychain, Windows Credential "
             "Manager) and try again.")


def _get(user: str) -> str | None:
    import keyring
    from keyring.errors import KeyringError

    try:
        return keyring.get_password(KEYRING_SERVICE, user) or None
    except (KeyringError, RuntimeError, OSError):
        return None


def _set(user: str, key: str | None) -> None:
    import keyring
    from keyring.errors import KeyringError, PasswordDeleteError

    try:
        if key and key.strip():
            keyring.set_password(KEYRING_SERVICE, user, key.strip())
        else:
            try:
                keyring.delete_password(KEYRING_SERVICE, user)
            except PasswordDeleteError:
                pass
    except (KeyringError, RuntimeError, OSError) as e:
        raise _failure("store" if key else "delete", e) from e


def get_endpoint_key(endpoint_id: int) -> str | None:
    """The endpoint's key, or None (no key stored, or no keyring: servers without keys still work)."""
    return _get(_user(endpoint_id))


def set_endpoint_key(endpoint_id: int, key: str | None) -> None:
    """Store the key; an empty or None key deletes it."""
    _set(_user(endpoint_id), key)


def local_server_key() -> str:
    """The local server's key: the stored one, or a new random one stored for next time.

    Without a usable keyring the key is still generated (for this session only)."""
    key = _get(LOCAL_SERVER_USER)
    if key:
        return key
    key = secrets.token_urlsafe(24)
    try:
        _set(LOCAL_SERVER_USER, key)
    except KeyStoreError:
        pass
    return key
