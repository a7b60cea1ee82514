"""The browser UI behind ``pixeldiffusion serve``: one static page and a small JSON + Server-Sent
Events API around ``generate()``.

    GET  /                         the page (static/index.html)
    GET  /api/options              checkpoints (with their classes), samplers, limits
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
"""

from __future__ import annotations

import base64
import difflib
import io
import json
import math
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import (
    LoadedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
    resolve_weights_path,
)
from .config import Config, from_dict
from .device import precision_rule
from .errors import PixelDiffusionError
from .generate import generate
from .guidance import class_names_or_indices, parse_class
from .images import make_grid, to_pil, to_uint8
from .samplers import SAMPLERS

STATIC = Path(__file__).with_name("static")
VIEWS = ("x0", "x_t")          # live frames: the predicted x0, or the noisy x_t itself
PARAMETERS = ("checkpoint", "sampler", "steps", "seed", "batch", "class", "guidance", "view")
MAX_SEED = 2**63 - 1
TERMINAL = ("done", "error")


class RequestError(PixelDiffusionError):
    """A request parameter is missing, of the wrong type or out of range (HTTP 400)."""


class QueueFull(PixelDiffusionError):
    """Too many requests are waiting (HTTP 503)."""


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on one request: steps <= min(max_steps, T), batch <= max_batch images
    (guidance doubles the model's batch), at most max_queue requests waiting, and at most
    max_frames live frames streamed per request (the last step is always sent)."""
    max_steps: int = 1000
    max_batch: int = 64
    max_queue: int = 8
    max_frames: int = 50


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
        raise RequestError(f"'{key}' must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be in [{low}, {high}]{hint}; got {value}")
    return value


def parse_request(body: Any, entries: Sequence[Entry], limits: Limits) -> Request:
    """Check every parameter of a generate request against the checkpoint and ``limits``.

    body: the JSON object the page posts, keys from ``PARAMETERS``; absent or null values take the
    checkpoint's ``sample`` section. Raises RequestError, one sentence naming the fix, for
    unknown keys, wrong types, values out of range, a checkpoint not offered, and class or
    guidance on an unconditional model.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object of parameters")
    for key in body:
        if key not in PARAMETERS:
            close = difflib.get_close_matches(str(key), PARAMETERS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise RequestError(f"unknown parameter '{key}'; {hint}use {', '.join(PARAMETERS)}")
    names = [e.name for e in entries]
    name = body.get("checkpoint") or names[0]
    if name not in names:
        raise RequestError(f"unknown checkpoint {json.dumps(name)}; this server offers "
                           f"{', '.join(names)} (start it with -cp to add others)")
    entry = entries[names.index(name)]
    cfg, _ = entry.config()
    s, m = cfg.sample, cfg.model

    sampler = body.get("sampler") or s.sampler
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise RequestError(f"unknown sampler {json.dumps(sampler)}; use one of "
                           f"{', '.join(SAMPLERS)}")
    T = cfg.diffusion.timesteps
    max_steps = min(limits.max_steps, T)
    why = " (the model's timesteps)" if max_steps == T else " (the server's --max_steps)"
    steps = _integer(body, "steps", min(s.steps, max_steps), 1, max_steps, why)
    seed = _integer(body, "seed", s.seed, 0, MAX_SEED, "")
    batch = _integer(body, "batch", min(16, limits.max_batch), 1, limits.max_batch,
                     " (the server's --max_batch)")
    view = body.get("view") or "x0"
    if view not in VIEWS:
        raise RequestError(f"unknown view {json.dumps(view)}; use x0 (predicted image) or x_t "
                           f"(noisy image)")

    class_label, guidance = body.get("class"), body.get("guidance")
    if m.num_classes == 0:
        if class_label not in (None, "") or guidance is not None:
            raise RequestError(f"checkpoint '{name}' is unconditional (model.num_classes 0); "
                               f"leave class and guidance empty")
        return Request(name, sampler, steps, seed, batch, None, None, view)
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
                           f"1 conditional, > 1 guided); got {json.dumps(guidance)}")
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
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1][0] in TERMINAL

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        with self.changed:
            if kind == "frame":
                self.frame, self.frame_seq = data, self.frame_seq + 1
            else:
                self.events.append((kind, data))
            self.changed.notify_all()

    def wait(self, seen: int, frame_seq: int, timeout: float) -> None:
        """Block until there is an event after ``seen``, a frame after ``frame_seq``, or timeout."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.events) > seen or self.frame_seq > frame_seq,
                                  timeout)


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
        """Queue a validated request; QueueFull when ``max_queue`` requests already wait."""
        with self.lock:
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
                job.cancelled.set()
            self.lock.notify_all()
        self.worker.join(timeout=30)

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
                job.emit("error", {"message": "cancelled: the page was closed"})
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
        if job.cancelled.is_set():
            raise Cancelled
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
            if job.cancelled.is_set():
                raise Cancelled
            x = info["x0"] if r.view == "x0" else info["x_t"]
            canvas[info["start"]:info["start"] + len(x)] = x.float().cpu()
            step = info["i"] + 1
            if step % stride == 0 or step == r.steps:
                job.emit("frame", {"step": step, "steps": r.steps, "t": int(info["t"]),
                                   "image": png_data_url(canvas, nrow)})

        generated = generate(loaded.model, cfg, self.device, micro_batch=n,
                             guidance=r.guidance, class_label=r.class_label, callback=on_step)
        job.grid = grid_png(generated.images, nrow)
        labels = generated.labels.tolist() if generated.labels is not None else None
        job.emit("done", {"image": "data:image/png;base64," + base64.b64encode(job.grid).decode(),
                          "grid": f"/api/jobs/{job.id}/grid.png", "labels": labels,
                          "seconds": round(time.perf_counter() - started, 3),
                          "checkpoint_step": loaded.step})


def describe(entry: Entry, limits: Limits) -> dict[str, Any]:
    """What the page needs to know about one checkpoint to build its controls."""
    cfg, step = entry.config()
    m, s = cfg.model, cfg.sample
    return {"name": entry.name, "step": step, "timesteps": cfg.diffusion.timesteps,
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


def make_app(queue: JobQueue, limits: Limits) -> Any:
    """The Starlette application serving the page and the API on ``queue``."""
    _require_ui()
    import anyio.to_thread
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    entries = list(queue.entries.values())

    async def index(_: HTTPRequest) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def options(_: HTTPRequest) -> Response:
        try:
            checkpoints = [describe(e, limits) for e in entries]
        except PixelDiffusionError as err:
            return JSONResponse({"error": str(err)}, status_code=500)
        return JSONResponse({"checkpoints": checkpoints, "samplers": list(SAMPLERS),
                             "views": list(VIEWS),
                             "limits": {"max_steps": limits.max_steps,
                                        "max_batch": limits.max_batch,
                                        "max_queue": limits.max_queue}})

    async def submit(request: HTTPRequest) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "the request body must be JSON"}, status_code=400)
        try:
            parsed = parse_request(body, entries, limits)
            job = queue.submit(parsed)
        except QueueFull as err:
            return JSONResponse({"error": str(err)}, status_code=503)
        except PixelDiffusionError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse({"job": job.id, "position": job.events[0][1]["position"],
                             "events": f"/api/jobs/{job.id}/events"}, status_code=202)

    def find(request: HTTPRequest) -> Job | None:
        return queue.jobs.get(request.path_params["job"])

    async def events(request: HTTPRequest) -> Response:
        job = find(request)
        if job is None:
            return JSONResponse({"error": "no such job (finished jobs are forgotten after a "
                                          "while); press Generate again"}, status_code=404)

        async def stream() -> AsyncIterator[str]:
            seen, frame_seq = 0, 0
            try:
                while True:
                    await anyio.to_thread.run_sync(job.wait, seen, frame_seq, 1.0)
                    with job.changed:
                        new, seen = job.events[seen:], len(job.events)
                        frame = job.frame if job.frame_seq > frame_seq else None
                        frame_seq = job.frame_seq
                    if not new and frame is None:
                        yield ": keep-alive\n\n"
                    for kind, data in [e for e in new if e[0] not in TERMINAL]:
                        yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if frame is not None:
                        yield f"event: frame\ndata: {json.dumps(frame)}\n\n"
                    for kind, data in [e for e in new if e[0] in TERMINAL]:
                        yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                        return
            finally:
                if not job.finished:
                    job.cancelled.set()   # the client went away: free the queue

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

    return Starlette(routes=[
        Route("/", index), Route("/api/options", options),
        Route("/api/generate", submit, methods=["POST"]),
        Route("/api/jobs/{job}/events", events), Route("/api/jobs/{job}/grid.png", grid),
        Route("/api/status", status)])


def serve(sources: Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 7860,
          device: torch.device | None = None, limits: Limits = Limits(),
          use_ema: bool = True) -> None:
    """``pixeldiffusion serve``: the page and API on http://host:port until Ctrl-C."""
    _require_ui()
    import uvicorn

    if not sources:
        sources = default_checkpoints()
        if not sources:
            raise PixelDiffusionError("no checkpoints found under runs/; train one first "
                                      "(pixeldiffusion train) or pass -cp CKPT")
    queue = JobQueue(make_entries(sources), device or torch.device("cpu"), limits,
                     use_ema=use_ema)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this port can use the model; "
              f"the UI has no login", file=sys.stderr)
    print(f"pixeldiffusion UI on http://{'localhost' if host == '127.0.0.1' else host}:{port}/ "
          f"({len(queue.entries)} checkpoint(s)); Ctrl-C stops it", flush=True)
    print(precision_rule(queue.device), flush=True)
    try:
        uvicorn.run(make_app(queue, limits), host=host, port=port, log_level="warning")
    finally:
        queue.close()
