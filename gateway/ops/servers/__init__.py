"""Launchers for real backend servers on this machine (and Docker images where an engine exists)."""
