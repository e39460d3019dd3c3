"""`gateway models build`: export the served models into the layouts each backend expects."""
