"""Versioned schema migrations shipped as SQL files (``NNNN_name.sql``)."""
