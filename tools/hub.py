"""Is the Hugging Face hub usable from here? Checked before any hub call, so an offline machine
answers in seconds instead of after the hub client's ~23 s of retries."""
from __future__ import annotations

import os


def hub_offline() -> bool:
    """True when the environment forbids hub access (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


_probe: dict[str, tuple[float, str | None]] = {}


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the hub endpoint accepts a TCP connection, else why not. A quick probe, so an
    offline machine answers in seconds instead of after the hub client's retries. Cached 60 s."""
    import socket
    import time
    from urllib.parse import urlparse
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection proves nothing: let the client try
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    now = time.monotonic()
    if endpoint in _probe and now - _probe[endpoint][0] < 60:
        return _probe[endpoint][1]
    u = urlparse(endpoint)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                 timeout=timeout).close()
        why = None
    except OSError as exc:
        why = f"cannot connect to {u.hostname}: {exc}"
    _probe[endpoint] = (now, why)
    return why
