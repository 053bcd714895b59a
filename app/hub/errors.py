"""The hub package's exception types, and one translator from huggingface_hub/httpx2 failures to them.

The GUI shows these in a dialog and the CLI prints them on one line, so every message says which
repo/file, what went wrong and what the user can do about it.
"""

from __future__ import annotations

from app.engine.errors import KestrelError


class HubError(KestrelError):
    """Anything that went wrong talking to the Hub or managing downloaded models."""


class HubAuthError(HubError):
    """The repo is gated or private (HTTP 401/403): the user must add or fix a token."""


class HubNotFoundError(HubError):
    """The repo, branch or file does not exist (HTTP 404)."""


class HubNetworkError(HubError):
    """The Hub could not be reached, or the connection broke and retries did not help."""


class HubOfflineError(HubNetworkError):
    """Offline mode is on and what was asked for is not in the local library."""


class HubIntegrityError(HubError):
    """A downloaded file did not match the Hub's checksum, even after fetching it again."""


class DiskFullError(HubError):
    """Not enough free disk space for a download."""


class TokenStoreError(HubError):
    """The OS keyring cannot store or delete the Hugging Face token."""


def translate(exc: BaseException, *, what: str, token_used: bool = False) -> HubError:
    """Turn a huggingface_hub / httpx2 / OS failure into one of our types; `what` names the repo or file."""
    import httpx2
    from huggingface_hub import errors as hf

    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return HubOfflineError("offline mode is on, so the Hub cannot be reached", path=what,
                               hint="Turn offline mode off (or unset HF_HUB_OFFLINE) to browse and download.")
    if isinstance(exc, hf.GatedRepoError):
        if token_used:
            return HubAuthError("the Hub refused your token for this gated repo", path=what,
                                hint="Accept the repo's conditions on huggingface.co with the account that owns "
                                     "the token, and check the token in Settings > Hugging Face has read access.")
        return HubAuthError("this repo is gated and needs a Hugging Face token", path=what,
                            hint="Open the repo page on huggingface.co, accept the conditions, then add a "
                                 "read token in Settings > Hugging Face.")
    if isinstance(exc, hf.RevisionNotFoundError):
        return HubNotFoundError("this branch does not exist", path=what,
                                hint="Refresh the branch list; the uploader may have renamed or deleted it.")
    if isinstance(exc, hf.EntryNotFoundError):
        return HubNotFoundError("this file does not exist on the Hub", path=what,
                                hint="Refresh the branch; the uploader may have changed its files.")
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            if token_used:
                return HubAuthError(f"the Hub refused your token (HTTP {status})", path=what,
                                    hint="Check that the token in Settings > Hugging Face is valid, has read "
                                         "access, and that you accepted the repo's conditions.")
            return HubAuthError(f"the repo is private or gated, or does not exist (HTTP {status})", path=what,
                                hint="Check the name; if it is gated or private, add a Hugging Face read token "
                                     "in Settings > Hugging Face.")
        if status == 404 or isinstance(exc, hf.RepositoryNotFoundError):
            return HubNotFoundError("not found on the Hub (HTTP 404)", path=what,
                                    hint="Check the repo name and branch.")
        if status == 429:
            return HubNetworkError("the Hub is rate-limiting requests (HTTP 429)", path=what,
                                   hint="Wait a minute and try again; adding a token raises the limit.")
        if status is not None and status >= 500:
            return HubNetworkError(f"the Hub had a server error (HTTP {status})", path=what,
                                   hint="Try again later.")
        return HubError(f"the Hub answered HTTP {status}: {exc}", path=what)
    if isinstance(exc, httpx2.TransportError):
        return HubNetworkError(f"network error: {exc.__class__.__name__}: {exc}", path=what,
                               hint="Check your internet connection and try again; downloads resume where "
                                    "they stopped.")
    if isinstance(exc, hf.FileMetadataError):
        return HubNetworkError(f"the server did not answer like the Hugging Face Hub ({exc})", path=what,
                               hint="Check HF_ENDPOINT, proxy and firewall settings.")
    if isinstance(exc, ConnectionError | TimeoutError):
        return HubNetworkError(f"network error: {exc}", path=what,
                               hint="Check your internet connection and try again.")
    return HubError(f"{exc.__class__.__name__}: {exc}", path=what)
