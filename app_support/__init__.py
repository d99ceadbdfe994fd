"""UI-side helpers for app.py: per-browser sessions, the metrics panel, and a tiny offline model for tests."""
