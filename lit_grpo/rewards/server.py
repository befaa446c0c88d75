"""The reward server: any lit_grpo rewards, scored for trainers over HTTP.

`RewardService` is the work, free of any web framework: it decodes a request
(`lit_grpo.rewards.wire`), checks that the trainer speaks its protocol and lit_grpo version,
segments the object where the request brings no detections (and the whole scene where a
reward needs it), runs the `Scorer`'s rewards on its device and encodes the `Scores`. One
request is one rollout batch; the scorer runs one batch at a time (a lock), so several
trainers can share one server and its GPU.

`app(service)` puts it on FastAPI (served by uvicorn): `GET /health` and `POST /score`.
Both were already installed with lit_grpo (mlflow's tracking server uses them); scoring runs
in Starlette's thread pool, so `/health` answers while a batch is being scored. `serving()`
runs a server in a thread of this process, on a port it picks (tests, benchmarks).
"""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lit_grpo.perception.segmenters import SceneSegmenter
from lit_grpo.rewards.base import RewardFailed
from lit_grpo.rewards.scoring import Scorer
from lit_grpo.rewards.wire import (
    WireError,
    body_versions,
    decode_inputs,
    encode_scores,
    version_mismatch,
    versions,
)


class RewardService:
    """Scores request bodies with `scorer` on `device`; counts what it served."""

    def __init__(self, scorer: Scorer, device: str = "cpu"):
        self.device = torch.device(device)
        self.scorer = scorer.to(self.device)
        self.lock = threading.Lock()
        self.batches, self.rows, self.seconds = 0, 0, 0.0
        self.versions = versions()  # what it speaks (a test may pretend another version)

    def health(self) -> dict:
        return {
            "status": "ok",
            **self.versions,
            "device": str(self.device),
            "rewards": [
                {"class": type(r).__name__, "name": r.name, "weight": r.weight}
                for r in self.scorer.rewards
            ],
            "segmenter": type(self.scorer.segmenter).__name__,
            "batches": self.batches,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
        }

    def score(self, body: bytes) -> tuple[int, bytes | dict]:
        """(HTTP status, reply body or {"error": one line}) for a request body."""
        try:
            mismatch = version_mismatch(body_versions(body), self.versions)
            if mismatch:
                return 409, {"error": mismatch}
            inputs, _ = decode_inputs(body)
        except WireError as err:
            return 400, {"error": str(err)}
        start = time.perf_counter()
        with self.lock:
            try:
                scores = self.scorer.judge(self._complete(inputs))
            except RewardFailed as err:  # a reward raised or broke its contract
                return 422, {"error": str(err).splitlines()[0]}
            except Exception as err:  # the segmenter, the device: said, and retried
                first = (str(err).strip().splitlines() or [""])[0]
                return 500, {"error": f"{type(err).__name__}: {first}"}
            body = encode_scores(scores, self.versions)
            self.batches += 1
            self.rows += inputs.images.shape[0]
            self.seconds += time.perf_counter() - start
        return 200, body

    @torch.no_grad()
    def _complete(self, inputs):
        """`inputs` on the device, with the detections and scene the request left out."""
        for key in ("images", "source", "source_objects", "attention", "attention_region"):
            value = getattr(inputs, key)
            if value is not None:
                setattr(inputs, key, value.to(self.device))
        spec, segmenter = inputs.spec, self.scorer.segmenter
        if inputs.before is None:
            inputs.before = segmenter(inputs.source, spec.object)
            inputs.after = segmenter(inputs.images, spec.object)
        inputs.before, inputs.after = inputs.before.to(self.device), inputs.after.to(self.device)
        if inputs.source_objects is None and any(r.needs_scene for r in self.scorer.rewards):
            if not isinstance(segmenter, SceneSegmenter):
                raise TypeError(
                    f"a served reward needs every object of the scene, and the segmenter "
                    f"{type(segmenter).__name__} has no objects(images)"
                )
            inputs.source_objects = segmenter.objects(inputs.source)
        return inputs


def app(service: RewardService):
    """The FastAPI application of `service`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    api = FastAPI(title="lit_grpo rewards", docs_url=None, redoc_url=None)

    @api.get("/health")
    def health() -> dict:
        return service.health()

    @api.post("/score")
    async def score(request: Request):
        status, reply = await run_in_threadpool(service.score, await request.body())
        if isinstance(reply, dict):
            return JSONResponse(reply, status_code=status)
        return Response(reply, media_type="application/octet-stream")

    return api


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening; port 0 takes a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def uvicorn_server(service: RewardService):
    import uvicorn

    config = uvicorn.Config(app(service), log_level="warning", access_log=False)
    return uvicorn.Server(config)


@contextmanager
def serving(service: RewardService, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `service` from a thread on a free port of `host`; yields its URL and stops the
    server (within 10 s) on leaving."""
    sock = listening_socket(host, 0)
    server = uvicorn_server(service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
