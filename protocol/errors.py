"""The project's one exception hierarchy.

Every error the project raises on purpose derives from :class:`EdgeError`. Each carries a one-line,
human-readable ``diagnostics()`` that command-line tools print and that services log; no caller
ever needs to show a traceback to explain a failure.  Verification code raises (it never returns
``(ok, err)`` tuples) and fails closed: anything unexpected is a failure, never a pass.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Root of all errors raised by this project."""

    def diagnostics(self) -> str:
        """One line explaining the failure, suitable for a log line or a CLI's stderr."""
        text = str(self) or type(self).__name__
        return " ".join(text.split())


class ConfigError(EdgeError):
    """Configuration is missing, unreadable or inconsistent."""


class MalformedInputError(EdgeError):
    """Bytes or a message could not be decoded: truncated, garbled, oversized or of the wrong shape."""


class StructureError(MalformedInputError):
    """A TPM structure (TPMS_ATTEST, TPMT_SIGNATURE, TPM2B_PUBLIC, ...) failed to unmarshal."""


class EventLogError(MalformedInputError):
    """A TCG event log is malformed. ``offset`` is the byte offset of the offending event."""

    def __init__(self, message: str, *, offset: int | None = None, index: int | None = None) -> None:
        self.offset = offset
        self.index = index
        where = []
        if index is not None:
            where.append(f"event {index}")
        if offset is not None:
            where.append(f"offset {offset}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{message}")


class MessageError(MalformedInputError):
    """A wire message failed strict validation (schema, version, size, encoding)."""


class VerificationError(EdgeError):
    """Evidence or a signed object did not verify. Always means: do not trust."""


class SignatureError(VerificationError):
    """A signature did not verify, or uses an algorithm that is not allowed."""


class QuoteError(VerificationError):
    """A TPM quote failed a check (magic, type, nonce, PCR selection, digest, signature)."""


class EventLogMismatchError(VerificationError):
    """The replayed event log disagrees with the quoted PCR values."""


class PolicyError(VerificationError):
    """Evidence is authentic but does not match the reference values of the device's policy."""


class TpmError(EdgeError):
    """The TPM (or its transport) returned an error. ``rc`` is the TPM response code when known."""

    def __init__(self, message: str, *, rc: int | None = None) -> None:
        self.rc = rc
        super().__init__(message if rc is None else f"{message} (TPM rc 0x{rc:03x})")


class TransportError(EdgeError):
    """The broker or network failed."""


class StorageError(EdgeError):
    """The database or a state file failed."""


class AuthorizationError(EdgeError):
    """The caller is not allowed to do this."""


class ProcessError(EdgeError):
    """An external program the project starts (swtpm, mosquitto, tpm2-tools) failed."""


class UpdateError(EdgeError):
    """An update (TUF metadata or a target) could not be fetched, or the agent refused it."""


class UpdateVerificationError(UpdateError, VerificationError):
    """TUF refused the update repository's metadata or a target (signature, threshold, version,
    expiry, length or hash): never install, never trust."""
