"""Bytes onto the disk for `python -m lynx.fetch`: a download into `<file>.partial` that resumes where it stopped,
file digests, and the SHA256SUMS manifest that lets a later run tell a file changed since it was fetched.

A partial file is kept when a download stops (network, Ctrl-C, a killed process): the next attempt asks for the
rest with an HTTP `Range` request. huggingface_hub's own download deletes what it got when it fails, which for a
10 GB shard means starting over.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time

import httpx2
from tqdm import tqdm

from errors import InputError, described
from models.weight_files import PARTIAL

CHUNK = 1 << 20
RETRIES = 5  # attempts in a row that bring no byte before a download gives up
TIMEOUT = httpx2.Timeout(60.0, connect=20.0)
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
MANIFEST = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` in the folder checks the files without Lynx


def progress(total: int | None, label: str | None, initial: int = 0) -> tqdm:
    """A bytes progress bar on a terminal (none in a log file, none without a label)."""
    return tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                dynamic_ncols=True, disable=None if label else True, leave=False)


def digest_of(path: str, algorithm: str = "sha256", prefix: bytes = b"", label: str | None = None):
    """The hashlib digest of `prefix` then the file's bytes (a progress bar when `label` is given)."""
    digest = hashlib.new(algorithm, prefix)
    with open(path, "rb") as f, progress(os.path.getsize(path), label) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest


def sha256_of(path: str, label: str | None = None) -> str:
    return digest_of(path, label=label).hexdigest()


def git_blob_sha1(path: str) -> str:
    """The file's git object id: the hub's ETag for a file kept in git rather than LFS."""
    return digest_of(path, "sha1", b"blob %d\0" % os.path.getsize(path)).hexdigest()


class PartialFile:
    """`<target>.partial`: the bytes downloaded so far and their running sha256."""

    def __init__(self, target: str):
        self.path = target + PARTIAL
        self.size = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
        self.digest = digest_of(self.path, label=f"reading {os.path.basename(self.path)}") if self.size else \
            hashlib.sha256()

    def restart(self) -> None:
        open(self.path, "wb").close()
        self.size, self.digest = 0, hashlib.sha256()

    def append(self, response: httpx2.Response, bar: tqdm) -> None:
        with open(self.path, "ab") as f:
            for chunk in response.iter_bytes():  # as it arrives: a chunker's buffer would be lost with the line
                f.write(chunk)
                self.digest.update(chunk)
                self.size += len(chunk)
                bar.update(len(chunk))

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


class Retry(Exception):
    """An answer worth asking again for (a 5xx, 429 or 408 status)."""


def download(client: httpx2.Client, url: str, partial: PartialFile, size: int | None, label: str,
             headers: dict | None = None) -> str:
    """Bring `url` (`size` bytes, None if unknown) into `partial`, resuming from what it holds; returns the whole
    file's sha256. A dropped connection, a timeout or a 5xx answer is retried from where it stopped."""
    failures = 0
    if size is not None and partial.size > size:  # not a start of this file
        partial.restart()
    with progress(size, label, partial.size) as bar:
        while size is None or partial.size < size:
            before = partial.size
            try:
                _get(client, url, partial, dict(headers or {}), bar)
                if size is None:
                    break
                if partial.size > size:
                    raise InputError(f"{url}: the server sent {partial.size} bytes, more than the {size} announced")
                if partial.size < size:
                    raise httpx2.RemoteProtocolError(f"the answer ended after {partial.size} of {size} bytes")
            except (httpx2.TransportError, Retry) as err:
                failures = 0 if partial.size > before else failures + 1
                if failures >= RETRIES:
                    raise InputError(f"{url}: the download stopped {RETRIES} times without progress "
                                     f"({described(err)}); the {partial.size} bytes that arrived are kept in "
                                     f"{partial.path}: run the same command again to resume") from None
                time.sleep(min(2 ** failures, 30))
    return partial.digest.hexdigest()


def _get(client: httpx2.Client, url: str, partial: PartialFile, headers: dict, bar: tqdm) -> None:
    """One GET of what `partial` lacks, appended to it; a server that ignores the range sends the file from its
    start, which replaces what was there."""
    headers["Accept-Encoding"] = "identity"  # the file's own bytes: sizes and ranges count those
    if partial.size:
        headers["Range"] = f"bytes={partial.size}-"
    with client.stream("GET", url, headers=headers, timeout=TIMEOUT) as response:
        if response.status_code in RETRY_STATUS:
            raise Retry(f"HTTP {response.status_code} {response.reason_phrase}")
        if response.status_code == 416:  # the partial file is longer than the file: it is not a start of it
            partial.restart()
            bar.reset()
            raise Retry("HTTP 416: the partial file does not fit the file; starting again")
        if response.status_code >= 400:
            raise InputError(f"{url}: HTTP {response.status_code} {response.reason_phrase}")
        resumed = response.status_code == 206 and \
            response.headers.get("Content-Range", "").startswith(f"bytes {partial.size}-")
        if partial.size and not resumed:
            partial.restart()
            bar.reset()
        partial.append(response, bar)


def manifest_path(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", MANIFEST)


def read_manifest(folder_file: str) -> dict[str, str]:
    """File name -> sha256 of the SHA256SUMS file `folder_file` (empty if there is none)."""
    if not os.path.isfile(folder_file):
        return {}
    with open(folder_file, encoding="utf-8") as f:
        pairs = (line.rstrip("\n").split("  ", 1) for line in f if "  " in line)
        return {name.lstrip("*"): sha for sha, name in pairs}


def recorded_sha256(path: str) -> str | None:
    """The sha256 recorded for `path` when it was fetched, or None."""
    return read_manifest(manifest_path(path)).get(os.path.basename(path))


def record_sha256(path: str, sha256: str) -> None:
    """Write `path`'s sha256 into the SHA256SUMS beside it (other lines kept), atomically."""
    where = manifest_path(path)
    entries = read_manifest(where) | {os.path.basename(path): sha256}
    with open(where + PARTIAL, "w", encoding="utf-8") as f:
        f.writelines(f"{sha}  {name}\n" for name, sha in sorted(entries.items()))
    os.replace(where + PARTIAL, where)


def recorded_files(path: str) -> list[str]:
    """The files of `path` (a file, or a folder's files) whose sha256 was recorded when they were fetched."""
    if os.path.isdir(path):
        names = read_manifest(os.path.join(path, MANIFEST))
        return [os.path.join(path, name) for name in sorted(names) if os.path.isfile(os.path.join(path, name))]
    return [path] if recorded_sha256(path) else []


def existing_folder(path: str) -> str:
    """The nearest folder of `path` (itself or a parent) that exists: where its download will land."""
    folder = os.path.abspath(os.path.dirname(path) or ".")
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder


def free_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free
