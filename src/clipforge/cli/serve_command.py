"""``clipforge serve INDEX``: a search page and JSON API on one index, for this machine by default.

The socket is bound here, before uvicorn starts, so a taken port or a bad address is one sentence (and
``--port 0`` picks a free port whose URL is then printed).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from clipforge.errors import ClipforgeError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from clipforge.cli.main import add_threads_option

    parser = sub.add_parser("serve", help="a local search page and JSON API on an index (clipforge[search])",
                            description="Serve a web page and a JSON API (/api/search, /api/health, ...) that search "
                                        "INDEX by text, by image and by example. Ctrl-C stops it.")
    parser.add_argument("index", help="an index folder written by clipforge index")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                             "network)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", default="cpu", help="where the query model runs: cpu, cuda, cuda:N, mps or auto")
    add_threads_option(parser)
    parser.add_argument("--max-upload-mb", type=_megabytes, default=10.0,
                        help="largest image upload accepted, in MiB (default 10)")
    parser.set_defaults(run=run_serve_command)
    return parser


def _port(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text[:20]!r}")
    return int(text)


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1024:
        raise argparse.ArgumentTypeError(f"must be a size in MiB above 0 and at most 1024, got {text[:20]!r}")
    return value


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one sentence saying why there cannot be one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise ClipforgeError(f"--host {host[:60]!r} is not an address this machine can listen on; use 127.0.0.1 "
                             "(this machine) or 0.0.0.0 (all interfaces)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ClipforgeError(f"cannot listen on {host}:{port} ({error.strerror or error}); pick another --port "
                             "or stop what is using it") from None
    sock.set_inheritable(True)
    return sock


def run_serve_command(args: argparse.Namespace) -> int:
    from clipforge.cli.main import apply_threads
    from clipforge.collection.server import create_app, require_web_stack

    require_web_stack()
    import uvicorn

    from clipforge.cli.search_command import _onnx_index
    from clipforge.collection.index import load_index

    onnx = _onnx_index(load_index(args.index))
    if onnx:  # onnxruntime on the CPU; torch is never imported
        from clipforge.runtime import check_cpu_device

        device = check_cpu_device(args.device)
    else:
        from clipforge.cli.devices import resolve_device

        device = str(resolve_device(args.device))
    apply_threads(args, torch_too=not onnx)
    sock = bind(args.host, args.port)
    loopback = is_loopback(args.host)
    if not loopback:
        print(f"clipforge: warning: --host {args.host} is not a loopback address, so other machines can search this "
              "index and fetch its images; there is no login", file=sys.stderr)
    try:
        allowed = None
        if loopback:
            allowed = ["localhost", "127.0.0.1", "[::1]", args.host.lower()]
        app = create_app(args.index, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), device=device,
                         allowed_hosts=allowed)
        port = sock.getsockname()[1]
        shown = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
        if args.host in ("0.0.0.0", "::"):
            shown = "127.0.0.1" if args.host == "0.0.0.0" else "[::1]"
        print(f"clipforge: serving {args.index} at http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down on SIGINT, then re-raises it
            pass
    finally:
        sock.close()
    print("clipforge: server stopped", file=sys.stderr)
    return 0
