"""The browser UI behind ``pixeldiffusion serve``: one static page and a small JSON + Server-Sent
Events API around ``generate()``.

    GET  /                         the page (static/index.html)
    GET  /api/options              checkpoints (with their samplers and classes), limits
    POST /api/generate             validate a request, queue it: 202 {"job", "position"};
                                   400 {"error"} for a bad parameter, 503 when the queue is full
    GET  /api/jobs/{id}/events     text/event-stream: queued, start, frame..., done | error
    GET  /api/jobs/{id}/grid.png   the finished grid
    GET  /api/status               {"running": id | null, "queued": n}

Requests run one at a time on one worker thread, in order (``JobQueue``); at most
``Limits.max_queue`` may wait. Every parameter is checked on the server (``parse_request``):
checkpoints are chosen by name from the list the server was started with (never a path), and
steps and batch are bounded (``Limits``) so that one request cannot exhaust memory. Live frames
are the predicted x0 (or x_t) that the sampler hands to ``generate()``'s callback after each model
call; there is no sampling loop here. Starlette and uvicorn come with the ``[ui]`` extra.

Other web pages the user visits must not drive the server (docs/security.md). ``Guard`` answers
every request 403 unless its Host is this machine (or the address the server was bound to),
its Origin and Sec-Fetch-Site say it comes from the page itself, and, when the server is bound
to a non-loopback address, it carries the random token printed at start. A POST must be
``application/json`` of at most ``Limits.max_body`` bytes, counted while it is read. Live streams
are capped per job and in all, and a job nobody listens to is cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import math
import secrets
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch
from torch import Tensor

from .checkpoint import (
    LoadedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
    resolve_weights_path,
)
from .config import CONSISTENCY_SAMPLER, Config, from_dict, samplers_for
from .device import precision_rule
from .errors import PixelDiffusionError, did_you_mean
from .generate import consistency_sigmas_of, generate
from .guidance import class_names_or_indices, parse_class
from .images import make_grid, to_pil, to_uint8
from .samplers import SAMPLERS

STATIC = Path(__file__).with_name("static")
VIEWS = ("x0", "x_t")          # live frames: the predicted x0, or the noisy x_t itself
PARAMETERS = ("checkpoint", "sampler", "steps", "seed", "batch", "class", "guidance", "view")
MAX_SEED = 2**63 - 1
TERMINAL = ("done", "error")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_ECHO = 40          # characters of user input an error message repeats
MAX_TEXT = 200         # longest string parameter (checkpoint names are paths)
KEEP_ALIVE_S = 1.0     # a comment line after this long without events


class RequestError(PixelDiffusionError):
    """A request parameter is missing, of the wrong type or out of range (HTTP 400)."""


class QueueFull(PixelDiffusionError):
    """Too many requests are waiting (HTTP 503)."""


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on one request: steps <= min(max_steps, T), batch <= max_batch images
    (guidance doubles the model's batch), at most max_queue requests waiting, and at most
    max_frames live frames streamed per request (the last step is always sent). A request body
    is at most max_body bytes; at most max_streams_per_job live streams watch one job and
    max_streams all jobs; a job that nobody has watched for unwatched_s seconds is cancelled."""
    max_steps: int = 1000
    max_batch: int = 64
    max_queue: int = 8
    max_frames: int = 50
    max_body: int = 4096
    max_streams_per_job: int = 4
    max_streams: int = 32
    unwatched_s: float = 30.0


@dataclass(frozen=True)
class Access:
    """Who may use the server: requests whose Host names one of ``hosts`` (or, with ``any_ip``,
    any IP address: a DNS-rebinding page always sends a domain name) and, when ``token`` is set,
    that carry it (``?token=``, then a cookie)."""
    hosts: frozenset[str] = frozenset(LOOPBACK_HOSTS)
    token: str | None = None
    any_ip: bool = False


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` serves this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_for(host: str, allow_hosts: Sequence[str] = ()) -> Access:
    """The ``Access`` of a server bound to ``host``: loopback names, the bound address and
    ``allow_hosts``; a non-loopback address also gets a fresh random token."""
    names = {*LOOPBACK_HOSTS, host.strip("[]").lower(), *(h.strip("[]").lower()
                                                           for h in allow_hosts)}
    if is_loopback(host):
        return Access(frozenset(names))
    return Access(frozenset(names), token=secrets.token_urlsafe(24), any_ip=True)


def _cut(text: str) -> str:
    """``text`` cut to MAX_ECHO characters, for an error message that repeats user input."""
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."


def _echo(value: Any) -> str:
    """``value`` as JSON, cut to MAX_ECHO characters, for an error message."""
    try:
        return _cut(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        return type(value).__name__


@dataclass(frozen=True)
class Entry:
    """One checkpoint the server offers: ``name`` is what the page sends back; ``source`` is the
    file, checkpoint directory or run directory (a run directory serves its newest checkpoint)."""
    name: str
    source: Path

    def weights(self) -> Path:
        return resolve_weights_path(self.source)

    def config(self) -> tuple[Config, int]:
        """(config, step) from the weights' metadata, without loading the weights."""
        metadata = read_metadata(self.weights())
        return from_dict(json.loads(metadata["config"])), int(metadata.get("step", 0))


@dataclass(frozen=True)
class Request:
    """A validated request (see ``parse_request``)."""
    checkpoint: str
    sampler: str
    steps: int
    seed: int
    batch: int
    class_label: str | None    # None for unconditional models
    guidance: float | None     # None for unconditional models
    view: str


def default_checkpoints(root: str | Path = "runs") -> list[Path]:
    """Every run directory directly under ``root`` that holds a checkpoint, in name order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [run for run in sorted(root.iterdir())
            if run.is_dir() and latest_checkpoint(run) is not None]


def make_entries(sources: Sequence[str | Path]) -> list[Entry]:
    """Checkpoint entries named by the paths as given; each must hold a readable checkpoint."""
    entries: list[Entry] = []
    for source in sources:
        entry = Entry(str(source), Path(source))
        entry.config()  # fails now, with the checkpoint's own message, rather than per request
        if entry.name not in {e.name for e in entries}:
            entries.append(entry)
    return entries


def _integer(body: dict[str, Any], key: str, default: int, low: int, high: int,
             hint: str) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{key}' must be an integer, got {_echo(value)}")
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be in [{low}, {high}]{hint}; got {value}")
    return value


def _sampler_and_steps(body: dict[str, Any], name: str, cfg: Config,
                       limits: Limits) -> tuple[str, int]:
    """The request's sampler (one the checkpoint offers, ``config.samplers_for``) and steps
    (within the model's timesteps and the server's --max_steps; for a consistency model, a
    count its ``consistency.mid_sigmas`` fit), each RequestError naming the fix."""
    s = cfg.sample
    sampler = body.get("sampler") or s.sampler
    consistency_model = cfg.consistency.method != "none"
    if not isinstance(sampler, str) or sampler not in samplers_for(cfg):
        if consistency_model:
            raise RequestError(f"checkpoint '{name}' is a consistency model; it samples with "
                               f"sampler consistency in 1, 2 or 4 steps, not {_echo(sampler)}")
        if sampler == CONSISTENCY_SAMPLER:
            raise RequestError(f"checkpoint '{name}' is a diffusion model; sampler consistency "
                               f"needs a consistency model (pixeldiffusion distill), so use one "
                               f"of {', '.join(SAMPLERS)}")
        raise RequestError(f"unknown sampler {_echo(sampler)}; use one of "
                           f"{', '.join(SAMPLERS)}")
    T = cfg.diffusion.timesteps
    max_steps = min(limits.max_steps, T)
    why = " (the model's timesteps)" if max_steps == T else " (the server's --max_steps)"
    steps = _integer(body, "steps", min(s.steps, max_steps), 1, max_steps, why)
    if consistency_model:
        try:
            consistency_sigmas_of(cfg.consistency, steps)
        except PixelDiffusionError as err:
            raise RequestError(str(err)) from None
    return sampler, steps


def parse_request(body: Any, entries: Sequence[Entry], limits: Limits) -> Request:
    """Check every parameter of a generate request against the checkpoint and ``limits``.

    body: the JSON object the page posts, keys from ``PARAMETERS``; absent or null values take the
    checkpoint's ``sample`` section. Raises RequestError, one sentence naming the fix, for
    unknown keys, wrong types, values out of range, a checkpoint not offered, and class or
    guidance on an unconditional model.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object of parameters")
    for key, value in body.items():
        if key not in PARAMETERS:
            raise RequestError(f"unknown parameter '{_cut(key)}'; "
                               f"{did_you_mean(key[:MAX_TEXT], PARAMETERS)}use "
                               f"{', '.join(PARAMETERS)}")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise RequestError(f"'{key}' is longer than {MAX_TEXT} characters")
    names = [e.name for e in entries]
    name = body.get("checkpoint") or names[0]
    if not isinstance(name, str) or name not in names:
        raise RequestError(f"unknown checkpoint {_echo(name)}; this server offers "
                           f"{', '.join(names)} (start it with -cp to add others)")
    entry = entries[names.index(name)]
    cfg, _ = entry.config()
    s, m = cfg.sample, cfg.model

    sampler, steps = _sampler_and_steps(body, name, cfg, limits)
    seed = _integer(body, "seed", s.seed, 0, MAX_SEED, "")
    batch = _integer(body, "batch", min(16, limits.max_batch), 1, limits.max_batch,
                     " (the server's --max_batch)")
    view = body.get("view") or "x0"
    if not isinstance(view, str) or view not in VIEWS:
        raise RequestError(f"unknown view {_echo(view)}; use x0 (predicted image) or x_t "
                           f"(noisy image)")

    class_label, guidance = body.get("class"), body.get("guidance")
    if m.num_classes == 0:
        if class_label not in (None, "") or guidance is not None:
            raise RequestError(f"checkpoint '{name}' is unconditional (model.num_classes 0); "
                               f"leave class and guidance empty")
        return Request(name, sampler, steps, seed, batch, None, None, view)
    if class_label is not None and not isinstance(class_label, (str, int)) \
            or isinstance(class_label, bool):
        raise RequestError(f"'class' must be a class index or name; got {_echo(class_label)}")
    class_label = str(s.class_label if class_label in (None, "") else class_label)
    try:
        choice = parse_class(class_label, m.num_classes, m.class_names)
    except PixelDiffusionError as err:
        raise RequestError(str(err)) from None
    if choice == "all" and batch < m.num_classes:
        raise RequestError(f"class 'all' draws at least one image of each of the "
                           f"{m.num_classes} classes; set batch to {m.num_classes} or more")
    if guidance is None:
        guidance = s.guidance
    if isinstance(guidance, str):
        try:
            guidance = float(guidance)
        except ValueError:
            pass
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) \
            or not math.isfinite(guidance) or not 0.0 <= guidance <= 100.0:
        raise RequestError(f"'guidance' must be a number in [0, 100] (0 unconditional, "
                           f"1 conditional, > 1 guided); got {_echo(guidance)}")
    return Request(name, sampler, steps, seed, batch, str(choice), float(guidance), view)


def png_data_url(images: Tensor, nrow: int) -> str:
    """[N, C, H, W] in [-1, 1] (values outside clipped) -> a ``data:image/png`` grid."""
    return "data:image/png;base64," + base64.b64encode(grid_png(images, nrow)).decode()


def grid_png(images: Tensor, nrow: int) -> bytes:
    buffer = io.BytesIO()
    to_pil(make_grid(to_uint8(images), nrow)).save(buffer, format="PNG")
    return buffer.getvalue()


class Cancelled(Exception):
    """Raised inside the sampler's callback when nobody listens to a job any more."""


PAGE_CLOSED = "the page was closed"


@dataclass
class Job:
    """One queued request and what it has reported so far. Control events (queued, start, done,
    error) are kept in order; of the live frames only the newest is kept, so a slow client skips
    frames instead of piling them up."""
    id: str
    request: Request
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    frame: dict[str, Any] | None = None
    frame_seq: int = 0
    grid: bytes | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = PAGE_CLOSED
    changed: threading.Condition = field(default_factory=threading.Condition)
    listeners: int = 0                # live event streams open now
    last_listened: float = field(default_factory=time.monotonic)
    # the event loops' events of the open streams, set from the worker thread on every emit
    wakeups: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1][0] in TERMINAL

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def unwatched_for(self) -> float:
        """Seconds since a live stream last watched this job (0 while one does)."""
        with self.changed:
            return 0.0 if self.listeners else time.monotonic() - self.last_listened

    def check_watched(self, limit_s: float) -> None:
        """Cancel the job if nobody has watched it for ``limit_s`` seconds; raise Cancelled
        if it is cancelled."""
        if self.unwatched_for() > limit_s:
            self.cancel(f"nobody watched it for {limit_s:g} s (open its events stream)")
        if self.cancelled.is_set():
            raise Cancelled

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        with self.changed:
            if kind == "frame":
                self.frame, self.frame_seq = data, self.frame_seq + 1
            else:
                self.events.append((kind, data))
            self.changed.notify_all()
            for loop, event in self.wakeups:
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # that stream's event loop has closed
                    pass


class JobQueue:
    """Runs jobs one at a time, first come first served, on one worker thread, with the models it
    loaded cached (the two most recent)."""

    def __init__(self, entries: Sequence[Entry], device: torch.device, limits: Limits, *,
                 use_ema: bool = True) -> None:
        self.entries = {e.name: e for e in entries}
        self.device, self.limits, self.use_ema = device, limits, use_ema
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.pending: deque[Job] = deque()
        self.running: Job | None = None
        self.models: OrderedDict[tuple[Path, int], LoadedCheckpoint] = OrderedDict()
        self.lock = threading.Condition()
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="pixeldiffusion-serve",
                                       daemon=True)
        self.worker.start()

    def submit(self, request: Request) -> Job:
        """Queue a validated request; QueueFull when ``max_queue`` requests already wait (jobs
        nobody watches are dropped first)."""
        with self.lock:
            self._drop_unwatched()
            if len(self.pending) >= self.limits.max_queue:
                raise QueueFull(f"the server is busy: {len(self.pending)} requests are waiting "
                                f"(--max_queue {self.limits.max_queue}); try again when one "
                                f"finishes")
            job = Job(uuid.uuid4().hex[:12], request)
            self.pending.append(job)
            self.jobs[job.id] = job
            self._forget_old_jobs()
            job.emit("queued", {"position": len(self.pending) + (self.running is not None) - 1})
            self.lock.notify_all()
        return job

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"running": self.running.id if self.running else None,
                    "queued": len(self.pending)}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for job in self.pending:
                job.cancel("the server stopped")
            self.lock.notify_all()
        self.worker.join(timeout=30)

    def _drop_unwatched(self) -> None:
        """Cancel and dequeue the waiting jobs that nobody has watched for ``unwatched_s``."""
        for job in list(self.pending):
            try:
                job.check_watched(self.limits.unwatched_s)
            except Cancelled:
                self.pending.remove(job)
                job.emit("error", {"message": f"cancelled: {job.cancel_reason}"})

    def _forget_old_jobs(self, keep: int = 64) -> None:
        """Drop the oldest finished jobs (and their grids) beyond the newest ``keep``."""
        finished = [job_id for job_id, job in self.jobs.items() if job.finished]
        for job_id in finished[:max(0, len(self.jobs) - keep)]:
            del self.jobs[job_id]

    def _work(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.pending or self.closed)
                if self.closed:
                    return
                job = self.running = self.pending.popleft()
                for position, waiting in enumerate(self.pending, start=1):
                    waiting.emit("queued", {"position": position})
            try:
                self._run(job)
            except Cancelled:
                job.emit("error", {"message": f"cancelled: {job.cancel_reason}"})
            except PixelDiffusionError as err:
                job.emit("error", {"message": str(err)})
            except Exception as err:  # noqa: BLE001 - report, keep serving the next request
                traceback.print_exc(file=sys.stderr)
                job.emit("error", {"message": f"generation failed: {type(err).__name__}: {err}"})
            finally:
                with self.lock:
                    self.running = None

    def _model(self, entry: Entry) -> LoadedCheckpoint:
        weights = entry.weights()
        key = (weights, weights.stat().st_mtime_ns)
        if key not in self.models:
            self.models[key] = load_checkpoint(weights, use_ema=self.use_ema, device=self.device)
            while len(self.models) > 2:
                self.models.popitem(last=False)
        self.models.move_to_end(key)
        return self.models[key]

    def _run(self, job: Job) -> None:
        job.check_watched(self.limits.unwatched_s)
        r = job.request
        started = time.perf_counter()
        job.emit("start", {"steps": r.steps, "batch": r.batch})
        loaded = self._model(self.entries[r.checkpoint])
        cfg = loaded.config
        n, nrow = r.batch, math.ceil(math.sqrt(r.batch))
        if r.class_label == "all":
            nrow = r.batch // cfg.model.num_classes          # one row per class
            n = nrow * cfg.model.num_classes
        cfg = replace(cfg, sample=replace(cfg.sample, sampler=r.sampler, steps=r.steps,
                                          seed=r.seed, n_samples=n, nrow=nrow, batch_size=n))
        shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        canvas = torch.zeros(n, *shape)
        stride = math.ceil(r.steps / self.limits.max_frames)

        def on_step(info: dict[str, Any]) -> None:
            job.check_watched(self.limits.unwatched_s)
            x = info["x0"] if r.view == "x0" else info["x_t"]
            canvas[info["start"]:info["start"] + len(x)] = x.float().cpu()
            step = info["i"] + 1
            if step % stride == 0 or step == r.steps:
                t = float(info["t"])  # a timestep, or a consistency model's sigma
                job.emit("frame", {"step": step, "steps": r.steps,
                                   "t": int(t) if t.is_integer() else round(t, 4),
                                   "image": png_data_url(canvas, nrow)})

        generated = generate(loaded.model, cfg, self.device, micro_batch=n,
                             guidance=r.guidance, class_label=r.class_label, callback=on_step)
        job.grid = grid_png(generated.images, nrow)
        labels = generated.labels.tolist() if generated.labels is not None else None
        job.emit("done", {"image": "data:image/png;base64," + base64.b64encode(job.grid).decode(),
                          "grid": f"/api/jobs/{job.id}/grid.png", "labels": labels,
                          "seconds": round(time.perf_counter() - started, 3),
                          "checkpoint_step": loaded.step})


class Streams:
    """The live event streams open now, per job and in all, within ``Limits``' caps. A job
    whose last stream closes before it finished is cancelled (the page went away)."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.total = limits, 0

    def refusal(self, job: Job) -> str | None:
        """Why another stream of ``job`` is refused, or None if it may open."""
        limits = self.limits
        if job.listeners >= limits.max_streams_per_job or self.total >= limits.max_streams:
            return (f"too many live streams ({self.limits.max_streams_per_job} per job, "
                    f"{self.limits.max_streams} in all); close other tabs of this page")
        return None

    def open(self, job: Job) -> bool:
        if self.refusal(job) is not None:
            return False
        self.total += 1
        with job.changed:
            job.listeners += 1
        return True

    def close(self, job: Job) -> None:
        self.total -= 1
        with job.changed:
            job.listeners -= 1
            job.last_listened = time.monotonic()
            last = job.listeners == 0
        if last and not job.finished:
            job.cancel(PAGE_CLOSED)   # free the queue


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Guard:
    """ASGI middleware in front of the app that refuses, before the app sees them, requests
    another web page could make: a Host that is not ours (DNS rebinding), a foreign Origin or
    Sec-Fetch-Site, a missing token (when ``access`` has one), a POST that is not
    ``application/json`` or is longer than ``max_body`` bytes (counted while reading). Every
    refusal is a short JSON ``{"error"}`` with status 403, 413 or 415."""

    def __init__(self, app: Any, access: Access, max_body: int) -> None:
        self.app, self.access, self.max_body = app, access, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return None  # no websockets here; the server closes the connection
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        refused = self._refusal(scope, headers)
        if refused is not None:
            return await _send_error(send, *refused)
        if scope["method"] == "POST":
            body = await self._read_body(headers, receive, send)
            if body is None:
                return None
            receive = _replay(body, receive)
        if self.access.token and _token_in_query(scope) == self.access.token:
            send = _with_cookie(send, _cookie_name(scope), self.access.token)
        return await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host_header = headers.get("host", "")
        host = _hostname(host_header)
        if host is None or not (host in self.access.hosts
                                or self.access.any_ip and _is_ip(host)):
            return 403, (f"this server answers requests to {', '.join(sorted(self.access.hosts))} "
                         f"only, not to host '{_cut(host_header)}' (start it with --allow_host "
                         f"to add a name)")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host_header.lower():
            return 403, (f"requests from other web pages are refused (Origin "
                         f"'{_cut(origin)}'); use the page this server serves")
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return 403, "requests from other web pages are refused; use the page this server serves"
        token = self.access.token
        if token is not None:
            given = (_token_in_query(scope) or _cookie(headers, _cookie_name(scope))
                     or headers.get("authorization", "").removeprefix("token ").strip())
            if not secrets.compare_digest(given.encode(), token.encode()):
                return 403, ("this server needs its token: open the address with ?token= that "
                             "it printed when it started")
        return None

    async def _read_body(self, headers: dict[str, str], receive: Receive,
                         send: Send) -> bytes | None:
        """The POST body, or None after answering a refusal (wrong type, too long)."""
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            await _send_error(send, 415, f"send the parameters as Content-Type: "
                                         f"application/json, not '{_cut(media_type)}'")
            return None
        too_long = (413, f"the request body is longer than {self.max_body} bytes")
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            await _send_error(send, *too_long)
            return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await _send_error(send, *too_long)
                return None
            if not message.get("more_body", False):
                return bytes(body)


def _hostname(host_header: str) -> str | None:
    """The host name of a Host header ('[::1]:7860' -> '::1'), lower case; None if malformed."""
    try:
        return urlsplit(f"//{host_header}").hostname or None
    except ValueError:
        return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _token_in_query(scope: Scope) -> str:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])
    return values[0]


def _cookie_name(scope: Scope) -> str:
    """One cookie per port: servers on one machine share its cookies otherwise."""
    return f"pixeldiffusion_token_{(scope.get('server') or ('', 0))[1]}"


def _cookie(headers: dict[str, str], name: str) -> str:
    try:
        jar = SimpleCookie(headers.get("cookie", ""))
    except CookieError:
        return ""
    return jar[name].value if name in jar else ""


def _with_cookie(send: Send, name: str, token: str) -> Send:
    """``send`` that also sets the token cookie, so the page's own requests carry it."""
    async def send_with_cookie(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            cookie = f"{name}={token}; Path=/; HttpOnly; SameSite=Strict"
            message = {**message, "headers": [*message.get("headers", []),
                                               (b"set-cookie", cookie.encode("latin-1"))]}
        await send(message)
    return send_with_cookie


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then waits for the client."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def describe(entry: Entry, limits: Limits) -> dict[str, Any]:
    """What the page needs to know about one checkpoint to build its controls."""
    cfg, step = entry.config()
    m, s = cfg.model, cfg.sample
    return {"name": entry.name, "step": step, "timesteps": cfg.diffusion.timesteps,
            "samplers": list(samplers_for(cfg)),
            "max_steps": min(limits.max_steps, cfg.diffusion.timesteps),
            "image_size": cfg.data.image_size, "channels": cfg.data.channels,
            "num_classes": m.num_classes,
            "classes": class_names_or_indices(m.num_classes, m.class_names),
            "defaults": {"sampler": s.sampler, "steps": min(s.steps, limits.max_steps),
                         "seed": s.seed, "guidance": s.guidance, "class": s.class_label}}


def _require_ui() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PixelDiffusionError("the browser UI needs Starlette and uvicorn; install them with "
                                  "pip install 'pixeldiffusion[ui]'") from None


def make_app(queue: JobQueue, limits: Limits, access: Access = Access()) -> Any:
    """The Starlette application serving the page and the API on ``queue``, behind ``Guard``
    (by default: loopback Hosts only, no token)."""
    _require_ui()
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    entries = list(queue.entries.values())

    async def index(_: HTTPRequest) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def options(_: HTTPRequest) -> Response:
        try:
            checkpoints = [describe(e, limits) for e in entries]
        except PixelDiffusionError as err:
            return JSONResponse({"error": str(err)}, status_code=500)
        return JSONResponse({"checkpoints": checkpoints, "views": list(VIEWS),
                             "limits": {"max_steps": limits.max_steps,
                                        "max_batch": limits.max_batch,
                                        "max_queue": limits.max_queue}})

    async def submit(request: HTTPRequest) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
            why = "nested too deeply" if isinstance(err, RecursionError) else "not valid JSON"
            return JSONResponse({"error": f"the request body must be JSON, an object of "
                                          f"parameters; it is {why}"}, status_code=400)
        try:
            parsed = parse_request(body, entries, limits)
            job = queue.submit(parsed)
        except QueueFull as err:
            return JSONResponse({"error": str(err)}, status_code=503)
        except PixelDiffusionError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except (TypeError, ValueError, RecursionError):
            return JSONResponse({"error": "the request parameters could not be read; send a "
                                          "JSON object of " + ", ".join(PARAMETERS)},
                                status_code=400)
        return JSONResponse({"job": job.id, "position": job.events[0][1]["position"],
                             "events": f"/api/jobs/{job.id}/events"}, status_code=202)

    app = Starlette(routes=[
        Route("/", index), Route("/api/options", options),
        Route("/api/generate", submit, methods=["POST"]), *_job_routes(queue, limits)])
    return Guard(app, access, limits.max_body)


def _job_routes(queue: JobQueue, limits: Limits) -> list[Any]:
    """The routes of one submitted job: its live events (SSE, capped per job and in all), its
    finished grid, and the queue's status."""
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    streams = Streams(limits)

    def find(request: HTTPRequest) -> Job | None:
        return queue.jobs.get(request.path_params["job"])

    async def events(request: HTTPRequest) -> Response:
        job = find(request)
        if job is None:
            return JSONResponse({"error": "no such job (finished jobs are forgotten after a "
                                          "while); press Generate again"}, status_code=404)
        refused = streams.refusal(job)
        if refused is not None:
            return JSONResponse({"error": refused}, status_code=429)

        async def stream() -> AsyncIterator[str]:
            # registered here, inside the generator, so that its finally always unregisters
            if not streams.open(job):
                yield f"event: error\ndata: {json.dumps({'message': streams.refusal(job)})}\n\n"
                return
            try:
                async for event in _job_events(job):
                    yield event
            finally:
                streams.close(job)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def grid(request: HTTPRequest) -> Response:
        job = find(request)
        if job is None or job.grid is None:
            return JSONResponse({"error": "no finished grid for this job"}, status_code=404)
        return Response(job.grid, media_type="image/png", headers={
            "Content-Disposition": f'attachment; filename="pixeldiffusion-{job.id}.png"'})

    async def status(_: HTTPRequest) -> Response:
        return JSONResponse(queue.status())

    return [Route("/api/jobs/{job}/events", events), Route("/api/jobs/{job}/grid.png", grid),
            Route("/api/status", status)]


async def _job_events(job: Job) -> AsyncIterator[str]:
    """The job's events as Server-Sent Events until done or error: control events in order,
    only the newest live frame, a keep-alive comment when quiet. The worker wakes the stream
    through an asyncio.Event (no thread per stream), so many streams cannot starve the
    server's thread pool."""
    wakeup = (asyncio.get_running_loop(), asyncio.Event())
    with job.changed:
        job.wakeups.append(wakeup)
    try:
        seen, frame_seq = 0, 0
        while True:
            wakeup[1].clear()
            with job.changed:
                new, seen = job.events[seen:], len(job.events)
                frame = job.frame if job.frame_seq > frame_seq else None
                frame_seq = job.frame_seq
            if not new and frame is None:
                try:
                    await asyncio.wait_for(wakeup[1].wait(), KEEP_ALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                continue
            for chunk in _sse_chunks(new, frame):
                yield chunk
            if new and new[-1][0] in TERMINAL:
                return
    finally:
        with job.changed:
            job.wakeups.remove(wakeup)


def _sse_chunks(new: list[tuple[str, dict[str, Any]]],
                frame: dict[str, Any] | None) -> list[str]:
    """New control events, then the newest frame, then a final done / error event."""
    chunks = []
    for kind, data in [e for e in new if e[0] not in TERMINAL]:
        chunks.append(f"event: {kind}\ndata: {json.dumps(data)}\n\n")
    if frame is not None:
        chunks.append(f"event: frame\ndata: {json.dumps(frame)}\n\n")
    for kind, data in [e for e in new if e[0] in TERMINAL][:1]:
        chunks.append(f"event: {kind}\ndata: {json.dumps(data)}\n\n")
    return chunks


def serve(sources: Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 7860,
          device: torch.device | None = None, limits: Limits = Limits(),
          use_ema: bool = True, allow_hosts: Sequence[str] = ()) -> None:
    """``pixeldiffusion serve``: the page and API on http://host:port until Ctrl-C. Bound to a
    non-loopback address it requires a random token, printed in the address to open."""
    _require_ui()
    import uvicorn

    if not sources:
        sources = default_checkpoints()
        if not sources:
            raise PixelDiffusionError("no checkpoints found under runs/; train one first "
                                      "(pixeldiffusion train) or pass -cp CKPT")
    queue = JobQueue(make_entries(sources), device or torch.device("cpu"), limits,
                     use_ema=use_ema)
    access = access_for(host, allow_hosts)
    shown = "localhost" if host == "127.0.0.1" else f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={access.token}" if access.token else "")
    if access.token:
        print(f"serving on {host}: anyone who can reach this port and has the token can use the "
              f"model; from another machine open this address with this machine's IP address",
              file=sys.stderr)
    print(f"pixeldiffusion UI on {url} ({len(queue.entries)} checkpoint(s)); Ctrl-C stops it",
          flush=True)
    print(precision_rule(queue.device), flush=True)
    try:
        uvicorn.run(make_app(queue, limits, access), host=host, port=port, log_level="warning")
    finally:
        queue.close()
