"""Persistence: SQLModel tables (``models``) and the repository that is the only code touching them."""
