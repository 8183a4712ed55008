"""Small helpers shared across the package (atomic writes, hashing, logging)."""
