"""`RemoteReward`: the rewards of a `python -m lit_grpo serve-rewards` server, as one reward.

It sends what the reward contract gives a reward (the edits and sources, the instructions,
their parsed `EditSpec`, the detections, the scene and attention maps when present) in the
wire format of `lit_grpo.rewards.wire`, and returns the server's weighted total as its
scores, every served reward and sub-score as its extras, and the first served region
reward's [N, R] scores and masks as its regions (so it stands in for a `RegionReward`).
With float32 pixels (the default) the scores are bit for bit those of the same rewards run
in the trainer.

When the server does not answer (down, slower than `timeout`, a 5xx, 408 or 429), the
request is tried `retries` more times, `backoff` seconds apart, doubling (`post`, which
`VLMJudgeReward` shares). Then, and at once for a reply that does not decode:

- the batch's rollouts get NaN scores (the GRPO stage drops NaN rows and counts them in
  `reward/nonfinite_fraction`), a warning names the URL and the cause, and the extra
  `remote_failures` (1 on those rows) is logged as `reward/remote_failures`;
- `max_failures` such batches in a row stop the run with one `RewardFailed` line naming the
  URL (the CLI prints it, exits 1, the run ends FAILED); a batch scored resets the count;
- a server that has not scored one batch for this reward yet stops the run at the first
  failure: a wrong URL or a server not started is a setup mistake, not a passing fault.

A server of another protocol or lit_grpo version (409), a request it cannot read (400) and
a served reward that raised or broke its contract (422) stop the run at once, in one line
with the server's own message: retrying cannot mend them.
"""

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Literal

import torch

from lit_grpo.rewards.base import Reward, RewardFailed, RewardInputs, RewardOutput

log = logging.getLogger(__name__)


class NoAnswer(Exception):
    """The server gave no usable answer this time (may pass)."""


class Refused(Exception):
    """The server answered that it will not score this request (will not pass)."""


# a server too busy (429) or a proxy that gave up waiting (408) may answer next time
RETRY_STATUS = (408, 429)


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
    retries: int,
    backoff: float,
    what: str = "the batch",
) -> bytes:
    """The reply body of POST `url`, tried 1 + `retries` times, `backoff` seconds before the
    first retry, doubling. `NoAnswer` naming the last cause when no try got a reply (down,
    slower than `timeout` for a connect or a read, a 5xx, 408 or 429, a connection cut);
    `Refused` with the server's one line on any other 4xx (retrying cannot mend it)."""
    # no proxy: a reward server is reached directly (a proxy from the environment would
    # send even 127.0.0.1 through it)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    cause = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            said = _error_line(err)
            if 400 <= err.code < 500 and err.code not in RETRY_STATUS:
                refused = f"the server refused {what} (HTTP {err.code}): {said}"
                raise Refused(refused) from None
            cause = f"HTTP {err.code}: {said}"
        except TimeoutError:
            cause = f"no answer within timeout={timeout:g} s"
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                cause = f"no answer within timeout={timeout:g} s"
            else:
                cause = f"cannot connect ({reason})"
        except (HTTPException, OSError) as err:  # a connection cut mid-reply
            cause = f"the connection broke ({type(err).__name__}: {err})"
    raise NoAnswer(f"{cause}; {retries + 1} tries")


def count_failed_batch(reward, cause: str, never_scored: str, source: str) -> None:
    """Counts a batch without scores on a remote reward (its `failures_in_a_row`, `scored`
    and `max_failures`): a `RewardFailed` with `never_scored` when it has not scored a batch
    yet (a setup mistake), or naming `source` once `max_failures` come in a row."""
    reward.failures_in_a_row += 1
    if not reward.scored:
        raise RewardFailed(never_scored)
    if reward.failures_in_a_row >= reward.max_failures:
        raise RewardFailed(
            f"{source} gave no scores for {reward.failures_in_a_row} batches in a row "
            f"(max_failures={reward.max_failures}; last: {cause})"
        )


class RemoteReward(Reward):
    """The rewards served at `url` (see module docstring).

    Args:
        url: the server, e.g. http://127.0.0.1:8765 (`python -m lit_grpo serve-rewards`).
        weight: this reward's share of the total (the served rewards' weights apply inside).
        timeout: seconds a request may wait on the server for each connect and each read.
        retries: further tries of a request the server did not answer.
        backoff: seconds before the first retry; doubled for each next one.
        max_failures: batches in a row without scores that stop the run.
        pixels: "float32" sends the edits as they are (exact scores); "uint8" 4x fewer
            bytes, and the rewards score the edits rounded to 8 bits, as saved images.
        detections: send the trainer's detections; False lets the server's segmenter find
            the object (a heavy segmenter then lives beside the rewards, not the policy).
        name: the key of its total in the logs.
    """

    name = "remote"

    def __init__(
        self,
        url: str,
        weight: float = 1.0,
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_failures: int = 3,
        pixels: Literal["float32", "uint8"] = "float32",
        detections: bool = True,
        name: str = "remote",
    ):
        super().__init__(weight)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward: url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_failures < 1:
            raise ValueError(
                "RemoteReward: timeout must be > 0, retries and backoff >= 0, max_failures >= 1"
            )
        if pixels not in ("float32", "uint8"):
            raise ValueError(f"RemoteReward: pixels must be float32 or uint8, got {pixels!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.max_failures, self.pixels, self.detections = max_failures, pixels, detections
        self.name = name
        self.failures_in_a_row = 0
        self.scored = 0  # batches this reward got scores for
        self._regions: tuple[str, tuple[str, ...]] | None = None  # (reward, region names)

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        from lit_grpo.rewards.wire import decode_scores, encode_inputs

        n, device = inputs.images.shape[0], inputs.images.device
        body = encode_inputs(inputs, self.pixels, self.detections)
        try:
            reply = self._post(body)
            self._check_versions(reply)
            scores = decode_scores(reply, n)
        except Refused as err:
            raise RewardFailed(f"RemoteReward {self.url}: {err}") from None
        except (NoAnswer, ValueError) as err:  # ValueError: a WireError, a garbled reply
            return self._failed(inputs, str(err))
        self.failures_in_a_row = 0
        self.scored += 1
        extras = {k: v.to(device) for k, v in scores.parts.items() if k != "object_found"}
        extras["remote_failures"] = torch.zeros(n, device=device)
        out = RewardOutput(scores.total.to(device), extras)
        if scores.regions:
            reward, served = next(iter(scores.regions.items()))
            self._regions = (reward, served.region_names)
            out.regions = served.regions.to(device)
            out.region_names = served.region_names
            out.region_masks = served.region_masks.to(device)
        return out

    def _post(self, body: bytes) -> bytes:
        """The reply body of POST /score (see `post`)."""
        return post(
            f"{self.url}/score",
            body,
            {"Content-Type": "application/octet-stream"},
            self.timeout,
            self.retries,
            self.backoff,
        )

    def _check_versions(self, reply: bytes) -> None:
        from lit_grpo.rewards.wire import WireError, body_versions, version_mismatch, versions

        try:
            theirs = body_versions(reply, "reply")
        except WireError:
            return  # decode_scores says what is wrong with it
        mismatch = version_mismatch(versions(), theirs)
        if mismatch:
            raise Refused(mismatch)

    def _failed(self, inputs: RewardInputs, cause: str) -> RewardOutput:
        """NaN scores for the batch, counted; a `RewardFailed` when it is one too many."""
        count_failed_batch(
            self,
            cause,
            f"RemoteReward: no scores from the reward server at {self.url} ({cause}); "
            "start it (python -m lit_grpo serve-rewards --config REWARDS.yaml --port N) "
            "or fix the reward's url",
            f"RemoteReward: the reward server at {self.url}",
        )
        n, device = inputs.images.shape[0], inputs.images.device
        log.warning(
            "RemoteReward: no scores from %s for %d rollouts (%s): they count as NaN "
            "(%d of max_failures=%d batches in a row)",
            self.url,
            n,
            cause,
            self.failures_in_a_row,
            self.max_failures,
        )
        nan = torch.full((n,), float("nan"), device=device)
        out = RewardOutput(nan, {"remote_failures": torch.ones(n, device=device)})
        if self._regions is not None:  # the region layout of the last scored batch
            names = self._regions[1]
            r = len(names)
            out.regions = torch.full((n, r), float("nan"), device=device)
            out.region_names = names
            out.region_masks = torch.full((n, r, *inputs.image_size), 1 / r, device=device)
        return out

    def health(self) -> dict:
        """The server's GET /health (versions, rewards, batches served)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.url}/health", timeout=self.timeout) as response:
            return json.loads(response.read())


def _error_line(err: urllib.error.HTTPError) -> str:
    """The server's message: serve-rewards' {"error": line}, OpenAI's {"error": {"message":
    line}}, vLLM's {"message": line}, FastAPI's {"detail": line}; else the start of what it
    sent."""
    try:
        raw = err.read()
    except Exception:
        raw = b""
    try:
        said = json.loads(raw)
        said = said.get("error") or said.get("message") or said["detail"]
        if isinstance(said, dict):
            said = said["message"]
        return str(said).strip().splitlines()[0]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        text = raw.decode("utf-8", "replace").strip().splitlines()
        return (text[0][:200] if text else err.reason) or "no message"
