"""What lmms-eval 0.7.3's `openai_compatible` model really sends (tests/fixtures/lmms_eval/requests_0.7.3.json,
reconstructed from the released package's source; its `source` says from which files), replayed with the openai
client the way lmms-eval sends it, one by one and from 32 threads (its num_concurrent): images (MME, POPE) and videos
(ActivityNet-QA with pass_video_url=True, the server started with --media-root), each answered with generate.py's
answer for the same media and text.

POPE's tasks send `top_p: 0`, kept here as lmms-eval sends it (with temperature 0 it changes nothing)."""
from __future__ import annotations

import base64
import io
import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI
from PIL import Image

from conftest import FIXTURE, ROOT, fixture_config, read_jsonl, run_generate
from serve_helpers import Server

REPLAY = json.loads((ROOT / "tests" / "fixtures" / "lmms_eval" / "requests_0.7.3.json").read_text())["requests"]
KEY = "sk-lmms"  # lmms-eval's client needs OPENAI_API_KEY; the docs start the server with a key


def png_base64(path: str) -> str:
    """lmms-eval's image: the document's image .convert('RGB') (the tasks' doc_to_visual), saved as PNG."""
    buffer = io.BytesIO()
    with Image.open(FIXTURE / path) as image:
        image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def payload(request: dict) -> dict:
    """The request's payload with its placeholders filled in."""
    text = json.dumps(request["payload"]).replace("{fixture}", str(FIXTURE))
    return json.loads(re.sub(r"\{png:([^}]+)\}", lambda m: png_base64(m.group(1)), text))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, str]:
    """generate.py's answer for each replayed request: the same media file and the text lmms-eval sends."""
    answers = {}
    for kind in ("image", "video"):
        asked = [r for r in REPLAY if kind in r["doc"]]
        tmp = tmp_path_factory.mktemp(f"lmms_eval_{kind}s")
        records = [{"index": i, kind: r["doc"][kind], "question": text_of(r)} for i, r in enumerate(asked)]
        (tmp / "asked.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        run = run_generate(fixture_config(test_files=[str(tmp / "asked.jsonl")], vision_prompt_dict=kind), tmp)
        assert run.returncode == 0, run.stderr[-3000:]
        by_index = {r["index"]: r["text_output"] for r in read_jsonl(tmp / "answers.jsonl")}
        answers.update({r["name"]: by_index[i] for i, r in enumerate(asked)})
    return answers


def text_of(request: dict) -> str:
    [text] = [p["text"] for p in request["payload"]["messages"][0]["content"] if p["type"] == "text"]
    return text


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = Server(fixture_config(), tmp_path_factory.mktemp("lmms_eval"), "--media-root", str(FIXTURE),
                 cwd=FIXTURE, api_key=KEY)
    try:
        srv.wait_ready()
        yield OpenAI(api_key=KEY, base_url=srv.url + "/v1")  # as lmms-eval builds it (OPENAI_API_BASE, ..._KEY)
    finally:
        assert srv.stop() == -signal.SIGTERM, srv.log()[-3000:]


def replies(client, requests: list[dict], threads: int = 1) -> list[str]:
    def send(request):
        return client.chat.completions.create(**payload(request)).choices[0].message.content

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, requests))


@pytest.mark.parametrize("task", ["mme", "activitynetqa", "pope_adv"])
def test_lmms_eval_requests_get_generate_answers(task, client, generated):
    asked = [r for r in REPLAY if r["task"] == task]
    assert len(asked) >= 2
    assert replies(client, asked) == [generated[r["name"]] for r in asked]


def test_lmms_eval_at_its_concurrency_gets_the_same_answers(client, generated):
    asked = REPLAY * 4
    assert replies(client, asked, threads=32) == [generated[r["name"]] for r in asked]
