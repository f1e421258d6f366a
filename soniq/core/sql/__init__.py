"""SQL text and builders, per dialect, and the versioned migrations."""
