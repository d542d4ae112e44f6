"""The update repository (TUF, python-tuf's metadata API): roles, keys, targets, serving (docs/updates.md)."""
