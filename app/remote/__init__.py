"""Remote OpenAI-compatible endpoints (another Kestrel, vLLM, TabbyAPI, ...). No Qt, no torch.

`RemoteClient(base_url, api_key, name)`: `list_models()`, `chat(model, messages, settings)` ->
ChatStream (iterate for the engine's Chunks, `cancel()` from any thread). Failures are
app.remote.errors types; keys live in the OS keyring (app.remote.keys); endpoints themselves are
rows of the chat database (app.store).
"""

from .client import ChatStream, RemoteClient, RemoteModel, api_base
from .errors import (
    AuthFailed,
    BadStream,
    EndpointUnreachable,
    ModelGone,
    RemoteError,
    RemoteServerError,
    RequestRefused,
)
from .keys import get_endpoint_key, local_server_key, set_endpoint_key

__all__ = [
    "AuthFailed", "BadStream", "ChatStream", "EndpointUnreachable", "ModelGone", "RemoteClient", "RemoteError",
    "RemoteModel", "RemoteServerError", "RequestRefused", "api_base", "get_endpoint_key", "local_server_key",
    "set_endpoint_key",
]
