"""Reading a judge's answer: the score in its text, and the expected score from the
probabilities of its answer token.

A judge answers one whole number from 0 to `scale` (at most 9: one digit, so that the answer
is one token of the tokenizers of current VLMs, which split numbers into single digits).

`score_from_text` finds that number in what the model wrote, in this order (the rules are
ours): a JSON answer (`7`, `{"score": 7}`, also inside prose or a ``` fence) by its `score`
or `rating` key; a "7/9" or "7 out of 9" (the number after the slash must be the judge's
scale); a "score: 7" / "rating is 7"; else the one number the answer holds (a decimal too). A `<think>...</think>`
block is left out first. An empty answer, an answer without a number, several different
numbers, a number outside 0..scale or a fraction of another scale raise `Unreadable` with
the reason: never a silent zero.

`score_from_logprobs` is the expected value of the answer digit under the model's own
probabilities, sum_d d * p(d) / sum_d p(d) over the digits 0..scale among the top
alternatives the server returned at the position of the answer token (OpenAI's
`choices[0].logprobs.content[i].top_logprobs`). Using the judge's token probabilities
rather than its sampled answer is Edit-R1's idea (Li et al., 2025, "Uniworld-V2: Reinforce
Image Editing with Diffusion Negative-aware Finetuning and MLLM Implicit Feedback"); the
single-digit scale, renormalising over the digits of the scale (mass on other tokens and on
digits past the scale is left out) and locating the answer token are our choices.
"""

import json
import math
import re

NUMBER = r"-?\d+(?:\.\d+)?"


class Unreadable(ValueError):
    """An answer without a score the judge can read; the message says why."""


def _number(value, scale: int) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise Unreadable(f"a score that is not a number ({value!r})") from None
    if not math.isfinite(x) or not 0 <= x <= scale:
        raise Unreadable(f"{x:g} is outside the scale 0..{scale}")
    return x


NO_JSON = object()


def _from_json(text: str):
    """The score of a JSON answer (any value: checked by the caller), NO_JSON when the text
    holds no JSON."""
    candidates = [text]
    candidates += re.findall(r"\{[^{}]*\}", text)  # a flat object inside prose or a fence
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, bool):
            raise Unreadable(f"a JSON {str(value).lower()}, not a score")
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, dict):
            keys = {str(k).lower(): v for k, v in value.items()}
            for key in ("score", "rating"):
                if key in keys:
                    return keys[key]
            raise Unreadable(f"a JSON object without a score key ({sorted(value)})")
    return NO_JSON


def score_from_text(answer: str, scale: int) -> float:
    """The score 0..scale in `answer` (see the module docstring); `Unreadable` if none."""
    text = re.sub(r"<think>.*?</think>", " ", answer or "", flags=re.S | re.I)
    text = re.sub(r"```(?:json)?", " ", text).strip()
    if not text:
        raise Unreadable("an empty answer")
    found = _from_json(text)
    if found is not NO_JSON:
        return _number(found, scale)
    fraction = re.search(rf"({NUMBER})\s*(?:/|out of)\s*(\d+)", text, re.I)
    if fraction:
        if int(fraction.group(2)) != scale:
            raise Unreadable(f"a score out of {fraction.group(2)}, not out of {scale}")
        return _number(fraction.group(1), scale)
    keyword = re.search(rf"\b(?:score|rating)\b[^\w-]{{0,3}}(?:is\s+|of\s+)?({NUMBER})", text, re.I)
    if keyword:
        return _number(keyword.group(1), scale)
    # a minus sign only where a number starts ("0-5" is 0 and 5, not 0 and -5)
    numbers = {float(x) for x in re.findall(rf"(?<![\w.]){NUMBER}", text)}
    if not numbers:
        raise Unreadable("no number")
    if len(numbers) > 1:
        listed = ", ".join(f"{x:g}" for x in sorted(numbers))
        raise Unreadable(f"several numbers ({listed})")
    return _number(numbers.pop(), scale)


def score_from_logprobs(content: list, value: float, scale: int) -> tuple[float, float] | None:
    """(expected score, the probability mass on the digits 0..scale) at the answer token:
    the first generated token that reads as the digit of `value` (the score read from the
    text). None when `value` is not a whole number, no token reads as it, or no digit of the
    scale has probability: the text's score stands then."""
    if value != int(value):
        return None
    digit = str(int(value))
    for position in content or []:
        if not isinstance(position, dict) or str(position.get("token", "")).strip() != digit:
            continue
        alternatives = list(position.get("top_logprobs") or [])
        if not any(str(a.get("token", "")).strip() == digit for a in alternatives):
            alternatives.append(position)  # the answer token itself, if not among the top
        p = [0.0] * (scale + 1)
        for alt in alternatives:
            token, logprob = str(alt.get("token", "")).strip(), alt.get("logprob")
            if token.isdigit() and len(token) == 1 and int(token) <= scale:
                if isinstance(logprob, (int, float)) and math.isfinite(logprob):
                    p[int(token)] += math.exp(logprob)
        mass = sum(p)
        if mass <= 0:
            return None
        return sum(d * pd for d, pd in enumerate(p)) / mass, mass
    return None
