"""Pure (no I/O) helpers for TPM 2.0 structures and TCG constants, shared by every role."""
