"""`VLMJudgeReward`: a vision-language model behind an OpenAI-compatible chat-completions
endpoint (vLLM, SGLang, `transformers serve`) judges each edit from its source image, the
edited image and the instruction.

One request per rollout, `workers` of them at a time (the server batches concurrent
requests itself: vLLM and SGLang by continuous batching). Each is a POST to
`{url}/chat/completions` of

    {"model": MODEL, "max_tokens": 16, "temperature": 0.0,
     "logprobs": true, "top_logprobs": 20,           # when logprobs=True
     "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Before the edit:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,<source>"}},
        {"type": "text", "text": "After the edit:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,<edit>"}},
        {"type": "text", "text": PROMPT.format(instruction=..., scale=...)}]}],
     ...extra_body}

with the images as 8-bit PNGs (the edits in [0, 1] rounded to 0..255) and the default
`PROMPT` (ours; `prompt` replaces it, with `{instruction}` and `{scale}` in it):

    The first image is a picture before an edit, the second the same picture after it. The
    edit was asked for with the instruction: "{instruction}". How well does the second image
    carry out the instruction while leaving everything else as it was? Answer with one whole
    number from 0 to {scale}: 0 if the instruction was not carried out or the picture was
    spoiled, {scale} if it was carried out exactly and nothing else changed. Answer with the
    number only.

The score of a rollout is the judge's number divided by `scale` (in [0, 1]): the expected
digit under the judge's token probabilities where the server returns logprobs (vLLM and
SGLang do; `transformers serve` ignores the fields), else the number read from its text
(`lit_grpo.rewards.judge_answers`: the idea of a probability-weighted score is Edit-R1's,
the scale, prompt, parser and failure rules are ours). Extras: `judge_failures` (1 on rows
without a score), `judge_from_logprobs` (1 on rows scored from logprobs), `judge_digit_mass`
(the probability the judge put on the digits 0..scale at its answer token; NaN on rows
scored from text).

Failures, as `RemoteReward`'s (the transport is its `post`: `timeout` per connect and read,
`retries` more tries `backoff` s apart, doubling, for no answer, a 5xx, 408 or 429):

- a rollout without a score (no answer after the retries, a reply that is not a chat
  completion, an answer without a readable score) is NaN (the GRPO stage drops it and counts
  it in `reward/nonfinite_fraction`), 1 in `judge_failures`, and named in one warning per
  batch with its cause and the start of the answer;
- a batch in which no rollout got a score counts as a failed batch: `max_failures` in a row
  stop the run with one `RewardFailed` line naming the URL and the last cause; a batch with
  a score resets the count. A judge that has not scored one batch yet stops the run at the
  first failed batch (a wrong URL or model name, a server not started, a model that does
  not answer the prompt with a number are setup mistakes);
- any other 4xx (a model the server does not serve, a request it cannot take) stops the run
  at once with the server's own message.

Why urllib and not the `openai` package: these requests are one JSON POST each, the retry
and failure rules are `RemoteReward`'s (shared), and the `openai` client is a dependency of
a dozen packages with its own retry policy that would have to be switched off; the standard
library keeps the trainer's dependencies as they are.
"""

import base64
import io
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from lit_grpo.rewards.base import Reward, RewardFailed, RewardInputs, RewardOutput
from lit_grpo.rewards.judge_answers import Unreadable, score_from_logprobs, score_from_text
from lit_grpo.rewards.remote import NoAnswer, Refused, count_failed_batch, post

log = logging.getLogger(__name__)

PROMPT = (
    "The first image is a picture before an edit, the second the same picture after it. The "
    'edit was asked for with the instruction: "{instruction}". How well does the second image '
    "carry out the instruction while leaving everything else as it was? Answer with one whole "
    "number from 0 to {scale}: 0 if the instruction was not carried out or the picture was "
    "spoiled, {scale} if it was carried out exactly and nothing else changed. Answer with the "
    "number only."
)


@dataclass
class Verdict:
    """One rollout's judgement: score in 0..scale (None if failed), why it failed, whether
    the score came from logprobs and the digits' probability mass there."""

    score: float | None
    cause: str = ""
    from_logprobs: bool = False
    digit_mass: float = math.nan


class VLMJudgeReward(Reward):
    """A VLM judges each edit (see the module docstring for the request, prompt and rules).

    Args:
        url: the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1 (requests go to
            `{url}/chat/completions`).
        model: the model name the server knows (vLLM's `--served-model-name`, the folder or
            repo `transformers serve` loaded).
        weight: this reward's share of the total.
        scale: the judge answers 0..scale; one digit, so 1 <= scale <= 9.
        prompt: the question after the two images, with `{instruction}` and `{scale}`;
            None: `PROMPT`.
        logprobs: ask for the answer's token probabilities (`top_logprobs` alternatives per
            token) and score the expected digit; the text's number where none come back.
        top_logprobs: alternatives per token asked for (vLLM's default limit is 20).
        max_tokens: the longest answer; raise it for models that reason before answering.
        temperature: 0 for a greedy, repeatable answer.
        timeout: seconds a request may wait for each connect and each read.
        retries: further tries of a request without an answer.
        backoff: seconds before the first retry; doubled for each next one.
        max_failures: batches in a row without any score that stop the run.
        workers: requests in flight at once.
        api_key_env: the environment variable holding a key sent as `Authorization: Bearer`
            (vLLM's `--api-key`); None sends none. The key itself never goes in a config.
        extra_body: fields merged into every request, over the ones above (vLLM's
            `chat_template_kwargs`, `structured_outputs`; `transformers serve`'s
            `generation_config`).
        name: the key of its scores in the logs.
    """

    name = "vlm_judge"

    def __init__(
        self,
        url: str,
        model: str,
        weight: float = 1.0,
        scale: int = 5,
        prompt: str | None = None,
        logprobs: bool = True,
        top_logprobs: int = 20,
        max_tokens: int = 16,
        temperature: float = 0.0,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_failures: int = 3,
        workers: int = 8,
        api_key_env: str | None = None,
        extra_body: dict | None = None,
        name: str = "vlm_judge",
    ):
        super().__init__(weight)
        label = "VLMJudgeReward"
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{label}: url must start with http:// or https://, got {url!r}")
        if url.rstrip("/").endswith("/chat/completions"):
            raise ValueError(
                f"{label}: url is the server's base URL (e.g. http://127.0.0.1:8000/v1), "
                f"without /chat/completions; got {url!r}"
            )
        if not 1 <= scale <= 9:
            raise ValueError(
                f"{label}: scale must be 1..9 (one digit, one token of the answer), got {scale}"
            )
        if timeout <= 0 or retries < 0 or backoff < 0 or max_failures < 1 or workers < 1:
            raise ValueError(
                f"{label}: timeout must be > 0, retries and backoff >= 0, max_failures and "
                "workers >= 1"
            )
        if top_logprobs < 1 or max_tokens < 1:
            raise ValueError(f"{label}: top_logprobs and max_tokens must be >= 1")
        self.prompt = PROMPT if prompt is None else prompt
        try:
            filled = self.prompt.format(instruction="\0", scale=scale)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"{label}: prompt may hold only {{instruction}} and {{scale}} in braces "
                f"({type(err).__name__}: {err}); write other braces as {{{{ }}}}"
            ) from None
        if "\0" not in filled:
            raise ValueError(f"{label}: prompt must hold {{instruction}}, got {self.prompt!r}")
        self.api_key = None
        if api_key_env is not None:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(
                    f"{label}: api_key_env names {api_key_env!r}, which is not set; export it "
                    "or leave api_key_env out"
                )
        self.url, self.model, self.scale = url.rstrip("/"), model, scale
        self.logprobs, self.top_logprobs, self.max_tokens = logprobs, top_logprobs, max_tokens
        self.temperature, self.timeout = float(temperature), float(timeout)
        self.retries, self.backoff, self.max_failures = retries, float(backoff), max_failures
        self.workers, self.extra_body, self.name = workers, dict(extra_body or {}), name
        self.failures_in_a_row = 0
        self.scored = 0  # batches with at least one score
        self.failed_rows = 0  # rollouts without a score, over the run

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        n, device = inputs.images.shape[0], inputs.images.device
        if n == 0:
            empty = inputs.images.new_zeros(0)
            keys = ("judge_failures", "judge_from_logprobs", "judge_digit_mass")
            return RewardOutput(empty, dict.fromkeys(keys, empty))
        bodies = self._requests(inputs)
        verdicts: list[Verdict | None] = [None] * n
        with ThreadPoolExecutor(min(self.workers, n), thread_name_prefix="vlm_judge") as pool:
            futures = {pool.submit(self._judge, body): i for i, body in enumerate(bodies)}
            for future in wait(futures).done:
                try:
                    verdicts[futures[future]] = future.result()
                except Refused as err:
                    raise RewardFailed(f"VLMJudgeReward {self.url}: {err}") from None
        failed = [i for i, v in enumerate(verdicts) if v.score is None]
        self.failed_rows += len(failed)
        if len(failed) == n:
            self._failed_batch(verdicts[0].cause)
        else:
            self.failures_in_a_row = 0
            self.scored += 1
        if failed:
            streak = (
                f" ({self.failures_in_a_row} of max_failures={self.max_failures} batches in a row)"
            )
            log.warning(
                "VLMJudgeReward: no score from %s for %d of %d rollouts (rollout %d: %s): "
                "they count as NaN%s",
                self.url,
                len(failed),
                n,
                failed[0],
                verdicts[failed[0]].cause,
                streak if len(failed) == n else "",
            )

        def column(values: list[float]) -> torch.Tensor:  # [N]
            return torch.tensor(values, dtype=torch.float32, device=device)

        nan = math.nan
        return RewardOutput(
            column([nan if v.score is None else v.score / self.scale for v in verdicts]),
            {
                "judge_failures": column([float(v.score is None) for v in verdicts]),
                "judge_from_logprobs": column([float(v.from_logprobs) for v in verdicts]),
                "judge_digit_mass": column([v.digit_mass for v in verdicts]),
            },
        )

    def _requests(self, inputs: RewardInputs) -> list[bytes]:
        """The JSON body of each rollout's request (see the module docstring)."""
        edits, sources = (png_data_urls(x) for x in (inputs.images, inputs.source))
        bodies = []
        for edit, source, instruction in zip(edits, sources, inputs.instructions):
            content = [
                {"type": "text", "text": "Before the edit:"},
                {"type": "image_url", "image_url": {"url": source}},
                {"type": "text", "text": "After the edit:"},
                {"type": "image_url", "image_url": {"url": edit}},
                {
                    "type": "text",
                    "text": self.prompt.format(instruction=instruction, scale=self.scale),
                },
            ]
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
            if self.logprobs:
                body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
            bodies.append(json.dumps(body | self.extra_body).encode())
        return bodies

    def _judge(self, body: bytes) -> Verdict:
        """One rollout's verdict; `Refused` passes up (it stops the run)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.url}/chat/completions"
        try:
            reply = post(
                url, body, headers, self.timeout, self.retries, self.backoff, "the request"
            )
        except NoAnswer as err:
            return Verdict(None, str(err))
        try:
            choice = json.loads(reply)["choices"][0]
            answer = choice["message"]["content"] or ""
            if not isinstance(answer, str):
                raise TypeError(f"content is a {type(answer).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            start = reply[:80].decode("utf-8", "replace")
            return Verdict(None, f"a reply that is not a chat completion ({err!r}: {start!r})")
        try:
            value = score_from_text(answer, self.scale)
        except Unreadable as err:
            cut = " (cut at max_tokens)" if choice.get("finish_reason") == "length" else ""
            said = f" in the answer {answer[:80]!r}" if answer.strip() else ""
            return Verdict(None, f"{err}{said}{cut}")
        content = (choice.get("logprobs") or {}).get("content") if self.logprobs else None
        weighted = score_from_logprobs(content, value, self.scale) if content else None
        if weighted is None:
            return Verdict(value)
        return Verdict(weighted[0], from_logprobs=True, digit_mass=weighted[1])

    def _failed_batch(self, cause: str) -> None:
        """Counts a batch without any score; a `RewardFailed` when it is one too many."""
        count_failed_batch(
            self,
            cause,
            f"VLMJudgeReward: no score from the judge {self.model!r} at {self.url} for any "
            f"rollout of the first batch (first: {cause}); start the server, fix url or "
            "model, or change the prompt so that the model answers with a number",
            f"VLMJudgeReward: the judge at {self.url}",
        )


def png_data_urls(images: torch.Tensor) -> list[str]:
    """`data:image/png;base64,...` of each image of [N, 3, H, W] in [0, 1], rounded to 8 bits;
    rows with the same pixels (a group's shared source) are encoded once."""
    from PIL import Image

    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    done: dict[bytes, str] = {}
    urls = []
    for row in pixels:
        key = row.tobytes()
        if key not in done:
            buffer = io.BytesIO()
            Image.fromarray(row).save(buffer, format="PNG")
            done[key] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        urls.append(done[key])
    return urls
