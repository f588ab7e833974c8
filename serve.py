"""Serve Lynx over HTTP: an OpenAI-compatible chat endpoint that batches concurrent requests, and a page to try it.

    python serve.py --config configs/LYNX.yaml --device cuda            # http://127.0.0.1:8000
    python serve.py --config configs/tiny.yaml --device cpu             # the tiny model, no download

Endpoints: GET / (the page), GET /health, GET /metrics, GET /v1/models, POST /v1/chat/completions. See
docs/serving.md.
SIGTERM or Ctrl-C: no new connections, the requests in flight are answered, then the process ends (status 143 or
130, as uvicorn ends). Exit status 1: the server could not start (one line: a bad flag or config, a missing weight
file, a port in use, checked before torch is imported) or load the model; 130: Ctrl-C, also while starting.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from configs.decoding import request_limits
from configs.schema import load_config
from dataset.images import MAX_IMAGE_PIXELS
from errors import InputError
from models.weight_files import check_weight_files
from server.fetch import Fetcher
from server.security import LOOPBACK_NAMES, Limits, host_name

log = logging.getLogger("lynx.server")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="./configs/LYNX.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as in generate.py; repeatable")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="lynx", help="the model's id in /v1/models and in requests")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every API request")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve on a non-loopback --host without --api-key (refused otherwise)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAME,...",
                   help="Host names answered besides this machine's own (localhost, 127.0.0.1, ::1, --host); '*': "
                        "any. Checked when --host is a loopback address or when this flag is given (421 otherwise)")
    p.add_argument("--cors-origin", dest="cors_origins", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://app.example.com) call the API; repeatable. "
                        "Without it no CORS headers are sent")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most requests answered as one batch (default: the config's batch_size_test; 1 = off)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the worker waits for more requests to fill a batch")
    p.add_argument("--queue-size", type=int, default=256,
                   help="most requests waiting or being answered; more get 503 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request gets 504")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (413 above)")
    p.add_argument("--max-images", type=int, default=32,
                   help="most image/video parts in one message, and most frames in a .json frame-list video")
    p.add_argument("--max-question-bytes", type=int, default=64 * 2**10,
                   help="largest question (the text of the last message, UTF-8), checked before it is tokenized")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help=f"largest image or frame (width x height), read from its header before it is decoded; at "
                        f"most PIL's limit, {MAX_IMAGE_PIXELS}, which generate.py applies")
    for field, limit in request_limits().items():  # --max-tokens-limit, --num-beams-limit, --top-k-limit
        p.add_argument(f"--{field.replace('_', '-')}-limit", type=int, default=limit,
                       help=f"largest {field} a request may ask (default: %(default)s)")
    p.add_argument("--media-root", default=None,
                   help="allow file:// URLs and paths to files inside this folder (symlinks resolved)")
    p.add_argument("--allow-http-urls", action="store_true", help="let the server fetch http(s) media URLs")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="with --allow-http-urls: also fetch from private, loopback and link-local addresses")
    p.add_argument("--url-timeout", type=float, default=30.0, help="seconds one media URL may take, redirects "
                                                                   "and all")
    p.add_argument("--url-fetch-workers", type=int, default=8,
                   help="most media URLs fetched at once (more get 503 with Retry-After)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def limits_of(args) -> Limits:
    decoding = {field: getattr(args, f"{field}_limit") for field in request_limits()}
    for name in ("batch_size", "queue_size", "max_images", "max_question_bytes", "max_pixels",
                 *(f"{field}_limit" for field in decoding), "url_fetch_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("batch_window_ms", "request_timeout", "max_body_mb", "url_timeout"):
        if not getattr(args, name) >= 0:
            raise InputError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.max_pixels > MAX_IMAGE_PIXELS:
        raise InputError(f"--max-pixels must be at most {MAX_IMAGE_PIXELS} (PIL's limit), got {args.max_pixels}")
    root = None
    if args.media_root is not None:
        root = Path(args.media_root).resolve()
        if not root.is_dir():
            raise InputError(f"--media-root {args.media_root}: not a folder")
    loopback = is_loopback(args.host)
    if not loopback and args.api_key is None and not args.allow_unauthenticated:
        raise InputError(f"--host {args.host} lets other machines use the server: give it an --api-key (or "
                         f"--allow-unauthenticated to serve without one)")
    max_body_bytes = int(args.max_body_mb * 2**20)
    fetcher = None
    if args.allow_http_urls:
        fetcher = Fetcher(args.url_timeout, args.url_fetch_workers, max_body_bytes, args.allow_private_urls)
    return Limits(max_body_bytes=max_body_bytes, max_images=args.max_images,
                  max_question_bytes=args.max_question_bytes, max_pixels=args.max_pixels, decoding=decoding,
                  queue_size=args.queue_size, request_timeout=args.request_timeout,
                  media_root=root, fetcher=fetcher, api_key=args.api_key, allowed_hosts=allowed_hosts(args, loopback),
                  cors_origins=tuple(args.cors_origins))


def is_loopback(host: str) -> bool:
    if host_name(host) == "localhost":
        return True
    try:
        return ipaddress.ip_address(host_name(host)).is_loopback
    except ValueError:  # a name other than localhost: it may resolve to anything
        return False


def allowed_hosts(args, loopback: bool) -> frozenset[str] | None:
    """The Host names the server answers: this machine's own and --allowed-hosts; None (any) for a server on a
    non-loopback address without --allowed-hosts, or with '*' among them."""
    extra = {host_name(name) for name in (args.allowed_hosts or "").split(",") if name.strip()}
    if "*" in extra or (not loopback and args.allowed_hosts is None):
        return None
    return frozenset(LOOPBACK_NAMES | {host_name(args.host)} | extra)


def check_prompt(cfg, where: str) -> None:
    """The server fills only `{question}`: a template needing other record fields cannot be served."""
    from dataset.prompt import format_prompt
    from errors import RecordError

    try:
        format_prompt(cfg.prompt, {"question": "?"}, cfg.lower_text)
    except RecordError as err:
        raise InputError(f"{where}: {err.reason}; the server fills only {{question}}") from None


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (as uvicorn binds it): a port in use is one line at once,
    not after the load, and no other process can take the port meanwhile."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        hint = " (another process holds the port: stop it, or pick another with --port)" if (
            err.errno == errno.EADDRINUSE) else ""
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from None
    sock.set_inheritable(True)
    return sock


def start(args):
    """Everything before serving, cheapest first: the flags, the config, the weight files and the port are checked
    before torch is imported (about 15 s); then the device. Returns the uvicorn server, its socket and the app."""
    limits = limits_of(args)
    cfg = load_config(args.config, args.overrides)
    check_prompt(cfg, args.config)
    check_weight_files(cfg, args.config, args.overrides)
    sock = listening_socket(args.host, args.port)

    import uvicorn

    from lynx.pipeline import LynxPipeline, check_device, default_device
    from server.app import create_app

    device = args.device or default_device()
    check_device(device)
    server = None

    def stop() -> None:
        server.should_exit = True

    app = create_app(lambda: LynxPipeline.build(cfg, device), limits, args.model_name,
                     batch_size=args.batch_size, window=args.batch_window_ms / 1000, on_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.request_timeout + 5))
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (Ctrl-C to stop)", f"[{host}]" if ":" in host else host, port)
    return server, sock, app


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        server, sock, app = start(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted while starting: nothing was served", file=sys.stderr)
        return 130
    try:
        server.run(sockets=[sock])
        status = 1 if app.state.lynx.status == "failed" else 0
    except KeyboardInterrupt:  # uvicorn has answered the requests in flight and logged its shutdown
        status = 130
    if app.state.lynx.loading.unfinished():  # stopped while the model loaded: end now, not after the load
        log.info("stopped while the model was loading")
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
