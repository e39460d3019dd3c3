"""Where mobilenet_v2's ImageNet weight file comes from and where torch's downloader caches
it. No torch or TensorFlow import here: a no-op `models build` asks these questions."""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

TORCHVISION_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"


def torch_cache_path(url: str = TORCHVISION_URL) -> Path:
    """torch.hub.get_dir()/checkpoints/<file>, computed as torch does (TORCH_HOME, XDG_CACHE_HOME)."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(home) / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


def obtainable(url: str, cached: Path, timeout: float = 5.0) -> bool:
    """Is the file cached, or can it be fetched now? (A HEAD request; offline it fails at once.)"""
    if cached.is_file():
        return True
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception:  # offline: URLError, timeouts, HTTP errors
        return False
