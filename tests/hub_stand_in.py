"""A stand-in for the model hub and for the release server, on 127.0.0.1, serving the tiny fixture's files under the
released repos' and files' names.

It answers what huggingface_hub 2.4 and lynx.fetch ask (read in huggingface_hub's hf_api.py and file_download.py):
`GET /api/models/{repo}[/revision/{revision}]?blobs=true` (HfApi.model_info: the commit and each file's size, git
object id and LFS sha256), `GET|HEAD /{repo}/resolve/{commit}/{file}` (a file kept in LFS is redirected to
`/lfs/{sha256}`, as the hub redirects to its CDN), and the release folder `GET|HEAD /release/{name}`. Every GET
of a file honours `Range: bytes=N-`. `faults[name]` lists what the next downloads of a file do: "flip" (one
byte flipped), "cut" (the connection closed halfway), "stall" (half sent, then nothing until the server stops).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from conftest import FIXTURE

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".model")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sharded_llm(folder: Path, shards: int = 2) -> dict[str, bytes]:
    """The fixture's LLM folder as the hub holds Vicuna: its weights in shards with an index, plus a README."""
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "pytorch_model.bin"}
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    keys, weight_map = list(state), {}
    for n in range(shards):
        name = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[n::shards]}
        buffer = io.BytesIO()
        torch.save(part, buffer)
        files[name] = buffer.getvalue()
        weight_map.update(dict.fromkeys(part, name))
    files["pytorch_model.bin.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["README.md"] = b"# vicuna (stand-in)\n"
    return files


def released_files(fixture: Path = FIXTURE) -> tuple[dict, dict]:
    """(hub repos -> files, release files) from a fixture folder, under the real names."""
    data = fixture / "data"
    hub = {"QuanSun/EVA-CLIP": {"EVA01_g_psz14.pt": (data / "eva_vit_g.pth").read_bytes(),
                                "EVA02_CLIP_B_psz16_s8B.pt": b"another model"},
           "lmsys/vicuna-7b-v1.1": sharded_llm(data / "vicuna-7b")}
    release = {"finetune_lynx.pt": (data / "finetune_lynx.pt").read_bytes(),
               "pretrain_lynx.pt": (data / "full_lynx.pt").read_bytes()}
    return hub, release


class StandIn:
    """The server; `log` holds (method, path, Range header, Authorization header) of every request, `faults` the
    planned failures."""

    def __init__(self, hub: dict[str, dict[str, bytes]], release: dict[str, bytes]):
        self.hub, self.release = hub, release
        self.lfs = {hashlib.sha256(data).hexdigest(): (name, data) for files in hub.values()
                    for name, data in files.items() if name.endswith(LFS_SUFFIXES)}
        self.faults: dict[str, list[str]] = {}
        self.log: list[tuple[str, str, str | None, str | None]] = []
        self.stop_stalling = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop_stalling.set()
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, name: str) -> list[str | None]:
        """The Range header of each GET of a file's bytes (None: from the start)."""
        paths = {f"/release/{name}"} | {f"/lfs/{sha}" for sha, (n, _) in self.lfs.items() if n == name} | \
            {f"/{repo}/resolve/{COMMIT}/{name}" for repo in self.hub if not name.endswith(LFS_SUFFIXES)}
        return [ranged for method, path, ranged, _ in self.log if method == "GET" and path in paths]

    def listing(self, repo: str) -> dict:
        siblings = []
        for name, data in self.hub[repo].items():
            entry = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        return {"id": repo, "sha": COMMIT, "siblings": siblings}

    def handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                path = self.path.split("?")[0]
                owner.log.append((self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
                listing = re.fullmatch(r"/api/models/(.+?)(/revision/[^/]+)?", path)
                resolve = re.fullmatch(r"/(.+?/.+?)/resolve/[^/]+/(.+)", path)
                if listing and listing.group(1) in owner.hub:
                    return self.send(200, json.dumps(owner.listing(listing.group(1))).encode(), "application/json")
                if resolve and resolve.group(2) in owner.hub.get(resolve.group(1), {}):
                    name, data = resolve.group(2), owner.hub[resolve.group(1)][resolve.group(2)]
                    if name.endswith(LFS_SUFFIXES):
                        return self.redirect(f"/lfs/{hashlib.sha256(data).hexdigest()}")
                    return self.file(name, data, body)
                if path.startswith("/lfs/") and path[5:] in owner.lfs:
                    return self.file(*owner.lfs[path[5:]], body)
                if path.startswith("/release/") and path[9:] in owner.release:
                    return self.file(path[9:], owner.release[path[9:]], body)
                self.send(404, b'{"error": "not found"}', "application/json", {"X-Error-Code": "EntryNotFound"})

            def send(self, status: int, data: bytes, kind: str, headers: dict | None = None):
                self.send_response(status)
                for key, value in {"Content-Type": kind, "Content-Length": str(len(data)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            def redirect(self, location: str):
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def file(self, name: str, data: bytes, body: bool):
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "bytes=0-").group(1))
                headers = {"Accept-Ranges": "bytes", "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                if start >= len(data) and start:
                    return self.send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                fault = owner.faults.get(name, []).pop(0) if body and owner.faults.get(name) else None
                part = bytearray(data[start:])
                if fault == "flip":
                    part[len(part) // 2] ^= 0xFF
                if fault in ("cut", "stall"):
                    self.send_response(206 if start else 200)
                    for key, value in {**headers, "Content-Length": str(len(part))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(part[:len(part) // 2])
                    self.wfile.flush()
                    if fault == "stall":
                        owner.stop_stalling.wait()
                    self.close_connection = True
                    return
                if not body:
                    headers["Content-Length"] = str(len(data))
                    return self.send(200, b"", "application/octet-stream", headers)
                self.send(206 if start else 200, bytes(part), "application/octet-stream", headers)

            def log_message(self, *args):
                pass

        return Handler
