"""Guarded inference on the device.

The model runs only in memory (decrypted from a signed package into a buffer, loaded into
onnxruntime from bytes) and only behind :class:`agent.inference.guard.InferenceGuard`, whose
pipeline is: authentication -> model lock -> rate limit -> quota check -> input validation ->
quota charge -> inference -> output hardening -> audit (extraction statistics on the side).

Modules, one idea each:

* ``validate`` - requests checked against the manifest's io signature and the policy's bounds;
* ``limits``   - token buckets, lease and daily quotas, the rollback-protected counter state;
* ``harden``   - what of the model's output a client may see;
* ``monitor``  - PRADA-style extraction detection (Shapiro-Wilk on query distances);
* ``runtime``  - the onnxruntime adapter (session from bytes, zeroization helpers);
* ``guard``    - the pipeline itself; ``http`` - the local HTTP API in front of it.

This module holds the refusals the pipeline raises. Each carries the HTTP status the local API
answers with and a stable machine-readable ``code``; the message is one line for a human.
"""

from __future__ import annotations

from typing import ClassVar

from protocol.errors import AuthorizationError, EdgeError, MalformedInputError, VerificationError

__all__ = [
    "Forbidden",
    "InferenceFailed",
    "InferenceRefused",
    "InvalidInput",
    "ModelLocked",
    "QuotaExceeded",
    "RateLimited",
    "RollbackError",
    "Unauthenticated",
]


class InferenceRefused(EdgeError):
    """A request to the guarded model was refused (or failed). ``status``: the HTTP status to answer."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "refused"


class Unauthenticated(InferenceRefused, AuthorizationError):
    """No token, or a token that belongs to no registered client."""

    status = 401
    code = "unauthenticated"


class Forbidden(InferenceRefused, AuthorizationError):
    """The client is known but may not use this model."""

    status = 403
    code = "forbidden"


class RateLimited(InferenceRefused, AuthorizationError):
    """The client's token bucket is empty. ``retry_after`` is seconds until one request fits."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class QuotaExceeded(InferenceRefused, AuthorizationError):
    """A lease or daily quota has no room for this request."""

    status = 403
    code = "quota_exceeded"


class InvalidInput(InferenceRefused, MalformedInputError):
    """The request's inputs do not match the model's io signature or the policy's bounds."""

    status = 400
    code = "invalid_input"


class ModelLocked(InferenceRefused):
    """The model is locked: no lease, lease expired, or the device was revoked."""

    status = 423
    code = "model_locked"


class InferenceFailed(InferenceRefused):
    """The runtime failed on inputs that passed validation (the reason is logged, not returned)."""

    status = 500
    code = "inference_failed"


class RollbackError(VerificationError):
    """Persisted counter state is older than the TPM NV counter (or otherwise not the latest)."""
