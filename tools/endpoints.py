"""Which served endpoints a tool may call, and with which key.

Loopback addresses are always allowed (a vLLM/TGI server on this machine). Any other host must
be allowed by the server operator (`python -m server --allow-endpoint HOST`, kept in
$LLM_FT_ALLOWED_ENDPOINTS so background jobs see the same list). Link-local addresses (the
cloud metadata services live there: 169.254.169.254, fd00:ec2::254) are refused always, even
when allowed. No API key is ever sent unless the caller names the environment variable that
holds the key for that endpoint: a key meant for one service never reaches another.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import urllib.parse

from .errors import UserError
from .workspace import short

ALLOW_ENV = "LLM_FT_ALLOWED_ENDPOINTS"
# Metadata services outside the link-local ranges (Alibaba Cloud, Oracle legacy, Azure wireserver).
METADATA_IPS = {"100.100.100.200", "192.0.0.192", "168.63.129.16"}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def allowed_hosts() -> set[str]:
    """Hosts the operator allowed (lower-case names or IPs)."""
    return {h.strip().lower() for h in os.environ.get(ALLOW_ENV, "").split(",") if h.strip()}


def set_allowed_hosts(hosts: list[str]) -> None:
    """The server's --allow-endpoint values, shared with child processes through the environment."""
    os.environ[ALLOW_ENV] = ",".join(sorted({h.strip().lower() for h in hosts if h.strip()}))


def _addresses(host: str, port: int) -> list[ipaddress._BaseAddress]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise UserError(f"host '{short(host, 80)}' does not resolve ({exc}).", field="base_url",
                        fix="Check the host name, or use the server's IP address.") from None
    return [ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos]


def _forbidden(addr: ipaddress._BaseAddress) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    a = mapped or addr
    return a.is_link_local or str(a) in METADATA_IPS or a.is_multicast or a.is_unspecified


def check_url(url: str, *, field: str = "base_url") -> str:
    """Return `url` stripped when the policy lets tools call it; UserError naming why not."""
    u = str(url).strip()
    if any(ord(c) < 32 or c == "\x7f" or c.isspace() for c in u):
        raise UserError(f"'{short(url)!r}' contains whitespace or control characters (CR/LF).",
                        field=field, fix="Pass a plain URL such as http://localhost:8000/v1.")
    parts = urllib.parse.urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"'{short(url)}' is not an http(s) URL.", field=field,
                        fix="Pass the server's OpenAI-compatible root, e.g. http://localhost:8000/v1.")
    if parts.username or parts.password:
        raise UserError("has credentials in the URL.", field=field,
                        fix="Drop user:password@ from the URL; name the key's variable in api_key_env.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UserError(f"'{short(url)}' has an invalid port.", field=field,
                        fix="Use host:port with a port from 1 to 65535.") from None
    host = parts.hostname.lower()
    addrs = _addresses(host, port)
    bad = [a for a in addrs if _forbidden(a)]
    if bad:
        raise UserError(f"'{host}' is {bad[0]}, a link-local/metadata address: refused always (it can "
                        "hand out cloud credentials).", field=field,
                        fix="Point base_url at the model server itself (loopback, or a host allowed "
                            "with --allow-endpoint).")
    if all(a.is_loopback for a in addrs):
        return u
    allowed = allowed_hosts()
    if host in allowed or any(str(a) in allowed for a in addrs):
        return u
    raise UserError(f"'{host}' is not loopback and not an allowed endpoint of this server.", field=field,
                    fix=f"Use a server on this machine (http://127.0.0.1:PORT/v1), or restart the MCP server "
                        f"with --allow-endpoint {host} (the operator decides which hosts tools may call).")


def auth_header(api_key_env: str | None, *, field: str = "api_key_env") -> dict[str, str]:
    """Headers for an endpoint call: Authorization only from the variable the caller named."""
    headers = {"Accept": "application/json"}
    if not api_key_env:
        return headers
    if not _ENV_NAME.match(api_key_env):
        raise UserError(f"'{short(api_key_env, 60)}' is not an environment variable name.", field=field,
                        fix="Give the NAME of the variable that holds the key, e.g. VLLM_API_KEY.")
    key = os.environ.get(api_key_env)
    if not key:
        raise UserError(f"the environment variable {api_key_env} is not set in the server's environment.",
                        field=field, fix=f"Set {api_key_env} where the MCP server starts, or drop api_key_env "
                                         "for a server without a key.")
    headers["Authorization"] = f"Bearer {key}"
    return headers
