"""The model vault: protected models on the device, usable only while the fleet server trusts it.

The vault takes encrypted model packages from the fleet server, keeps them on disk as they arrived
(ciphertext only), asks the server for each model's data key with a TPM-resident key bound to the
attested boot state, decrypts in memory only, and serves the model through the inference guard for
as long as the server's lease lasts. See ``docs/model-protection.md`` ("Device side") for the design
and ``docs/agent.md`` ("Model vault") for the operator's view.

Modules, one idea each:

* ``store``     - packages on disk (0600, ciphertext) and the highest accepted version per model;
* ``fetch``     - a chunked download with a small window of outstanding requests;
* ``keys``      - the PCR-bound TPM key, its certification by the AK, unwrapping a data key, and the
                  TPM-sealed secret that authenticates the vault's state file;
* ``counters``  - the vault's state file (versions + quota counters), rollback-protected by the TPM
                  NV monotonic counter;
* ``leases``    - the lease clock (when each unlocked model must lock);
* ``unlock``    - decrypt in memory -> onnxruntime from bytes -> guard;
* ``clients``   - the local API's client table (token hashes, per-client limits);
* ``telemetry`` - usage and extraction statistics for the server, and the local audit log;
* ``vault``     - :class:`~agent.vault.vault.ModelVault`, which wires them into the agent.

This module holds the vault's errors.
"""

from __future__ import annotations

from protocol.errors import EdgeError, MalformedInputError, VerificationError

__all__ = ["FetchError", "KeyReleaseRefused", "VaultError"]


class VaultError(EdgeError):
    """The model vault cannot do what was asked (the message says why, in one line)."""


class FetchError(VaultError, MalformedInputError):
    """A package download failed: a chunk that does not fit the request, or too many retries."""


class KeyReleaseRefused(VaultError, VerificationError):
    """A key release is not used: wrong model or version, expired lease, unknown key, revoked since."""
