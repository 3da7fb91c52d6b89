"""Messages about the Hub: one line, and never a token."""
from __future__ import annotations

import re

_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def redact(text: str, token: str | None = None) -> str:
    """``text`` without the token (the one given, the one ``huggingface_hub`` would send, anything
    shaped like an ``hf_`` token or a bearer credential)."""
    for t in {token, _current_token()}:
        if t:
            text = text.replace(t, "***")
    return _BEARER.sub(r"\1***", _TOKEN_LIKE.sub("hf_***", text))


def _current_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no readable token store: nothing to hide
        return None


def describe(error: BaseException, token: str | None = None) -> str:
    """One line saying what a ``huggingface_hub`` or HTTP error means, token removed."""
    from huggingface_hub import errors as hf

    kinds = [(getattr(hf, "GatedRepoError", ()), "gated repo: accept its conditions on the Hub and use a token that may read it"),
             (getattr(hf, "RepositoryNotFoundError", ()), "repository not found (or private: check the token)"),
             (getattr(hf, "RevisionNotFoundError", ()), "revision not found"),
             (getattr(hf, "RemoteEntryNotFoundError", getattr(hf, "EntryNotFoundError", ())), "file not found in the repo")]
    for kind, meaning in kinds:
        if kind and isinstance(error, kind):
            return meaning
    if isinstance(error, (getattr(hf, "OfflineModeIsEnabled", ()), getattr(hf, "LocalEntryNotFoundError", ()),
                          getattr(hf, "IncompleteSnapshotError", ()))) and _offline():
        return "not in the local cache, and HF_HUB_OFFLINE is set (only the cache is searched)"
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    server = getattr(error, "server_message", None)
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if status is not None:
        text = f"HTTP {status}" + (f": {server.strip()}" if server and server.strip() else f" ({text})" if text else "")
    else:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    text = " ".join(redact(text, token).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
