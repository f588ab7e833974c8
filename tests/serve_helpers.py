"""Helpers for the server tests: a real serve.py process on 127.0.0.1 and a free port, and request builders."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from conftest import FIXTURE, ROOT

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path, mime: str | None = None) -> str:
    path = Path(path)
    mime = mime or {".jpg": "image/jpeg", ".png": "image/png", ".mp4": "video/mp4", ".json": "application/json"}[
        path.suffix]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_message(question: str, *urls: str) -> list[dict]:
    parts = [{"type": "text", "text": question}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def video_message(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "video_url", "video_url": {"url": url}}]}]


def messages_of(record: dict) -> list[dict]:
    """The chat messages that ask what generate.py asks for a record of the tiny fixture."""
    if "image" in record:
        return image_message(record["question"], data_url(FIXTURE / record["image"]))
    video = record["video"]
    if isinstance(video, list):  # inline base64 frames: the frames of a video, as lmms-eval sends them
        return image_message(record["question"], *[f"data:image/png;base64,{f}" for f in video])
    return video_message(record["question"], data_url(FIXTURE / video))


class Server:
    """serve.py in its own process. `cwd`: where the config's relative paths resolve."""

    def __init__(self, cfg: dict | Path, tmp_path: Path, *flags: str, cwd: Path = ROOT, api_key: str | None = None,
                 device: str = "cpu"):
        """`cfg`: a config as a dict (written to tmp_path) or the path of a config file. The process runs with one
        OpenMP thread: several test processes share two cores."""
        self.api_key = api_key
        config = cfg if isinstance(cfg, Path) else tmp_path / "serve_config.yaml"
        if isinstance(cfg, dict):
            config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.argv = [sys.executable, str(ROOT / "serve.py"), "--config", str(config), "--device", device, *flags]
        if api_key:
            self.argv += ["--api-key", api_key]
        self.tmp_path, self.cwd = tmp_path, cwd
        self.launch()

    def launch(self) -> None:
        """Start serve.py on a port that was free a moment ago (wait_ready starts it again on another should a
        test process beside this one have taken it meanwhile)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.tmp_path / f"server_{self.port}.log"
        self.tmpdir = self.tmp_path / f"tmp_{self.port}"  # the server's own temporary folder
        self.tmpdir.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.tmpdir)}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([*self.argv, "--port", str(self.port)], cwd=self.cwd, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> list[int]:
        """Poll /health until 200; returns every status seen on the way."""
        seen, deadline, tries = [], time.monotonic() + START_TIMEOUT_S, 1
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "another process holds the port" in self.log() and tries < 3:
                    tries += 1
                    self.launch()
                    continue
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                status, _, _ = self.request("GET", "/health")
            except OSError:
                time.sleep(0.05)
                continue
            seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.05)
        raise AssertionError(f"the server was not ready in {START_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120,
                key: bool = True):
        """(status, headers, parsed JSON or text); `body`: a dict (sent as JSON) or bytes."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json", **(headers or {})}
        if key and self.api_key and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, head, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            status, head, raw = err.code, err.headers, err.read()
        head = {k.lower(): v for k, v in head.items()}
        text = raw.decode()
        try:
            return status, head, json.loads(text)
        except json.JSONDecodeError:
            return status, head, text

    def raw(self, data: bytes, timeout: float = 60):
        """Send raw bytes (a request that may stop halfway), then read the reply: (status, parsed JSON body). None
        when the connection was reset before any reply came: a server that answers a body over its limit closes
        the connection with request bytes unread, and the system then resets it, which may drop the answer."""
        reply = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            try:
                sock.sendall(data)
                while chunk := sock.recv(65536):
                    reply += chunk
            except (BrokenPipeError, ConnectionResetError):
                try:  # what came before the reset
                    while chunk := sock.recv(65536):
                        reply += chunk
                except OSError:
                    pass
        if not reply:
            return None
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = b"".join(body.split(b"\r\n")[1::2])
        return status, json.loads(body)

    def chat(self, **body):
        return self.request("POST", "/v1/chat/completions", body)

    def metrics(self) -> dict:
        """{(sample name, sorted labels): value} of GET /metrics, parsed by prometheus-client."""
        from prometheus_client.parser import text_string_to_metric_families

        status, head, text = self.request("GET", "/metrics", key=False)
        assert status == 200 and head["content-type"].startswith("text/plain; version="), head
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def answer_of(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


class MediaWeb:
    """A web server on 127.0.0.1 that serves the files under `root` for the URL-fetching tests, and more:

    /redirect?to=URL   302 to URL            /hold/PATH   the file, once `release` is set (`held` counts waiters)
    /loop              302 to itself         /reset       closes the connection without answering
    /trickle           a byte every 0.2 s    /unsized     64 KiB without a Content-Length
    /big               announces more bytes than any test's limit, then waits for `release`
    """

    def __init__(self, root: Path):
        import functools
        import http.server
        import threading
        import urllib.parse

        web = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path, _, query = self.path.partition("?")
                if path in ("/redirect", "/loop"):
                    self.send_response(302)
                    self.send_header("Location", urllib.parse.parse_qs(query)["to"][0] if query else "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path.startswith("/hold/"):
                    with web.lock:
                        web.held += 1
                    web.release.wait(60)
                    self.path = path[len("/hold"):]
                    super().do_GET()
                elif path in ("/trickle", "/big", "/unsized"):
                    self.send_response(200)
                    if path != "/unsized":
                        self.send_header("Content-Length", "100" if path == "/trickle" else str(10**8))
                    self.end_headers()
                    if path == "/unsized":
                        self.wfile.write(b"x" * 2**16)
                    for _ in range(100 if path == "/trickle" else 0):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                    if path == "/big":
                        web.release.wait(60)
                elif path == "/reset":
                    self.connection.close()
                else:
                    super().do_GET()

        self.held, self.lock, self.release = 0, threading.Lock(), threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client that went away: not the test's news
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def stream_events(server: Server, body: dict) -> list[dict]:
    """The server-sent events of a streamed request, parsed, up to `[DONE]` (which must end the stream)."""
    status, _, text = server.request("POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200, text
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]
