"""serve.py as a client sees it: one real server process on 127.0.0.1 (the shared tiny fixture, CPU) for the module.

Answers over HTTP are the fixture's expected answers, which are generate.py's (test_parity pins that), for greedy
and beam search, images and videos; concurrency and batching do not change them; bad requests get OpenAI's error
JSON with the right status, never a 500 or one of the server's own folders, and the server goes on answering;
/metrics counts what happened. The server fetches http(s) URLs (public addresses only): the table's URLs name
private addresses, refused before any connection is made.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI
from PIL import Image

from conftest import FIXTURE, fixture_config, read_jsonl, run_generate
from serve_helpers import Server, answer_of, data_url, image_message, messages_of, video_message

KEY = "sk-test-key"
MAX_IMAGES, MAX_TOKENS = 8, 64
PAGE_ORIGIN = "http://page.test"


def records(kind: str) -> list[dict]:
    return read_jsonl(FIXTURE / "data" / f"Open_VQA_{kind}s_tiny.jsonl")


def expected(name: str) -> dict:
    return {r["index"]: r["text_output"] for r in read_jsonl(FIXTURE / "expected" / f"{name}.jsonl")}


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    """(root, outside): the media root, and a folder outside it; a folder beside the root shares its name's
    prefix (root-private), so that a string-prefix check would take it for the inside."""
    root = tmp_path_factory.mktemp("media_root")
    (root / "pics").mkdir()
    (root / "pics" / "a.jpg").write_bytes((FIXTURE / "images" / "img_a.jpg").read_bytes())
    (root / "bad.mp4").write_bytes(b"\0garbage" * 64)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jpg").write_bytes((FIXTURE / "images" / "img_a.jpg").read_bytes())
    os.symlink(outside / "secret.jpg", root / "pics" / "link.jpg")
    beside = root.parent / f"{root.name}-private"
    beside.mkdir()
    (beside / "secret.jpg").write_bytes((FIXTURE / "images" / "img_a.jpg").read_bytes())
    return root, outside


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_root):
    tmp = tmp_path_factory.mktemp("serve_api")
    srv = Server(fixture_config(), tmp, "--media-root", str(media_root[0]), "--max-images", str(MAX_IMAGES),
                 "--max-tokens-limit", str(MAX_TOKENS), "--max-body-mb", "1", "--allow-http-urls",
                 "--allowed-hosts", "lynx.test", "--cors-origin", PAGE_ORIGIN, cwd=FIXTURE, api_key=KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == -signal.SIGTERM, srv.log()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_health_and_the_key(server, client):
    assert [m.id for m in client.models.list().data] == ["lynx"]
    assert client.models.retrieve("lynx").id == "lynx"
    status, _, body = server.request("GET", "/health", key=False)
    assert status == 200 and body["status"] == "ready"
    assert server.request("GET", "/v1/models", key=False)[0] == 401
    status, _, page = server.request("GET", "/", key=False)
    assert status == 200 and "<title>Lynx</title>" in page


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("decoding", ["greedy", "beam5"])
def test_the_openai_client_gets_generate_answers(client, kind, decoding):
    want = expected(f"{kind}s_{decoding}")
    # greedy: the config's decoding (no decoding field); beam: temperature 0 and Lynx's num_beams
    extra = {} if decoding == "greedy" else dict(temperature=0, extra_body={"num_beams": 5})
    for record in records(kind):
        reply = client.chat.completions.create(model="lynx", messages=messages_of(record), **extra)
        assert reply.choices[0].message.content == want[record["index"]], record["index"]
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 32 and reply.usage.total_tokens == (
            reply.usage.prompt_tokens + reply.usage.completion_tokens)


def test_16_concurrent_clients_get_the_sequential_answers_in_batches(server, client):
    asks = records("image") + records("video")
    sequential = [client.chat.completions.create(messages=messages_of(r), model="lynx").choices[0].message.content
                  for r in asks]
    before = server.request("GET", "/health")[2]

    def one_client(c: int) -> list[tuple[int, str]]:
        own = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        got = []
        for k in range(4):
            i = (c * 4 + k) % len(asks)
            reply = own.chat.completions.create(messages=messages_of(asks[i]), model="lynx")
            got.append((i, reply.choices[0].message.content))
        return got

    with ThreadPoolExecutor(16) as pool:
        results = [pair for got in pool.map(one_client, range(16)) for pair in got]
    assert len(results) == 64
    assert all(text == sequential[i] for i, text in results)
    after = server.request("GET", "/health")[2]
    assert after["answered"] - before["answered"] == 64
    formed = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert max(k for k, v in formed.items() if v) > 1, formed  # batches larger than one were formed
    assert max(formed) <= 3  # the config's batch_size_test


def test_streaming_gives_the_same_answer_in_openai_chunks(server, client):
    record = records("image")[1]
    whole = client.chat.completions.create(model="lynx", messages=messages_of(record)).choices[0].message.content
    stream = client.chat.completions.create(model="lynx", messages=messages_of(record), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_seeded_sampling_repeats_whatever_else_is_waiting(server, client):
    record = records("image")[0]
    ask = dict(model="lynx", messages=messages_of(record), temperature=1.0, top_p=0.9, seed=1234)
    first = client.chat.completions.create(**ask).choices[0].message.content
    others = [dict(model="lynx", messages=messages_of(r)) for r in records("image")]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.chat.completions.create, **o) for o in others]
        again = pool.submit(client.chat.completions.create, **ask)
        [f.result() for f in futures]
    assert again.result().choices[0].message.content == first


def test_null_n_and_stream_as_openai_style_clients_send_them(server):
    record = records("image")[0]
    status, _, body = server.chat(messages=messages_of(record), n=None, stream=None, stream_options=None)
    assert status == 200 and answer_of(body) == expected("images_greedy")[record["index"]], body


def test_the_servers_own_names_and_allowed_hosts_are_answered(server):
    for host in ("127.0.0.1", "localhost", "[::1]", "lynx.test", "LYNX.test."):
        status, _, _ = server.request("GET", "/health", headers={"Host": f"{host}:{server.port}"})
        assert status == 200, host


def test_cors_answers_only_the_given_origin(server):
    preflight = {"Origin": PAGE_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, head, _ = server.request("OPTIONS", "/v1/chat/completions", headers=preflight, key=False)
    assert status == 200 and head["access-control-allow-origin"] == PAGE_ORIGIN
    other = {**preflight, "Origin": "http://attacker.example"}
    status, head, _ = server.request("OPTIONS", "/v1/chat/completions", headers=other, key=False)
    assert status == 400 and "access-control-allow-origin" not in head
    status, head, _ = server.request("GET", "/v1/models", headers={"Origin": "http://attacker.example"})
    assert status == 200 and "access-control-allow-origin" not in head


def test_metrics_count_answers_tokens_refusals_and_batches(server, client):
    before = server.metrics()
    record = records("image")[0]
    replies = [client.chat.completions.create(model="lynx", messages=messages_of(record)) for _ in range(3)]
    server.request("POST", "/v1/chat/completions", {"messages": messages_of(record)},
                   headers={"Content-Type": "text/plain"})
    server.request("GET", "/health", headers={"Host": "attacker.example"})
    after = server.metrics()

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("lynx_request_duration_seconds_count") == 3 and grew("lynx_request_duration_seconds_sum") > 0
    assert grew("lynx_completion_tokens_sum") == sum(r.usage.completion_tokens for r in replies)
    assert grew("lynx_prompt_tokens_sum") == sum(r.usage.prompt_tokens for r in replies)
    assert grew("lynx_refused_requests_total", reason="unsupported_media_type") == 1
    assert grew("lynx_refused_requests_total", reason="host_not_allowed") == 1
    health = server.request("GET", "/health")[2]  # the engine's own counts, as /metrics read them
    assert after[("lynx_batch_size_count", ())] == health["batches"]
    assert after[("lynx_batch_size_sum", ())] == sum(int(k) * v for k, v in health["batch_sizes"].items())
    assert after[("lynx_batch_size_bucket", (("le", "1"),))] == health["batch_sizes"].get("1", 0)
    assert after[("lynx_engine_requests_total", (("outcome", "answered"),))] == health["answered"]
    assert after[("lynx_queue_length", ())] == 0 and after[("lynx_ready", ())] == 1


def good_request_answers(server):
    record = records("image")[0]
    status, _, body = server.chat(messages=messages_of(record))
    assert status == 200, body
    assert answer_of(body) == expected("images_greedy")[record["index"]]


IMG = FIXTURE / "images" / "img_a.jpg"
MAX_QUESTION_BYTES, MAX_PIXELS = 64 * 2**10, 4096 * 4096  # serve.py's defaults


def png_claiming(width: int, height: int) -> str:
    """A data URL of a PNG whose header claims width x height: a real 8 x 8 image with its size rewritten, so that
    only a check of the header, before any decoding, tells."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    png = bytearray(out.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(png[24:29])
    png[12:33] = header + struct.pack(">I", zlib.crc32(header))
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode()


def json_video(frames: list[str]) -> str:
    """A data URL of the original's .json video: a list of base64 frames."""
    return "data:application/json;base64," + base64.b64encode(json.dumps(frames).encode()).decode()


def bad_requests(root, outside) -> list[tuple[str, dict, int, str]]:
    """(name, request, status, words of the message). A request: body, or raw bytes, and headers; GET `path`."""
    img = data_url(IMG)
    ok = image_message("What is in the image?", img)
    text_b64 = base64.b64encode(b"just some text, not a picture").decode()
    wide = io.BytesIO()
    Image.new("I;16", (8, 8), 40000).save(wide, format="PNG")  # PIL's RGB conversion would clip it to white
    wide_b64 = base64.b64encode(wide.getvalue()).decode()
    return [
        ("bad JSON", dict(raw=b'{"messages": [', ), 400, "not valid JSON"),
        ("not an object", dict(raw=b"[1, 2]"), 400, "must be a JSON object"),
        ("no messages", dict(body={"model": "lynx"}), 400, "messages"),
        ("no user message", dict(body={"messages": [{"role": "system", "content": "be brief"}]}), 400,
         "last message must be the user's"),
        ("unknown part type", dict(body={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {}}]}]}), 400,
         "unknown content part type 'input_audio'"),
        ("undecodable base64", dict(body={"messages": image_message("q", "data:image/png;base64,@@@###")}), 400,
         "not valid base64"),
        ("not an image", dict(body={"messages": image_message("q", f"data:image/png;base64,{text_b64}")}), 400,
         "cannot read the image"),
        ("16-bit image", dict(body={"messages": image_message("q", f"data:image/png;base64,{wide_b64}")}), 400,
         "cannot read the image (mode I;16 has more than 8 bits per channel"),
        ("oversize body (Content-Length)", dict(http=http_head(1_100_000) + b'{"messages": ['), 413,
         "over the server's limit"),
        ("oversize body (chunked)", dict(http=chunked(b"x" * 600_000, b"x" * 600_000)), 413, "over the server's limit"),
        ("too many images", dict(body={"messages": image_message("q", *[img] * (MAX_IMAGES + 1))}), 400,
         "--max-images"),
        ("too many frames in a .json video", dict(body={"messages": video_message("q", json_video(
            [img.partition(",")[2]] * (MAX_IMAGES + 1)))}), 400, f"{MAX_IMAGES + 1} frames in the .json video, over "
                                                                 f"the server's limit of {MAX_IMAGES} (--max-images)"),
        ("a question over the byte limit (in characters, under it)", dict(body={"messages": image_message(
            "é" * (MAX_QUESTION_BYTES // 2 + 1), img)}), 400,
         f"the question is {MAX_QUESTION_BYTES + 2} bytes (UTF-8), over the server's limit of {MAX_QUESTION_BYTES} "
         f"(--max-question-bytes)"),
        ("an image over the pixel limit", dict(body={"messages": image_message("q", png_claiming(5000, 4000))}), 400,
         f"5000 x 4000 = 20000000 pixels, over the server's limit of {MAX_PIXELS} (--max-pixels)"),
        ("one frame over the pixel limit", dict(body={"messages": image_message(
            "q", img, png_claiming(4097, 4096), img)}), 400, "over the server's limit of 16777216 (--max-pixels)"),
        ("an image over PIL's own limit", dict(body={"messages": image_message("q", png_claiming(20000, 20000))}),
         400, "more pixels than PIL decodes, over the server's limit of 16777216 (--max-pixels)"),
        ("a .json video frame over the pixel limit", dict(body={"messages": video_message("q", json_video(
            [img.partition(",")[2], png_claiming(8000, 8000)]))}), 400, "(--max-pixels)"),
        ("a .json video that is no frame list", dict(body={"messages": video_message("q", json_video(
            {"frames": []}))}), 400, "a .json video holds a list of base64 frames"),
        ("max_tokens over the limit", dict(body={"messages": ok, "max_tokens": MAX_TOKENS + 1}), 400,
         "--max-tokens-limit"),
        ("n > 1", dict(body={"messages": ok, "n": 2}), 400, "n must be 1"),
        ("wrong key", dict(body={"messages": ok}, headers={"Authorization": "Bearer sk-wrong"}), 401,
         "incorrect API key"),
        ("missing key", dict(body={"messages": ok}, key=False), 401, "needs an API key"),
        ("file:// outside the media root", dict(body={"messages": image_message(
            "q", f"file://{outside / 'secret.jpg'}")}), 403, "outside the server's media root"),
        ("path outside the media root", dict(body={"messages": image_message("q", str(outside / "secret.jpg"))}),
         403, "outside the server's media root"),
        (".. traversal", dict(body={"messages": image_message("q", f"pics/../../{outside.name}/secret.jpg")}), 403,
         "outside the server's media root"),
        ("symlink out of the media root", dict(body={"messages": image_message("q", "pics/link.jpg")}),
         403, "outside the server's media root"),
        ("Basic instead of Bearer", dict(body={"messages": ok}, headers={"Authorization": f"Basic {KEY}"}), 401,
         "incorrect API key"),
        ("a folder beside the media root, sharing its prefix", dict(body={"messages": image_message(
            "q", f"../{root.name}-private/secret.jpg")}), 403, "outside the server's media root"),
        ("text/plain body (a browser's cross-site post)", dict(body={"messages": ok},
                                                              headers={"Content-Type": "text/plain"}), 415,
         "must be JSON sent with 'Content-Type: application/json', got 'text/plain'"),
        ("form body", dict(body={"messages": ok}, headers={"Content-Type": "application/x-www-form-urlencoded"}),
         415, "'Content-Type: application/json'"),
        ("a foreign Host (DNS rebinding)", dict(body={"messages": ok}, headers={"Host": "attacker.example:80"}), 421,
         "does not answer requests for the host 'attacker.example:80'"),
        ("deeply nested JSON", dict(raw=b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400,
         "nested too deeply"),
        ("a lone surrogate in the question", dict(raw=json.dumps({"messages": image_message(
            "what is \ud800 here?", img)}).encode()), 400, "messages.0.content.0.text: the text is not valid Unicode"),
        ("length_penalty 1e308", dict(body={"messages": ok, "length_penalty": 1e308, "num_beams": 2,
                                            "temperature": 0}), 400, "length_penalty: Input should be less than"),
        ("temperature 1e-300", dict(body={"messages": ok, "temperature": 1e-300}), 400, "at least 0.001"),
        ("temperature over OpenAI's 2", dict(body={"messages": ok, "temperature": 1e300}), 400,
         "temperature: Input should be less than or equal to 2"),
        ("seed over 64 bits", dict(body={"messages": ok, "seed": 2**70, "temperature": 1}), 400,
         "seed: Input should be less than"),
        ("a 5,000-character path", dict(body={"messages": image_message("q", "a" * 5000)}), 400,
         "not a usable path (File name too long)"),
        ("undecodable video in the media root", dict(body={"messages": video_message("q", "bad.mp4")}), 400,
         "cannot decode video: not a video file, or a damaged one"),
        ("http URL to this machine", dict(body={"messages": image_message("q", "http://127.0.0.1:9/cat.jpg")}), 403,
         "its host is not a public address"),
        ("http URL to IPv6 loopback", dict(body={"messages": image_message("q", "http://[::1]:9/cat.jpg")}), 403,
         "its host is not a public address"),
        ("http URL to a private network", dict(body={"messages": image_message("q", "http://10.1.2.3/cat.jpg")}), 403,
         "--allow-private-urls"),
        ("http URL to link-local (cloud metadata)", dict(body={"messages": image_message(
            "q", "http://169.254.169.254/latest/meta-data/")}), 403, "its host is not a public address"),
        ("http URL to multicast", dict(body={"messages": image_message("q", "http://224.0.0.1/cat.jpg")}), 403,
         "its host is not a public address"),
        ("unknown model by id", dict(method="GET", path="/v1/models/gpt-4o"), 404, "'gpt-4o' does not exist here"),
        ("a 5,000-character route", dict(method="GET", path="/" + "a" * 5000), 404, "no route /aaa"),
        ("mixed image and video", dict(body={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": img}},
            {"type": "video_url", "video_url": {"url": data_url(FIXTURE / "videos" / "clip_a.mp4")}}]}]}), 400,
         "not both"),
        ("video with no frames", dict(body={"messages": video_message("q", "data:video/mp4;base64,")}), 400,
         "no frames"),
        ("undecodable video", dict(body={"messages": video_message(
            "q", "data:video/mp4;base64," + base64.b64encode(b"\0garbage" * 64).decode())}), 400,
         "cannot decode video"),
        ("no image at all", dict(body={"messages": [{"role": "user", "content": "hello"}]}), 400,
         "no image_url or video_url"),
        ("unknown model", dict(body={"messages": ok, "model": "gpt-4o"}), 404, "does not exist here"),
        ("negative temperature", dict(body={"messages": ok, "temperature": -1}), 400, "temperature"),
        ("unsupported stop", dict(body={"messages": ok, "stop": ["\n"]}), 400, "'stop' is not supported"),
        ("data URL not base64", dict(body={"messages": image_message("q", "data:image/png,abc")}), 400,
         "must be base64"),
        ("unknown route", dict(path="/v1/completions"), 404, "no route"),
    ]


def http_head(length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{size}\r\nConnection: close\r\n\r\n").encode()


def chunked(*parts: bytes) -> bytes:
    """A chunked request body, sent whole: the server reads past its limit before it answers."""
    return http_head(None) + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_bad_requests_get_status_and_message_and_the_server_goes_on(server, media_root):
    table = bad_requests(*media_root)
    assert len(table) >= 40
    for name, spec, status, words in table:
        if "http" in spec:  # a body over the limit: the server answers before reading it all
            answered = server.raw(spec["http"])
            if answered is None:  # reset by the system before the answer could be read: the server refused it
                good_request_answers(server)
                continue
            got, reply = answered
        else:
            got, _, reply = server.request(spec.get("method", "POST"), spec.get("path", "/v1/chat/completions"),
                                           spec.get("raw", spec.get("body")), headers=spec.get("headers"),
                                           key=spec.get("key", True))
        assert got == status, (name, reply)
        error = reply["error"]
        assert words in error["message"], (name, error)
        assert set(error) == {"message", "type", "param", "code"}, name
        # Never the server's own folders (a video decoder's message names its file), never an echo without end.
        message = error["message"]
        assert str(media_root[0]) not in message and str(server.tmpdir) not in message, (name, message)
        assert len(message) < 500, name
        good_request_answers(server)
    assert "Traceback" not in server.log()


def test_files_inside_the_media_root(server, media_root):
    want = expected("images_greedy")[17]  # record 17 asks "What is in the image?" about img_a.jpg
    for url in ("pics/a.jpg", f"file://{media_root[0] / 'pics' / 'a.jpg'}",
                str(media_root[0] / "pics" / ".." / "pics" / "a.jpg")):
        status, _, body = server.chat(messages=image_message("What is in the image?", url))
        assert status == 200 and answer_of(body) == want, (url, body)


def test_a_disconnecting_client_does_not_stop_the_server(server):
    import http.client

    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        body = json.dumps({"messages": messages_of(records("video")[2]), "num_beams": 5, "temperature": 0})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                            "Authorization": f"Bearer {KEY}"})
        conn.sock.close()  # gone before the answer
    good_request_answers(server)


def test_temporary_video_files_are_removed(server, client):
    """A video_url's bytes live in a temporary file until the engine is done with it, also for clients that left
    (the test above) and for videos that do not decode."""
    record = records("video")[0]
    client.chat.completions.create(model="lynx", messages=messages_of(record))
    server.chat(messages=video_message("q", "data:video/mp4;base64," + base64.b64encode(b"\0" * 64).decode()))
    deadline = time.monotonic() + 30
    while list(server.tmpdir.glob("lynx-video-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(server.tmpdir.glob("lynx-video-*")) == []


def test_frame_lists_of_any_length_are_sampled_like_a_video(server, tmp_path):
    frames = records("video")[4]["video"]  # record 129: five base64 frames
    assert len(frames) == 5
    for some in (frames[:3], frames + frames[:2]):
        (tmp_path / "frames.jsonl").write_text(json.dumps({"index": 1, "question": "what is it?", "video": some}))
        cfg = fixture_config(test_files=[str(tmp_path / "frames.jsonl")], vision_prompt_dict="video")
        run = run_generate(cfg, tmp_path, "--overwrite")
        assert run.returncode == 0, run.stderr[-2000:]
        want = read_jsonl(tmp_path / "answers.jsonl")[0]["text_output"]
        status, _, body = server.chat(messages=image_message(
            "what is it?", *[f"data:image/png;base64,{f}" for f in some]))
        assert status == 200 and answer_of(body) == want, body
