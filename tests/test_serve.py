"""The browser UI (``pixeldiffusion serve``): request validation, the one-at-a-time queue, the
Server-Sent Events stream of live frames, and the real page in headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import math
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="the [ui] extra (starlette, uvicorn) is not installed")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import pixeldiffusion.serve as serve_module  # noqa: E402
from pixeldiffusion.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pixeldiffusion.cli import main  # noqa: E402
from pixeldiffusion.config import CONSISTENCY_SAMPLER, Config, load_config  # noqa: E402
from pixeldiffusion.distill import student_config  # noqa: E402
from pixeldiffusion.generate import consistency_sigmas_of, generate  # noqa: E402
from pixeldiffusion.samplers import SAMPLERS  # noqa: E402
from pixeldiffusion.serve import (  # noqa: E402
    Access,
    JobQueue,
    Limits,
    RequestError,
    grid_png,
    make_app,
    make_entries,
    parse_request,
)
from pixeldiffusion.unet import build_unet  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CLASS_NAMES = "zero,one,two"


def _write_run(run_dir: Path, cfg: Config) -> Path:
    """An untrained tiny UNet of ``cfg`` saved as a real checkpoint (step 1) in ``run_dir``."""
    torch.manual_seed(0)
    model = build_unet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    save_checkpoint(run_dir, 1, model, copy.deepcopy(model), {}, cfg)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_args) -> dict[str, Path]:
    """Tiny checkpoints: unconditional, conditional, and a consistency model with the config
    ``pixeldiffusion distill`` gives the unconditional one (untrained: the UI's path is what is
    tested, not the pictures)."""
    root = tmp_path_factory.mktemp("runs")
    uncond = _write_run(root / "uncond", load_config(None, tiny_args))
    return {"uncond": uncond,
            "cond": _write_run(root / "cond", load_config(None, [
                *tiny_args, "--model.num_classes", "3", "--model.class_names", CLASS_NAMES])),
            "consistency": _write_run(root / "consistency", student_config(uncond))}


@contextlib.contextmanager
def running_server(runs: dict[str, Path], limits: Limits | None = None,
                   access: Access | None = None,
                   names: tuple[str, ...] = ("uncond", "cond")) -> Iterator[tuple[str, JobQueue]]:
    """The real app under uvicorn on a free 127.0.0.1 port, in a thread, offering the
    checkpoints ``names`` of ``runs``."""
    limits, access = limits or Limits(), access or Access()
    entries = make_entries([runs[name] for name in names])
    queue = JobQueue(entries, torch.device("cpu"), limits)
    server = uvicorn.Server(uvicorn.Config(make_app(queue, limits, access), log_level="warning"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", queue
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        queue.close()
        sock.close()


def events_of(client: httpx.Client, url: str) -> list[tuple[str, dict]]:
    """Read an SSE stream to its end: [(event, data)], keep-alive comments dropped."""
    found, kind = [], None
    with client.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                found.append((kind, json.loads(line[len("data: "):])))
    return found


def png_of(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


class Gate:
    """Replaces serve.generate by the real one, paused after its first model call until
    ``release``; records how many run at once and in which order they finish."""

    def __init__(self, monkeypatch) -> None:
        self.open, self.entered = threading.Event(), threading.Event()
        self.active = self.most_active = 0
        self.finished: list[int] = []
        self.lock = threading.Lock()
        monkeypatch.setattr(serve_module, "generate", self)

    def __call__(self, model, cfg, device, *, callback, **kwargs):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)

        def paused(info):
            callback(info)
            self.entered.set()
            self.open.wait(timeout=60)
        try:
            return generate(model, cfg, device, callback=paused, **kwargs)
        finally:
            with self.lock:
                self.active -= 1
                self.finished.append(cfg.sample.seed)

    def release(self) -> None:
        self.open.set()


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ({"steps": 0}, "'steps' must be in [1, 50] (the model's timesteps); got 0"),
    ({"steps": 51}, "must be in [1, 50] (the model's timesteps)"),
    ({"steps": 2.5}, "'steps' must be an integer"),
    ({"steps": True}, "'steps' must be an integer"),
    ({"batch": 65}, "'batch' must be in [1, 64] (the server's --max_batch); got 65"),
    ({"batch": "many"}, "'batch' must be an integer"),
    ({"seed": -1}, "'seed' must be in [0, "),
    ({"sampler": "no_such_sampler"}, "unknown sampler \"no_such_sampler\"; use one of"),
    ({"sampler": ["ddim"]}, "unknown sampler [\"ddim\"]; use one of"),
    ({"stepz": 3}, "unknown parameter 'stepz'; did you mean 'steps'?"),
    ({"checkpoint": "/etc/passwd"}, "unknown checkpoint \"/etc/passwd\""),
    ({"view": "latent"}, "unknown view \"latent\""),
    ({"class": "one"}, "is unconditional (model.num_classes 0); leave class and guidance empty"),
    ({"guidance": 3}, "is unconditional"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_parameters_are_refused_with_one_sentence(runs, body, message):
    entries = make_entries([runs["uncond"], runs["cond"]])
    with pytest.raises(RequestError) as err:
        parse_request(body, entries, Limits())
    assert message in str(err.value)


@pytest.mark.parametrize("body, message", [
    ({"class": "7"}, "class 7 is out of range: this model has 3 classes"),
    ({"class": "too"}, "unknown class 'too'; did you mean 'two'?"),
    ({"class": "all", "batch": 2}, "set batch to 3 or more"),
    ({"guidance": 101}, "'guidance' must be a number in [0, 100]"),
    ({"guidance": float("nan")}, "'guidance' must be a number in [0, 100]"),
    ({"guidance": "strong"}, "'guidance' must be a number in [0, 100]"),
])
def test_conditional_parameters_are_checked(runs, body, message):
    entries = make_entries([runs["cond"]])
    with pytest.raises(RequestError) as err:
        parse_request(body, entries, Limits())
    assert message in str(err.value)


def test_server_limits_bound_steps_and_defaults_come_from_the_checkpoint(runs):
    entries = make_entries([runs["uncond"], runs["cond"]])
    with pytest.raises(RequestError, match=r"\[1, 20\] \(the server's --max_steps\)"):
        parse_request({"steps": 21}, entries, Limits(max_steps=20))
    request = parse_request({"checkpoint": str(runs["cond"]), "class": "two"}, entries, Limits())
    cfg = load_checkpoint(runs["cond"]).config
    assert (request.sampler, request.steps, request.seed) == \
        (cfg.sample.sampler, cfg.sample.steps, cfg.sample.seed)
    assert (request.class_label, request.guidance) == ("2", cfg.sample.guidance)


# --- the API over HTTP -------------------------------------------------------------------------

def test_options_offer_each_checkpoint_its_samplers_and_classes(runs):
    with running_server(runs) as (url, _), httpx.Client(base_url=url) as client:
        options = client.get("/api/options").json()
        page = client.get("/")
    uncond, cond = options["checkpoints"]
    assert uncond["samplers"] == cond["samplers"] == list(SAMPLERS)
    assert CONSISTENCY_SAMPLER not in uncond["samplers"]
    assert uncond["name"] == str(runs["uncond"]) and uncond["num_classes"] == 0
    assert cond["classes"] == CLASS_NAMES.split(",") and cond["max_steps"] == 50
    assert options["limits"] == {"max_steps": 1000, "max_batch": 64, "max_queue": 8}
    assert page.status_code == 200 and 'id="generate"' in page.text


def test_bad_requests_get_400_with_the_message(runs):
    with running_server(runs) as (url, queue), httpx.Client(base_url=url) as client:
        too_many = client.post("/api/generate", json={"steps": 10**6})
        not_json = client.post("/api/generate", content=b"steps=3",
                               headers={"content-type": "application/json"})
        missing = client.get("/api/jobs/nope/events")
    assert too_many.status_code == 400
    assert too_many.json()["error"] == "'steps' must be in [1, 50] (the model's timesteps); " \
                                       "got 1000000"
    assert not_json.status_code == 400 and "must be JSON" in not_json.json()["error"]
    assert missing.status_code == 404
    assert not queue.jobs  # nothing was queued


def test_generate_streams_live_frames_then_the_grid_generate_would_draw(runs):
    body = {"checkpoint": str(runs["uncond"]), "sampler": "ddim", "steps": 10, "seed": 7,
            "batch": 5}
    with running_server(runs, Limits(max_frames=4)) as (url, _), \
            httpx.Client(base_url=url) as client:
        accepted = client.post("/api/generate", json=body)
        assert accepted.status_code == 202
        events = events_of(client, accepted.json()["events"])
        grid = client.get(events[-1][1]["grid"])
        x_t_events = events_of(client, client.post(
            "/api/generate", json={**body, "view": "x_t"}).json()["events"])

    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["queued", "start"] and kinds[-1] == "done"
    frames = [data for kind, data in events if kind == "frame"]
    # max_frames 4 over 10 steps: every 3rd step and the last one
    assert [f["step"] for f in frames] == [3, 6, 9, 10] and frames[0]["steps"] == 10
    assert all(png_of(f["image"]).size == (3 * 34 + 2, 2 * 34 + 2) for f in frames)  # 3 x 2 grid
    # the final grid is exactly what the library draws with these settings
    loaded = load_checkpoint(runs["uncond"])
    cfg = replace(loaded.config, sample=replace(loaded.config.sample, sampler="ddim", steps=10,
                                                seed=7, n_samples=5, nrow=3, batch_size=5))
    expected = grid_png(generate(loaded.model, cfg, torch.device("cpu")).images, 3)
    assert grid.status_code == 200 and grid.content == expected
    assert base64.b64decode(events[-1][1]["image"].split(",", 1)[1]) == expected
    # the x_t view shows the noisy chain, which differs from x0, but ends in the same grid
    x_t_frames = [data for kind, data in x_t_events if kind == "frame"]
    assert x_t_frames[0]["image"] != frames[0]["image"]
    assert x_t_events[-1][1]["image"] == events[-1][1]["image"]


@pytest.mark.parametrize("steps", [1, 2])
def test_a_consistency_checkpoint_is_offered_and_sampled_with_its_own_sampler(runs, steps):
    body = {"checkpoint": str(runs["consistency"]), "sampler": CONSISTENCY_SAMPLER,
            "steps": steps, "seed": 3, "batch": 4}
    with running_server(runs, names=("uncond", "consistency")) as (url, _), \
            httpx.Client(base_url=url) as client:
        uncond, consistency = client.get("/api/options").json()["checkpoints"]
        accepted = client.post("/api/generate", json=body)
        assert accepted.status_code == 202, accepted.text
        events = events_of(client, accepted.json()["events"])

    assert consistency["samplers"] == [CONSISTENCY_SAMPLER]
    assert consistency["defaults"]["sampler"] == CONSISTENCY_SAMPLER
    assert CONSISTENCY_SAMPLER not in uncond["samplers"]
    assert [kind for kind, _ in events][-1] == "done", events[-1]
    # the newest frame is the last model call's, at the sampler's last sigma (not int(sigma))
    loaded = load_checkpoint(runs["consistency"])
    frames = [data for kind, data in events if kind == "frame"]
    assert frames[-1]["step"] == frames[-1]["steps"] == steps
    assert frames[-1]["t"] == pytest.approx(
        consistency_sigmas_of(loaded.config.consistency, steps)[-1], abs=1e-4)
    # the grid is what generate() draws with the same settings
    cfg = replace(loaded.config, sample=replace(loaded.config.sample, steps=steps, seed=3,
                                                n_samples=4, nrow=2, batch_size=4))
    expected = grid_png(generate(loaded.model, cfg, torch.device("cpu")).images, 2)
    assert base64.b64decode(events[-1][1]["image"].split(",", 1)[1]) == expected


def test_a_checkpoint_refuses_the_other_kind_of_sampler_with_one_400(runs):
    with running_server(runs, names=("uncond", "consistency")) as (url, queue), \
            httpx.Client(base_url=url) as client:
        diffusion_sampler = client.post("/api/generate", json={
            "checkpoint": str(runs["consistency"]), "sampler": "ddim", "steps": 2})
        consistency_sampler = client.post("/api/generate", json={
            "checkpoint": str(runs["uncond"]), "sampler": CONSISTENCY_SAMPLER})
    assert diffusion_sampler.status_code == 400
    assert diffusion_sampler.json() == {"error": f"checkpoint '{runs['consistency']}' is a "
                                                 f"consistency model; it samples with sampler "
                                                 f"consistency in 1, 2 or 4 steps, not \"ddim\""}
    assert consistency_sampler.status_code == 400
    assert "is a diffusion model; sampler consistency needs a consistency model" in \
        consistency_sampler.json()["error"]
    assert not queue.jobs  # nothing was queued


def test_consistency_steps_its_mid_sigmas_do_not_fit_are_refused(runs, tmp_path):
    run = _write_run(tmp_path / "two_step", student_config(
        runs["uncond"], ["--consistency.mid_sigmas", "0.5"]))
    entries = make_entries([run])
    assert parse_request({"steps": 2}, entries, Limits()).sampler == CONSISTENCY_SAMPLER
    with pytest.raises(RequestError, match=r"^4-step sampling takes 3 intermediate sigmas; got "
                                           r"1: \[0\.5\] \(config key consistency\.mid_sigmas\)$"):
        parse_request({"steps": 4}, entries, Limits())


def test_conditional_requests_draw_the_chosen_classes(runs):
    with running_server(runs) as (url, _), httpx.Client(base_url=url) as client:
        def labels(**body):
            accepted = client.post("/api/generate", json={"checkpoint": str(runs["cond"]),
                                                          "steps": 3, **body})
            assert accepted.status_code == 202, accepted.text
            kind, data = events_of(client, accepted.json()["events"])[-1]
            assert kind == "done", data
            return data["labels"]
        assert labels(batch=4, **{"class": "one"}, guidance=3) == [1, 1, 1, 1]
        assert labels(batch=7, **{"class": "all"}, guidance=0) == [0, 0, 1, 1, 2, 2]


def test_requests_run_one_at_a_time_in_order_and_a_full_queue_says_busy(runs, monkeypatch):
    gate = Gate(monkeypatch)
    body = {"checkpoint": str(runs["uncond"]), "steps": 4, "batch": 2}
    with running_server(runs, Limits(max_queue=2)) as (url, queue), \
            httpx.Client(base_url=url) as client:
        first = client.post("/api/generate", json={**body, "seed": 1}).json()
        gate.entered.wait(timeout=20)
        assert queue.status() == {"running": first["job"], "queued": 0}
        second = client.post("/api/generate", json={**body, "seed": 2}).json()
        third = client.post("/api/generate", json={**body, "seed": 3}).json()
        busy = client.post("/api/generate", json={**body, "seed": 4})
        assert (first["position"], second["position"], third["position"]) == (0, 1, 2)
        assert queue.status() == {"running": first["job"], "queued": 2}
        assert busy.status_code == 503
        assert "the server is busy: 2 requests are waiting" in busy.json()["error"]
        gate.release()
        streams = [events_of(client, job["events"]) for job in (first, second, third)]
    assert gate.most_active == 1 and gate.finished == [1, 2, 3]
    assert all(events[-1][0] == "done" for events in streams)
    # the third learned its place in the line as the ones ahead of it started
    assert [d["position"] for k, d in streams[2] if k == "queued"] == [2, 1]


def test_closing_the_page_cancels_its_request_and_frees_the_queue(runs, monkeypatch):
    gate = Gate(monkeypatch)
    body = {"checkpoint": str(runs["uncond"]), "steps": 20, "batch": 2}
    with running_server(runs) as (url, queue), httpx.Client(base_url=url) as client:
        job = client.post("/api/generate", json=body).json()
        with client.stream("GET", job["events"], timeout=30) as response:
            for line in response.iter_lines():
                if line == "event: frame":
                    break                                  # the page goes away mid-denoising
        wait_until(lambda: queue.jobs[job["job"]].cancelled.is_set())
        gate.release()
        wait_until(lambda: queue.jobs[job["job"]].finished)
        kind, data = queue.jobs[job["job"]].events[-1]
        assert (kind, data["message"]) == ("error", "cancelled: the page was closed")
        after = client.post("/api/generate", json={**body, "steps": 2}).json()
        assert events_of(client, after["events"])[-1][0] == "done"


# --- abuse: other web pages, oversized input, many streams --------------------------------------

def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict]:
    """Send ``head`` (request line and headers, CRLF-joined, without the blank line) and
    ``body`` over a plain socket to the server at ``url``; (status, JSON answer)."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < \
                _content_length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), json.loads(payload or b"{}")


def _content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def test_other_sites_cannot_drive_the_server(runs):
    """DNS rebinding (a foreign Host), a cross-site form or fetch (Origin, Sec-Fetch-Site) and
    a text/plain POST (which needs no CORS preflight) are refused on every route; nothing runs."""
    body = {"checkpoint": str(runs["uncond"]), "steps": 2, "batch": 1}
    with running_server(runs) as (url, queue), httpx.Client(base_url=url) as client:
        port = url.rsplit(":", 1)[1]
        for path in ("/", "/api/options", "/api/status", "/api/jobs/x/events"):
            rebound = client.get(path, headers={"Host": f"attacker.example:{port}"})
            assert rebound.status_code == 403, path
            assert "not to host 'attacker.example:" in rebound.json()["error"]
            assert str(runs["uncond"]) not in rebound.text
        foreign = {"Origin": "http://attacker.example"}
        assert client.post("/api/generate", json=body, headers=foreign).status_code == 403
        assert client.get("/api/options", headers=foreign).status_code == 403
        assert client.post("/api/generate", json=body,
                           headers={"Origin": "null"}).status_code == 403
        assert client.get("/api/options",
                          headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert client.get("/api/options",
                          headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
        plain = client.post("/api/generate", content=json.dumps(body),
                            headers={"Content-Type": "text/plain"})
        form = client.post("/api/generate", data={"steps": "2"})
        assert (plain.status_code, form.status_code) == (415, 415)
        assert "Content-Type: application/json" in plain.json()["error"]
        assert not queue.jobs                                    # nothing was queued
        # the page itself, by any loopback name, still works
        for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
            assert client.get("/api/status", headers={"Host": host}).status_code == 200
        same = client.post("/api/generate", json=body,
                           headers={"Origin": url, "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 202


def test_oversized_nested_and_malformed_bodies_get_a_short_400_or_413(runs):
    with running_server(runs) as (url, queue):
        post = "POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n" \
               "Content-Type: application/json\r\nConnection: close"
        # 300 MB announced: answered at once, without waiting for (or reading) the body
        started = time.monotonic()
        status, answer = raw_request(url, f"{post}\r\nContent-Length: {300 * 2**20}")
        assert (status, answer["error"]) == (413, "the request body is longer than 4096 bytes")
        assert time.monotonic() - started < 5
        # no length announced (chunked): counted while reading, refused after 4 KB
        chunk = b"[" * 60000
        status, answer = raw_request(url, f"{post}\r\nTransfer-Encoding: chunked",
                                     f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        assert status == 413
        # deeply nested within the limit: a 400, not a RecursionError (Python 3.12's json parses
        # 2,000 levels, which then are not an object; 3.11's raises RecursionError before that)
        nested = b"[" * 2000 + b"]" * 2000
        status, answer = raw_request(url, f"{post}\r\nContent-Length: {len(nested)}", nested)
        assert status == 400 and answer["error"] in (
            "the request body must be JSON, an object of parameters; it is nested too deeply",
            "the request body must be a JSON object of parameters")
        for bad in (b"\xff\xfe{", b'{"steps": ', b"null"):
            status, answer = raw_request(url, f"{post}\r\nContent-Length: {len(bad)}", bad)
            assert status == 400 and len(answer["error"]) < 120
        # a long unknown key is echoed only in part
        long_key = json.dumps({"x" * 3000: 1}).encode()
        status, answer = raw_request(url, f"{post}\r\nContent-Length: {len(long_key)}",
                                     long_key)
        assert status == 400 and answer["error"].startswith("unknown parameter 'xxx")
        assert answer["error"].count("x") < 60 and len(answer["error"]) < 200
        for value in ("y" * 3000, [[["deep"]]], {"a": 1}):
            status, answer = raw_request(url, f"{post}\r\nContent-Length: "
                                              f"{len(json.dumps({'sampler': value}))}",
                                         json.dumps({"sampler": value}).encode())
            assert status == 400 and len(answer["error"]) < 300, answer
        assert not queue.jobs
        assert httpx.get(url + "/api/status").json() == {"running": None, "queued": 0}


def test_many_event_streams_are_capped_and_other_pages_stay_fast(runs, monkeypatch):
    gate = Gate(monkeypatch)
    limits = Limits(max_streams_per_job=3, max_streams=5)
    body = {"checkpoint": str(runs["uncond"]), "steps": 4, "batch": 1}
    with running_server(runs, limits) as (url, queue), httpx.Client(base_url=url) as client:
        first = client.post("/api/generate", json=body).json()
        second = client.post("/api/generate", json={**body, "seed": 2}).json()
        port = int(url.rsplit(":", 1)[1])
        sockets, statuses = [], []
        try:
            for job in [first] * 40 + [second] * 10:               # 50 live-update connections
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(f"GET {job['events']} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                statuses.append(int(sock.recv(4096).split()[1]))
                sockets.append(sock)
            # 3 watch the first job, 2 the second (5 in all); the other 45 were told 429
            assert statuses.count(200) == 5 and statuses.count(429) == 45
            assert statuses[:3] == [200] * 3 and statuses[40:42] == [200] * 2
            started = time.monotonic()
            assert client.get("/").status_code == 200
            assert client.get("/api/options").status_code == 200
            assert time.monotonic() - started < 2.0
        finally:
            for sock in sockets:
                sock.close()
        gate.release()
        # with every stream gone, both jobs were cancelled and the queue is free again
        wait_until(lambda: all(queue.jobs[j["job"]].finished for j in (first, second)))
        assert [queue.jobs[j["job"]].events[-1][0] for j in (first, second)] == ["error"] * 2
        after = client.post("/api/generate", json=body).json()
        assert events_of(client, after["events"])[-1][0] == "done"


def test_a_job_nobody_watches_is_cancelled_and_leaves_the_queue(runs, monkeypatch):
    """Blind POSTs (no events stream) cannot keep the queue full: once unwatched for
    ``unwatched_s`` (aged here by moving their last_listened back), a waiting one is dropped at
    the next submit and the running one stops at its next step."""
    gate = Gate(monkeypatch)
    limits = Limits(max_queue=1, unwatched_s=30.0)
    body = {"checkpoint": str(runs["uncond"]), "steps": 5, "batch": 1}
    with running_server(runs, limits) as (url, queue), httpx.Client(base_url=url) as client:
        running = client.post("/api/generate", json=body).json()
        gate.entered.wait(timeout=20)
        waiting = client.post("/api/generate", json=body).json()
        assert client.post("/api/generate", json=body).status_code == 503  # fresh: it waits
        for job in (running, waiting):
            queue.jobs[job["job"]].last_listened -= 31.0
        watched = client.post("/api/generate", json={**body, "seed": 3})
        assert watched.status_code == 202
        assert queue.jobs[waiting["job"]].events[-1] == (
            "error", {"message": "cancelled: nobody watched it for 30 s (open its events "
                                 "stream)"})
        gate.release()
        wait_until(lambda: queue.jobs[running["job"]].finished)
        assert queue.jobs[running["job"]].events[-1][1]["message"].startswith(
            "cancelled: nobody watched it")
        assert events_of(client, watched.json()["events"])[-1][0] == "done"


def test_a_server_with_a_token_refuses_requests_without_it(runs):
    access = Access(token="s3cret-token")
    with running_server(runs, access=access) as (url, _), httpx.Client(base_url=url) as client:
        assert client.get("/").status_code == 403
        assert "needs its token" in client.get("/api/options").json()["error"]
        assert client.get("/?token=wrong").status_code == 403
        page = client.get("/?token=s3cret-token")
        assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
        assert client.get("/api/options").status_code == 200      # the cookie carries it now
        bare = httpx.get(url + "/api/status", headers={"Authorization": "token s3cret-token"})
        assert bare.status_code == 200


def test_serve_on_a_public_address_prints_a_token_url(runs, monkeypatch, capsys):
    called = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: called.update(kwargs, app=app))
    assert main(["serve", "-cp", str(runs["uncond"]), "--device", "cpu",
                 "--host", "0.0.0.0"]) == 0
    printed = capsys.readouterr().out
    token = printed.split("?token=")[1].split()[0]
    assert len(token) >= 32 and called["app"].access.token == token
    assert called["app"].access.any_ip and "0.0.0.0" in called["app"].access.hosts
    assert main(["serve", "-cp", str(runs["uncond"]), "--device", "cpu"]) == 0
    assert "token" not in capsys.readouterr().out and called["app"].access.token is None


# --- the command line --------------------------------------------------------------------------

def test_serve_binds_localhost_by_default(runs, monkeypatch):
    called = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: called.update(kwargs))
    assert main(["serve", "-cp", str(runs["uncond"]), "--device", "cpu"]) == 0
    assert (called["host"], called["port"]) == ("127.0.0.1", 7860)


def test_serve_without_checkpoints_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    assert "no checkpoints found under runs/; train one first" in capsys.readouterr().err


# --- the real page in headless Chromium --------------------------------------------------------

@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; "
                           f".ci/run installs it)")
def test_the_page_in_chromium_generates_and_shows_live_frames(runs):
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tempfile.mkdtemp(prefix="pixeldiffusion-chromium-")
    try:
        with running_server(runs, names=("uncond", "cond", "consistency")) as (url, _), \
                sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                      "--no-first-run", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync"])
            try:
                page = browser.new_page()
                page.goto(url)
                page.wait_for_selector("#generate:not([disabled])", timeout=30_000)
                # class and guidance controls appear only for the conditional checkpoint
                assert page.is_hidden("#conditional")
                page.select_option("#checkpoint", str(runs["cond"]))
                assert page.is_visible("#conditional")
                assert page.eval_on_selector_all("#class option", "o => o.map(x => x.value)") \
                    == ["random", "all", "0", "1", "2"]
                assert page.eval_on_selector_all("#sampler option", "o => o.map(x => x.value)") \
                    == list(SAMPLERS)
                # the page bounds steps by the model's timesteps; the server checks the rest
                assert page.get_attribute("#steps", "max") == "50"
                page.select_option("#class", "all")
                page.fill("#batch", "2")
                page.click("#generate")
                page.wait_for_selector("#status.error", timeout=30_000)
                assert "set batch to 3 or more" in page.text_content("#status")
                # a real run: frames arrive, then the grid and its download link
                page.fill("#steps", "12")
                page.fill("#batch", "4")
                page.select_option("#class", "2")
                page.click("#generate")
                page.wait_for_selector("#download:not([hidden])", timeout=60_000)
                assert page.text_content("#status").startswith("done in")
                assert int(page.get_attribute("#grid", "data-frames")) >= 1
                assert page.eval_on_selector("#grid", "img => img.complete && "
                                                      "img.naturalWidth") == 2 * 34 + 2
                href = page.get_attribute("#download", "href")
                assert httpx.get(url + href).headers["content-type"] == "image/png"
                # a consistency checkpoint offers its own sampler only, and samples in 1 step
                page.select_option("#checkpoint", str(runs["consistency"]))
                assert page.eval_on_selector_all("#sampler option", "o => o.map(x => x.value)") \
                    == [CONSISTENCY_SAMPLER]
                assert page.is_hidden("#conditional")
                page.fill("#steps", "1")
                page.click("#generate")
                page.wait_for_selector("#download:not([hidden])", timeout=60_000)
                assert page.text_content("#status").startswith("done in")
            finally:
                browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_grid_png_is_row_major_with_ceil_sqrt_columns():
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 4, 4)
    picture = Image.open(io.BytesIO(grid_png(images, math.ceil(math.sqrt(5)))))
    assert picture.size == (3 * 6 + 2, 2 * 6 + 2)
    assert picture.getpixel((2, 8)) == round((images[3, 0, 0, 0].item() + 1) * 127.5)
