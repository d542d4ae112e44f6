"""Evidence verification: pure code, no I/O. Bytes and values in; typed results or exceptions out."""
