"""Where a server listens (the web UI, an HTTP server): the defaults, and the checks of an address before
serving on it, so that a bad or busy address is one line naming --host or --port, before anything starts.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from minillm.errors import MiniLLMError

DEFAULT_HOST = "127.0.0.1"  # local only; a public link needs --share
DEFAULT_UI_PORT = 7860  # Gradio's usual port
DEFAULT_API_PORT = 8000  # the usual port of OpenAI-compatible servers (vLLM, litgpt)
DEFAULT_RUNS_DIR = "runs"
MIN_PORT, MAX_PORT = 1, 65535
LOCAL_NAMES = ("localhost",)


def check_port_number(port: int) -> int:
    if not MIN_PORT <= port <= MAX_PORT:
        raise MiniLLMError(f"--port must be a whole number from {MIN_PORT} to {MAX_PORT}, got {port}")
    return port


def is_local_host(host: str) -> bool:
    """Whether serving on `host` keeps the server to this machine (a loopback address such as 127.0.0.1)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: local only if every address it names is
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def network_warning(host: str) -> str:
    """What serving the web UI on `host` exposes, or "" for a local address."""
    if is_local_host(host):
        return ""
    return (f"--host {host} is not local: anyone on the network who can reach this machine can use the UI: load "
            "any run the server can read, train on uploads and the files under --data-dir, write runs into "
            "--runs-dir; keep the default --host 127.0.0.1 to serve this machine only")


def api_network_warning(host: str, has_key: bool) -> str:
    """What serving the HTTP API on `host` exposes, or "" for a local address. Without a key it is loud:
    anyone on the network could use the models and the machine's processors."""
    if is_local_host(host):
        return ""
    if has_key:
        return (f"warning: --host {host} is not local: the API is reachable from the network over plain HTTP, "
                "so the key travels unencrypted; put a TLS proxy in front of it for anything but a trusted network")
    rule = "!" * 100
    return (f"{rule}\nWARNING: serving on {host} WITHOUT AN API KEY: anyone who can reach this machine can use "
            "its models and its processors.\nSet --api-key KEY (or the MINILLM_API_KEY variable), or keep the "
            f"default --host {DEFAULT_HOST} to serve this machine only.\n{rule}")


def check_can_serve(host: str, port: int) -> None:
    """Refuse, with a message naming --port or --host, an address the server cannot listen on."""
    check_port_number(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except OSError:
        raise MiniLLMError(f"--host {host} is not a known address; use 127.0.0.1 (this machine only) or "
                           "0.0.0.0 (every network interface)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself will
        try:
            probe.bind(address)
        except OSError as e:
            raise MiniLLMError(_bind_problem(host, port, e)) from None


def _bind_problem(host: str, port: int, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return (f"port {port} is already in use on {host} (another `minillm ui` or another server); "
                f"choose a free one with --port, e.g. --port {port + 1 if port < MAX_PORT else DEFAULT_UI_PORT}")
    if error.errno == errno.EACCES:
        return f"port {port} needs administrator rights on this system; choose one above 1023 with --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0"
    return f"cannot serve on {host}:{port} ({error.strerror or error}); check --host and --port"
