"""What can go wrong talking to a remote OpenAI-compatible server, in words a user can act on.

Each type carries a short `title` for a dialog; the message names the endpoint and what happened,
the hint says what to do. Nothing from httpx leaks past app.remote.
"""

from __future__ import annotations

from app.engine.errors import KestrelError


class RemoteError(KestrelError):
    """Base: a remote endpoint could not do what was asked."""

    title = "The server could not answer"


class EndpointUnreachable(RemoteError):
    """No connection: wrong address, server down, no network, or it did not answer in time."""

    title = "Cannot reach the server"


class AuthFailed(RemoteError):
    """401/403: the API key is missing, wrong or not allowed to do this."""

    title = "The API key was refused"


class ModelGone(RemoteError):
    """404 / model_not_loaded: the model is not (or no longer) served there."""

    title = "The model is not available"


class RemoteServerError(RemoteError):
    """5xx, or an error reported inside the stream: the server failed while answering."""

    title = "The server failed"


class RequestRefused(RemoteError):
    """Another 4xx: the server refused the request (a setting it does not accept, prompt too long...)."""

    title = "The server refused the request"


class BadStream(RemoteError):
    """The reply was not the OpenAI format we expect (not an OpenAI-compatible server?)."""

    title = "The server's reply could not be read"
