"""Batch inference over folders and buckets: through a running gateway (HTTP) or on Ray Data."""
