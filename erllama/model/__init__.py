"""The per-model actor and its pure helpers (batch planner, stop-sequence matcher)."""
