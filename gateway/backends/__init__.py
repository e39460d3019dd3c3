"""One module per serving engine; ``gateway.config.BACKEND_KINDS`` maps kinds to classes."""
from gateway.backends.base import Backend

__all__ = ["Backend"]
