"""HTTP API: one blueprint per surface (classify, models, health)."""
