"""Work in progress (being written in this change)."""
