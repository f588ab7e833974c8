"""serve.py's start-up: a missing weight file, a port in use and a bound out of range are one line before torch is
imported; Ctrl-C while it starts or while the model loads is one line or a quick stop, never a traceback or a wait
for the load."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from conftest import FIXTURE, ROOT, fixture_config, probe_torch

WAIT_S = 120  # a guard against a hang, not a measure


def serve_argv(tmp_path, *flags: str, **overrides) -> list[str]:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(fixture_config(**overrides), sort_keys=False))
    return ["--config", str(tmp_path / "c.yaml"), "--device", "cpu", *flags]


def test_a_missing_weight_file_is_one_line_before_torch(tmp_path):
    proc = probe_torch(ROOT / "serve.py", *serve_argv(tmp_path, checkpoint="./data/nope.pt"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0].startswith("error: a weight file named by the config is missing")
    assert proc.stderr.splitlines()[1].startswith("  checkpoint ./data/nope.pt: no such file")
    assert proc.stderr.splitlines()[-1] == "torch not imported"


def test_a_port_in_use_is_one_line_before_torch(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = probe_torch(ROOT / "serve.py", *serve_argv(tmp_path, "--port", str(port)))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (another process holds the port: stop "
        f"it, or pick another with --port)", "torch not imported"]


@pytest.mark.parametrize("flags, line", [
    (("--max-pixels", "89478486"), "error: --max-pixels must be at most 89478485 (PIL's limit), got 89478486"),
    (("--max-question-bytes", "0"), "error: --max-question-bytes must be at least 1, got 0"),
], ids=["pixels over PIL's limit", "no question"])
def test_a_bound_out_of_range_is_one_line_before_torch(tmp_path, flags, line):
    proc = probe_torch(ROOT / "serve.py", *serve_argv(tmp_path, *flags))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [line, "torch not imported"]


# serve.main in a process whose start-up stops at `target` (touching `reached` there) until it is interrupted.
STALLED = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import lynx.pipeline, serve

def stall(*args, **kwargs):
    pathlib.Path({reached!r}).touch()
    time.sleep(600)

setattr({owner}, {name!r}, stall)
sys.exit(serve.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("owner, name, last_line", [
    ("lynx.pipeline", "check_device", "interrupted while starting: nothing was served"),
    ("lynx.pipeline.LynxPipeline", "build", "stopped while the model was loading"),
], ids=["starting", "loading"])
def test_ctrl_c_while_starting_is_one_line_and_quick(tmp_path, owner, name, last_line):
    """Before uvicorn runs (importing torch, checking the device), and while the model loads on its thread (minutes
    at full size): Ctrl-C ends the process at once with status 130 and no traceback."""
    reached = tmp_path / "reached"
    code = STALLED.format(root=str(ROOT), reached=str(reached), owner=owner, name=name)
    port = socket.create_server(("127.0.0.1", 0))
    argv = serve_argv(tmp_path, "--port", str(port.getsockname()[1]))
    port.close()
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=FIXTURE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:
        deadline = time.monotonic() + WAIT_S
        while not reached.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]  # far less than the stalled 600 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    assert output.splitlines()[-1].endswith(last_line)
