"""The examples of the seed documentation (``shared/seed``), as written there.

Each module is one pattern's code, copied verbatim except for what the seed leaves to
the reader (``get_order``, ``get_db``, the ``Order`` models) and Pattern 1's literal
URL, which reads ``DATABASE_URL`` like the other patterns. ``tests/test_seed_examples.py``
drives them through FastAPI.
"""
