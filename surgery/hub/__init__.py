"""Hugging Face Hub pull and push, through ``huggingface_hub`` (its cache, token and endpoint).

Pull (:func:`open_hub`, which :func:`surgery.open_checkpoint` calls for ``org/name[@revision]``):
the config, index and tokenizer files are fetched into the Hugging Face cache (``snapshot_download``
with those patterns only); each safetensors shard not already cached has its header read with two
ranged requests (its first 8 bytes, then the header's), so the :class:`Checkpoint` is built, and
every input checked against the others, before one weight byte moves. A shard is downloaded, whole
and into the cache, at its first read (:func:`fetch_pending`, which the readers call when they
first open a shard), and the next shard of that checkpoint follows in the background. With ``HF_HUB_OFFLINE=1``
only the cache is used.

Push (:func:`push`): a complete output folder goes to a repo in several commits (weights first in
batches of ``commit_size`` bytes, then index, config, tokenizer and card), each one
``HfApi.create_commit``. A rerun after an interruption asks the remote what it has (paths-info)
and commits only what differs; LFS objects uploaded before a failed commit are not sent again (the
LFS batch answer says so). Progress (file hashes, the pull request a push opened) is kept in
``~/.cache/surgery/push``. The token comes from ``huggingface_hub`` (``HF_TOKEN`` or the stored
login) and never appears in a message.
"""
from __future__ import annotations

from ..errors import PushError
from .messages import describe, redact
from .pull import fetch_pending, open_hub
from .push import DEFAULT_COMMIT_SIZE, PushResult, check_push, push

__all__ = ["DEFAULT_COMMIT_SIZE", "PushError", "PushResult", "check_push", "describe", "fetch_pending", "open_hub",
           "push", "redact"]
