"""`VLMJudgeReward` (issue 25 item 4): the answer parser and the logprob score by hand-computed
values; the client against a stdlib fake of an OpenAI-compatible server (fixed answers with
and without logprobs, garbage, timeouts, refusals, a server down); and against a real
`transformers serve` over a tiny random Qwen2.5-VL built in a temporary folder. Loopback
only; every server is stopped by the test that starts it."""

import base64
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_failures import TINY_GRPO

from lit_grpo.cli import run_cli
from lit_grpo.datamodules.shapeworld import ShapeWorld
from lit_grpo.rewards import Scorer, VLMJudgeReward
from lit_grpo.rewards.base import RewardFailed
from lit_grpo.rewards.judge_answers import Unreadable, score_from_logprobs, score_from_text
from lit_grpo.rewards.server import listening_socket
from lit_grpo.rewards.vlm_judge import PROMPT, png_data_urls

ROOT = Path(__file__).resolve().parent.parent
FAST = {"timeout": 0.3, "retries": 1, "backoff": 0.05, "max_failures": 2}
LOG = "lit_grpo.rewards.vlm_judge"


def edits(n=2, group=2):
    """n ShapeWorld conditions and n * group distinct noisy edits of their targets."""
    data = ShapeWorld("val", 8, 32, ("translate", "rotate", "scale"), seed=0)
    batch = torch.utils.data.default_collate([data[i] for i in range(n)])
    g = torch.Generator().manual_seed(0)
    images = batch["target"].repeat_interleave(group, 0)
    images = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return images, batch, group


def judge_all(reward, images, batch, group):
    return Scorer([reward])(images, batch, group)


# ----- the answer parser and the logprob score -----


@pytest.mark.parametrize(
    "answer, score",
    [
        ("4", 4.0),
        (" 3\n", 3.0),
        ("Score: 5", 5.0),
        ("The rating is 2.", 2.0),
        ("I would give it a 1.", 1.0),
        ("2.5", 2.5),
        ('{"score": 3}', 3.0),
        ('```json\n{"Score": "4"}\n```', 4.0),
        ('Here is my verdict: {"reasoning": "moved left", "score": 0}.', 0.0),
        ("3/5", 3.0),
        ("4 out of 5, the shape moved but its colour changed", 4.0),
        ("On the 0-5 scale: score 4", 4.0),
        ("<think>It could be 1 or 2, maybe 5.</think>2", 2.0),
    ],
)
def test_a_score_is_read_from_prose_json_and_fractions(answer, score):
    assert score_from_text(answer, 5) == score


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("", "an empty answer"),
        ("   <think>hmm</think> ", "an empty answer"),
        ("I cannot judge this.", "no number"),
        ("7", "7 is outside the scale 0..5"),
        ("Score: -1", "-1 is outside the scale 0..5"),
        ("8/10", "a score out of 10, not out of 5"),
        ("Between 3 and 4.", "several numbers (3, 4)"),
        ('{"verdict": "good"}', "a JSON object without a score key (['verdict'])"),
        ('{"score": null}', "a score that is not a number (None)"),
        ("true", "a JSON true, not a score"),
    ],
)
def test_an_answer_without_a_score_is_unreadable_with_its_reason(answer, reason):
    with pytest.raises(Unreadable) as err:
        score_from_text(answer, 5)
    assert str(err.value) == reason


def position(token, alternatives):
    """One entry of OpenAI's `logprobs.content`: the token and its top alternatives."""
    top = [{"token": t, "logprob": math.log(p)} for t, p in alternatives.items()]
    return {"token": token, "logprob": top[0]["logprob"], "top_logprobs": top}


def test_the_logprob_score_is_the_expected_digit_at_the_answer_token():
    # "Score: 4": the digit is the third token; " 3" and "3" are one digit; "7" is past the
    # scale and "Four" is no digit: both left out, the rest renormalised
    content = [
        position("Score", {"Score": 1.0}),
        position(":", {":": 1.0}),
        position(" 4", {" 4": 0.5, "5": 0.2, " 3": 0.1, "3": 0.05, "7": 0.1, "Four": 0.05}),
    ]
    expected, mass = score_from_logprobs(content, 4.0, 5)
    assert mass == pytest.approx(0.85, abs=1e-12)
    assert expected == pytest.approx((4 * 0.5 + 5 * 0.2 + 3 * 0.15) / 0.85, abs=1e-12)
    # the answer token missing from its own top list still counts
    alone = [{"token": "2", "logprob": math.log(0.6), "top_logprobs": [position("1", {"1": 0.3})]}]
    assert score_from_logprobs(alone, 2.0, 5) == pytest.approx(((1.2 + 0.3) / 0.9, 0.9), abs=1e-12)
    # no token reads as the answer, a decimal answer, no digit of the scale: the text stands
    assert score_from_logprobs(content, 2.0, 5) is None
    assert score_from_logprobs(content, 2.5, 5) is None
    assert score_from_logprobs([{"token": "4", "logprob": -math.inf}], 4.0, 5) is None


# ----- a fake OpenAI-compatible server -----


class FakeChat:
    """Answers POST /v1/chat/completions with `reply(request, index)` -> (status, body,
    seconds to wait first), where index is the row of the edit image the request carries
    (`rows` maps each edit's data URL to its row). Records requests and headers, and the
    most requests it had in flight at once."""

    def __init__(self, reply, rows=None):
        self.reply, self.rows = reply, rows or {}
        self.requests, self.headers = [], []
        self.lock, self.in_flight, self.most_in_flight = threading.Lock(), 0, 0

    def handle(self, handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests.append(body)
            self.headers.append(dict(handler.headers))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            edit = body["messages"][0]["content"][3]["image_url"]["url"]
            status, answer, wait = self.reply(body, self.rows.get(edit))
            time.sleep(wait)
        finally:
            with self.lock:
                self.in_flight -= 1
        raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(raw)))
            handler.end_headers()
            handler.wfile.write(raw)
        except OSError:  # the client gave up waiting
            pass


@contextmanager
def fake_server(chat):
    """`chat` on a free port of 127.0.0.1; yields its OpenAI base URL; stops on leaving."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            chat.handle(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads, server.block_on_close = True, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def completion(text, logprobs=None, finish="stop"):
    choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    choice["finish_reason"] = finish
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "x", "object": "chat.completion", "model": "judge", "choices": [choice]}


def rows_of(images):
    return {url: i for i, url in enumerate(png_data_urls(images))}


def test_each_edit_is_sent_with_its_source_as_png_and_the_documented_prompt(monkeypatch):
    from PIL import Image

    images, batch, group = edits()
    chat = FakeChat(lambda body, row: (200, completion("3"), 0))
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with fake_server(chat) as url:
        reward = VLMJudgeReward(url, "judge", api_key_env="JUDGE_KEY", extra_body={"seed": 7})
        scores = judge_all(reward, images, batch, group)
    assert torch.equal(scores.parts["vlm_judge"], torch.full((4,), 0.6))
    assert len(chat.requests) == 4
    assert all(h["Authorization"] == "Bearer sk-test" for h in chat.headers)
    by_row = sorted(chat.requests, key=lambda b: chat_rows(b, images))
    sources = batch["source"].repeat_interleave(group, 0)
    for i, body in enumerate(by_row):
        content = body["messages"][0]["content"]
        assert [c["type"] for c in content] == ["text", "image_url", "text", "image_url", "text"]
        assert content[0]["text"] == "Before the edit:" and content[2]["text"] == "After the edit:"
        instruction = batch["instruction"][i // group]
        assert content[4]["text"] == PROMPT.format(instruction=instruction, scale=5)
        assert f'instruction: "{instruction}".' in content[4]["text"]
        for part, want in ((content[1], sources[i]), (content[3], images[i])):
            head, data = part["image_url"]["url"].split(",")
            assert head == "data:image/png;base64"
            png = Image.open(io.BytesIO(base64.b64decode(data)))
            got = torch.as_tensor(list(png.getdata()), dtype=torch.uint8).T.reshape(3, 32, 32)
            assert torch.equal(got, (want * 255).round().to(torch.uint8))
        del body["messages"]
        assert body == {
            "model": "judge",
            "max_tokens": 16,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": 20,
            "seed": 7,
        }


def chat_rows(body, images):
    return rows_of(images)[body["messages"][0]["content"][3]["image_url"]["url"]]


def test_scores_come_from_logprobs_where_given_else_from_the_text(caplog):
    images, batch, group = edits()
    answers = {
        # logprobs: the expected digit over {4: .5, 5: .25, 3: .125}, renormalised
        0: completion("4", [position("4", {"4": 0.5, "5": 0.25, " 3": 0.125, "Four": 0.125})]),
        1: completion("Score: 3"),  # no logprobs: the text's number
        2: completion(
            '{"score": 2}',
            [position('{"', {'{"': 1.0}), position("score", {"score": 1.0})]
            + [position('":', {'":': 1.0}), position(" 2", {" 2": 0.75, "1": 0.25})]
            + [position("}", {"}": 1.0})],
        ),
        3: completion("I cannot tell.", [position("I", {"I": 0.9, "4": 0.1})]),
    }
    chat = FakeChat(lambda body, row: (200, answers[row], 0), rows_of(images))
    with fake_server(chat) as url:
        reward = VLMJudgeReward(url, "judge", **FAST)
        with caplog.at_level(logging.WARNING, LOG):
            scores = judge_all(reward, images, batch, group)
    want = torch.tensor([(4 * 0.5 + 5 * 0.25 + 3 * 0.125) / 0.875 / 5, 0.6, 1.75 / 5, math.nan])
    assert torch.allclose(scores.parts["vlm_judge"], want, atol=1e-7, equal_nan=True)
    assert torch.equal(scores.parts["judge_failures"], torch.tensor([0.0, 0, 0, 1]))
    assert torch.equal(scores.parts["judge_from_logprobs"], torch.tensor([1.0, 0, 1, 0]))
    mass = torch.tensor([0.875, math.nan, 1.0, math.nan])
    assert torch.allclose(scores.parts["judge_digit_mass"], mass, equal_nan=True)
    assert torch.isnan(scores.total[3]) and torch.isfinite(scores.total[:3]).all()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        f"VLMJudgeReward: no score from {url} for 1 of 4 rollouts (rollout 3: no number in the "
        "answer 'I cannot tell.'): they count as NaN"
    )
    assert reward.scored == 1 and reward.failed_rows == 1 and reward.failures_in_a_row == 0
    # logprobs=False: not asked for, and any that come back are not used
    with fake_server(chat) as url:
        plain = judge_all(VLMJudgeReward(url, "judge", logprobs=False), images, batch, group)
    assert "logprobs" not in chat.requests[-1]
    assert torch.allclose(
        plain.parts["vlm_judge"], torch.tensor([0.8, 0.6, 0.4, math.nan]), equal_nan=True
    )


def test_garbage_counts_as_failures_and_stops_the_run_after_max_failures(caplog):
    images, batch, group = edits()
    mode = {"reply": completion("5")}
    chat = FakeChat(lambda body, row: (200, mode["reply"], 0))
    with fake_server(chat) as url:
        # a judge that never scored: the first garbage batch stops the run at once
        mode["reply"] = completion("Looks fine to me!")
        with pytest.raises(RewardFailed) as err:
            judge_all(VLMJudgeReward(url, "judge", **FAST), images, batch, group)
        assert str(err.value) == (
            f"VLMJudgeReward: no score from the judge 'judge' at {url} for any rollout of the "
            "first batch (first: no number in the answer 'Looks fine to me!'); start the "
            "server, fix url or model, or change the prompt so that the model answers with a "
            "number"
        )
        reward = VLMJudgeReward(url, "judge", **FAST)
        mode["reply"] = completion("5")
        assert torch.equal(judge_all(reward, images, batch, group).total, torch.ones(4))
        for reply, cause in [
            (b"<html>bad gateway</html>", "a reply that is not a chat completion ("),
            (completion(" ", finish="length"), "(rollout 0: an empty answer (cut at max_tokens))"),
        ]:
            mode["reply"] = reply
            caplog.clear()
            with caplog.at_level(logging.WARNING, LOG):
                scores = judge_all(reward, images, batch, group)
            assert torch.isnan(scores.total).all()
            assert torch.equal(scores.parts["judge_failures"], torch.ones(4))
            (warning,) = [r.getMessage() for r in caplog.records]
            assert warning.startswith(f"VLMJudgeReward: no score from {url} for 4 of 4 rollouts")
            assert cause in warning
            assert warning.endswith("they count as NaN (1 of max_failures=2 batches in a row)")
            mode["reply"] = completion("0")  # the judge recovers: the count starts over
            assert torch.equal(judge_all(reward, images, batch, group).total, torch.zeros(4))
            assert reward.failures_in_a_row == 0
        mode["reply"] = completion("12")
        judge_all(reward, images, batch, group)
        with pytest.raises(RewardFailed) as err:
            judge_all(reward, images, batch, group)
    assert str(err.value) == (
        f"VLMJudgeReward: the judge at {url} gave no scores for 2 batches in a row "
        "(max_failures=2; last: 12 is outside the scale 0..5 in the answer '12')"
    )
    assert reward.failed_rows == 16


def test_a_slow_judge_times_out_in_bounded_time_and_429_is_retried(caplog):
    images, batch, group = edits()
    mode, lock, tried = {"wait": 0.0}, threading.Lock(), set()

    def reply(body, row):
        with lock:  # the first try of each row: too busy; the retry scores
            first, _ = row not in tried, tried.add(row)
        if first:
            return 429, {"error": {"message": "too many requests"}}, 0
        return 200, completion("1"), mode["wait"]

    chat = FakeChat(reply, rows_of(images))
    with fake_server(chat) as url:
        reward = VLMJudgeReward(url, "judge", **FAST)
        assert torch.equal(judge_all(reward, images, batch, group).total, torch.full((4,), 0.2))
        assert len(chat.requests) == 8
        mode["wait"] = 1.0
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING, LOG):
            scores = judge_all(reward, images, batch, group)
        waited = time.perf_counter() - start
    assert torch.isnan(scores.total).all()
    assert 0.6 <= waited < 3.0  # 2 tries of 0.3 s and a 0.05 s back-off, the rows in parallel
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        f"VLMJudgeReward: no score from {url} for 4 of 4 rollouts (rollout 0: no answer within "
        "timeout=0.3 s; 2 tries): they count as NaN (1 of max_failures=2 batches in a row)"
    )


def test_a_server_down_or_refusing_stops_the_run_in_one_line():
    images, batch, group = edits()
    sock = listening_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()
    start = time.perf_counter()
    with pytest.raises(RewardFailed) as err:
        judge_all(VLMJudgeReward(url, "judge", **FAST), images, batch, group)
    assert time.perf_counter() - start < 5  # refused at once: no waiting on timeouts
    message = str(err.value)
    assert message.startswith(
        f"VLMJudgeReward: no score from the judge 'judge' at {url} for any rollout of the "
        "first batch (first: cannot connect ("
    )
    assert message.endswith(
        "; 2 tries); start the server, fix url or model, or change the prompt so that the model answers with a number"
    )
    assert "\n" not in message
    gone = {"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError"}}
    chat = FakeChat(lambda body, row: (404, gone, 0))
    with fake_server(chat) as url:
        with pytest.raises(RewardFailed) as err:
            judge_all(VLMJudgeReward(url, "nope", **FAST), images, batch, group)
    assert str(err.value) == (
        f"VLMJudgeReward {url}: the server refused the request (HTTP 404): The model `nope` "
        "does not exist."
    )
    assert len(chat.requests) == 4  # a 4xx is not retried


def test_requests_in_flight_are_bounded_by_workers():
    images, batch, group = edits(n=3)
    both = threading.Barrier(2, timeout=5)  # passes only when 2 requests are in flight at once

    def reply(body, row):
        both.wait()
        return 200, completion("2"), 0

    chat = FakeChat(reply)
    with fake_server(chat) as url:
        scores = judge_all(VLMJudgeReward(url, "judge", workers=2), images, batch, group)
    assert torch.equal(scores.total, torch.full((6,), 0.4))
    assert chat.most_in_flight == 2


def test_settings_that_cannot_work_are_refused_at_construction(monkeypatch):
    url = "http://127.0.0.1:8000/v1"
    for kwargs, message in [
        ({"url": "127.0.0.1:8000"}, "url must start with http"),
        ({"url": f"{url}/chat/completions"}, "without /chat/completions"),
        ({"scale": 10}, r"scale must be 1..9 \(one digit"),
        ({"prompt": "Rate it from 0 to {scale}."}, "prompt must hold {instruction}"),
        ({"prompt": "{instruction} {score}"}, "prompt may hold only {instruction} and {scale}"),
        ({"workers": 0}, "workers >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            VLMJudgeReward(**{"url": url, "model": "judge", **kwargs})
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key_env names 'NO_SUCH_KEY', which is not set"):
        VLMJudgeReward(url, "judge", api_key_env="NO_SUCH_KEY")


def test_the_judge_config_parses():
    overlay = str(ROOT / "configs/rewards/vlm_judge.yaml")
    grpo = str(ROOT / "configs/talk2move.yaml")
    cli = run_cli(["--config", grpo, "--config", overlay, *TINY_GRPO], run=False)
    (reward,) = cli.model.rewards
    assert isinstance(reward, VLMJudgeReward)
    assert (reward.url, reward.model, reward.scale) == (
        "http://127.0.0.1:8000/v1",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        5,
    )


# ----- a real server: `transformers serve` over a tiny random Qwen2.5-VL -----

# Qwen's chat template, cut to what a judge's request needs: text and image parts of user
# and assistant turns (an image is Qwen2.5-VL's vision start, pad and end tokens)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_qwen_vl(folder: Path) -> None:
    """A random Qwen2.5-VL (hidden size 16, 2 layers, a 2-block vision tower) with its
    processor (test_qwen_text's byte-level tokenizer: every byte one token, so a digit is
    token id = its byte) and a chat template: all that `transformers serve` loads."""
    from test_qwen_text import SPECIAL, byte_symbols
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {s: i for i, s in enumerate(byte_symbols())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=SPECIAL[1:])
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL}
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(folder)
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    text |= dict(num_key_value_heads=2, vocab_size=len(tokenizer), rope_theta=1e6)
    text |= dict(rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default"})
    text |= dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)


# the processor scales a 32 px image up to its min_pixels (56 x 56): 4 x 4 patches of 14 px,
# merged 2 x 2 into 4 image tokens
IMAGE_TOKENS = 4


def prompt_tokens(instruction: str) -> int:
    """The prompt length of a judge's request for the tiny model: a token per byte of the
    chat template's text, one per special token (2 <|im_start|>, 1 <|im_end|>, 2
    <|vision_start|>, 2 <|vision_end|>) and IMAGE_TOKENS per image."""
    text = PROMPT.format(instruction=instruction, scale=5)
    plain = f"user\nBefore the edit:After the edit:{text}\nassistant\n"
    return len(plain.encode()) + 7 + 2 * IMAGE_TOKENS


@contextmanager
def transformers_serve(folder: Path, log_path: Path):
    """`transformers serve FOLDER` on a free port of 127.0.0.1 (CPU, offline); yields its
    OpenAI base URL once /health answers; stops it and its model process on leaving."""
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    serve = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [str(serve), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port)]
            + ["--device", "cpu", "--log-level", "info", "--enable-log-requests"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own group: the model process stops with it
        )
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(240):  # bounded: at most 120 s
            assert proc.poll() is None, log_path.read_text()
            try:
                with opener.open(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("transformers serve did not start:\n" + log_path.read_text())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def test_a_real_transformers_serve_judges_the_edits(tmp_path):
    """The whole path on a real OpenAI-compatible server: the PNG data URLs decoded by its
    processor, the images through the vision tower, the answer generated and read. The model
    is random, so the test picks what it may say through `transformers serve`'s own request
    field `generation_config` (passed by `extra_body`): suppressing every token but the digits
    0..5, its answer is a score; suppressing the digits, it is garbage, a counted failure.
    `transformers serve` ignores `logprobs`, so the scores come from the text."""
    folder = tmp_path / "tiny-qwen2.5-vl"
    save_tiny_qwen_vl(folder)

    def only(allowed) -> str:  # a byte's token id is the byte; 7 special tokens follow
        return json.dumps({"suppress_tokens": [i for i in range(263) if i not in set(allowed)]})

    images, batch, group = edits()
    with transformers_serve(folder, tmp_path / "serve.log") as url:
        settings = dict(max_tokens=1, timeout=60.0, retries=0, max_failures=1, workers=2)
        judge = VLMJudgeReward(
            url, str(folder), extra_body={"generation_config": only(b"012345")}, **settings
        )
        scores = judge_all(judge, images, batch, group)
        again = judge_all(judge, images, batch, group)
        babble = VLMJudgeReward(
            url,
            str(folder),
            extra_body={"generation_config": only(b"abcdefghijklmnopqrstuvwxyz")},
            **settings,
        )
        with pytest.raises(RewardFailed) as err:
            judge_all(babble, images, batch, group)
    # the server read both images of every request: its log counts each request's prompt
    # tokens, the template's text (one token a byte, one a special token) and 2 x 4 image tokens
    served = [
        int(n) for n in re.findall(r"(\d+) prompt tokens", (tmp_path / "serve.log").read_text())
    ]
    rows = [batch["instruction"][i // group] for i in range(4)]
    assert sorted(served) == sorted([prompt_tokens(instruction) for instruction in rows] * 3)
    got = scores.parts["vlm_judge"]
    assert torch.equal(scores.parts["judge_failures"], torch.zeros(4))
    assert torch.equal(scores.parts["judge_from_logprobs"], torch.zeros(4))  # ignored fields
    assert torch.equal(got * 5, (got * 5).round()) and ((got >= 0) & (got <= 1)).all()
    assert torch.equal(again.parts["vlm_judge"], got)  # greedy: the same answers again
    assert str(err.value).startswith(
        f"VLMJudgeReward: no score from the judge '{folder}' at {url} for any rollout of the "
        "first batch (first: no number in the answer '"
    )
