"""Generate MFSC caption records for a user's product through any OpenAI-compatible chat-completions endpoint.

A multimodal model describes each normal image following the paper's description architecture (FineGrainedAD
§3.2); the JSON answer is normalised to the closed vocabularies, validated against the shipped-record schema, and
retried with the validation errors fed back. Answers are cached by (image hash, model, prompt version, category),
so a rerun sends nothing. Several images are merged into one category record: counts by majority, attribute values
by union, with every disagreement reported. The API key goes into the ``Authorization`` header only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import mimetypes
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fsad.errors import FsadError
from fsad.lightning_modules.finegrainedad.mfsc import (
    VOCABULARIES,
    CaptionRecord,
    CaptionRecordError,
    normalise_value,
    parse_record,
)

log = logging.getLogger(__name__)
PROMPT_VERSION = "mfsc_v1"
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

SYSTEM_PROMPT = f"""You write fine-grained descriptions of NORMAL (defect-free) industrial products for an anomaly
detector. Describe the photo in three views and answer with ONE JSON object, nothing else.
1. Image view: the foreground object (a short noun phrase) and the background (a colour or surface word), and a
   one-sentence summary of what the whole image shows.
2. Foreground view: the components of the object, how many of each, where they are, and one sentence on their
   logical relation (how the components sit relative to each other).
3. Component view: for every component, its colour, texture, shape and direction. Use base values from these
   vocabularies: color {list(VOCABULARIES["color"])}; texture {list(VOCABULARIES["texture"])};
   shape {list(VOCABULARIES["shape"])}; direction {list(VOCABULARIES["direction"])}. Put any other value in
   "extensions". Join several values with the connector "and", "or" or "with". Add a one-sentence caption.
Finally list typical defect states of this product as "abnormal_states", each with exactly one "{{}}" for the
object name, e.g. "{{}} with a crack".
JSON shape: {{"image_level": {{"foreground": str, "background": str, "summary": str}},
"foreground_level": {{"logical_relation": str}},
"components": [{{"name": str, "number": one of ["one","two","three","four","five","six","seven","eight","several",
"many"], "location": one of ["center","top","bottom","left","right","top-left","top-right","bottom-left",
"bottom-right","around","whole","edge","middle","inside","outside"], "attributes": {{"color": {{"base": [..],
"connector": "and"|"or"|"with"|null, "extensions": [..]}}, "texture": {{..}}, "shape": {{..}}, "direction": {{..}}}},
"caption": str}}], "abnormal_states": [str]}}"""


class CaptionGenerationError(FsadError, RuntimeError):
    """The endpoint failed or never produced a valid record; the message lists the errors."""


@dataclass
class EndpointConfig:
    """Where to send requests. Unset fields come from FSAD_LLM_BASE_URL, FSAD_LLM_MODEL and FSAD_LLM_API_KEY."""

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    http_retries: int = 4
    backoff: float = 1.0
    response_format: str = "json_object"

    def resolved(self) -> EndpointConfig:
        base_url = self.base_url or os.environ.get("FSAD_LLM_BASE_URL")
        model = self.model or os.environ.get("FSAD_LLM_MODEL")
        if not base_url or not model:
            missing = [n for n, v in (("base URL", base_url), ("model", model)) if not v]
            raise CaptionGenerationError(
                f"caption endpoint {' and '.join(missing)} not set: pass --base-url/--model or set FSAD_LLM_BASE_URL "
                "and FSAD_LLM_MODEL"
            )
        api_key = self.api_key or os.environ.get("FSAD_LLM_API_KEY")
        return EndpointConfig(base_url.rstrip("/"), model, api_key, self.timeout, self.http_retries, self.backoff,
                              self.response_format)  # fmt: skip


def image_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_content(path: Path) -> dict[str, Any]:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def normalise_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """Map attribute base values to the closed vocabularies; unknown values move to ``extensions``."""
    for component in answer.get("components") or []:
        attributes = component.get("attributes") if isinstance(component, dict) else None
        if not isinstance(attributes, dict):
            continue
        for name, vocabulary in VOCABULARIES.items():
            attribute = attributes.get(name)
            if not isinstance(attribute, dict):
                continue
            base, extensions = [], list(attribute.get("extensions") or [])
            for value in attribute.get("base") or []:
                known = normalise_value(str(value), vocabulary)
                if known:
                    base.append(known)
                else:
                    extensions.append(str(value))
            attribute["base"], attribute["extensions"] = base, extensions
    return answer


class ChatClient:
    """Minimal chat-completions client: JSON mode, timeout, retries with exponential backoff on 429/5xx."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.requests = 0

    def complete(self, messages: list[dict[str, Any]]) -> str:
        body: dict[str, Any] = {"model": self.config.model, "messages": messages, "temperature": 0}
        if self.config.response_format != "none":
            body["response_format"] = {"type": self.config.response_format}
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        url = f"{self.config.base_url}/chat/completions"
        errors = []
        for attempt in range(self.config.http_retries + 1):
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
            self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as err:
                errors.append(f"HTTP {err.code}")
                if err.code not in RETRYABLE_STATUS:
                    break
                retry_after = err.headers.get("Retry-After") if err.headers else None
                delay = float(retry_after) if retry_after and retry_after.isdigit() else None
            except (TimeoutError, urllib.error.URLError) as err:
                errors.append(f"{type(err).__name__}: {getattr(err, 'reason', err)}")
                delay = None
            except (KeyError, IndexError, json.JSONDecodeError) as err:
                raise CaptionGenerationError(f"{url}: unexpected response shape ({err})") from None
            if attempt < self.config.http_retries:
                wait = delay if delay is not None else self.config.backoff * 2**attempt
                log.warning("caption endpoint failed (%s); retrying in %.2f s", errors[-1], wait)
                time.sleep(wait)
        raise CaptionGenerationError(f"{url}: no answer after {len(errors)} tries: {'; '.join(errors)}")


def describe_image(
    client: ChatClient, image: Path, category: str, dataset: str, max_attempts: int = 3
) -> CaptionRecord:
    """One image's record: ask, normalise, validate; feed validation errors back up to ``max_attempts`` times."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "text", "text": f"Describe this normal {category.replace('_', ' ')}."}, image_content(image)
        ]},
    ]  # fmt: skip
    problems = []
    for _ in range(max_attempts):
        answer = client.complete(messages)
        try:
            data = json.loads(answer)
            if not isinstance(data, dict):
                raise ValueError("the answer is not a JSON object")
            data = normalise_answer(data)
            data.update(dataset=dataset, category=category, source_image=image.name,
                        generator={"model": client.config.model, "prompt_id": PROMPT_VERSION})  # fmt: skip
            return parse_record(data, f"answer for {image.name}")
        except (json.JSONDecodeError, ValueError, CaptionRecordError) as err:
            problems.append(str(err))
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"That JSON is invalid: {err}. Answer again with the corrected JSON only."},
            ]
    raise CaptionGenerationError(
        f"no valid record for {image} after {max_attempts} attempts:\n  - " + "\n  - ".join(problems)
    )


@dataclass
class MergeResult:
    record: CaptionRecord
    conflicts: list[str]


def merge_records(records: list[CaptionRecord]) -> MergeResult:
    """One category record from per-image records: components by name, counts and locations by majority,
    attribute base values by union; every disagreement is reported."""
    if not records:
        raise ValueError("nothing to merge")
    conflicts: list[str] = []
    names = Counter(c.name for r in records for c in r.components)
    merged_components = []
    for name in names:
        members = [c for r in records for c in r.components if c.name == name]
        if len(members) < len(records):
            conflicts.append(f"component {name!r} appears in {len(members)} of {len(records)} images")
        entry = members[0].model_dump()
        for key in ("number", "location"):
            votes = Counter(getattr(c, key) for c in members)
            winner = votes.most_common(1)[0][0]
            if len(votes) > 1:
                conflicts.append(f"{name}.{key}: {dict(votes)} → {winner!r} by majority")
            entry[key] = winner
        for attribute in VOCABULARIES:
            values = [v for c in members for v in getattr(c.attributes, attribute).base]
            extras = [v for c in members for v in getattr(c.attributes, attribute).extensions]
            entry["attributes"][attribute]["base"] = list(dict.fromkeys(values))
            entry["attributes"][attribute]["extensions"] = list(dict.fromkeys(extras))
        merged_components.append(entry)
    first = records[0].model_dump()
    first["components"] = merged_components
    first["abnormal_states"] = list(dict.fromkeys(s for r in records for s in r.abnormal_states))
    first["source_image"] = ",".join(r.source_image or "" for r in records)
    foregrounds = Counter(r.image_level.foreground for r in records)
    if len(foregrounds) > 1:
        conflicts.append(f"image_level.foreground: {dict(foregrounds)}")
    return MergeResult(parse_record(first, "merged record"), conflicts)


def generate(
    images: list[Path],
    category: str,
    out: Path,
    endpoint: EndpointConfig,
    dataset: str = "custom",
    cache_dir: Path | None = None,
    max_attempts: int = 3,
) -> MergeResult:
    """Describe every image (from the cache where possible), merge, and write ``out`` atomically."""
    if not images:
        raise CaptionGenerationError("no images given")
    config = endpoint.resolved()
    client = ChatClient(config)
    cache = cache_dir or Path(os.environ.get("FSAD_CACHE_DIR", Path.home() / ".cache" / "fsad")) / "captions"
    cache.mkdir(parents=True, exist_ok=True)
    records = []
    for image in tqdm(images, desc=f"captions {category}", unit="image"):
        key = hashlib.sha256(f"{image_digest(image)}|{config.model}|{PROMPT_VERSION}|{category}".encode()).hexdigest()
        cached = cache / f"{key}.json"
        if cached.is_file():
            records.append(parse_record(json.loads(cached.read_text()), str(cached)))
            continue
        record = describe_image(client, image, category, dataset, max_attempts)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(record.model_dump_json(indent=1))
        tmp.replace(cached)
        records.append(record)
    result = merge_records(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(result.record.model_dump_json(indent=1) + "\n")
    tmp.replace(out)
    log.info("wrote %s from %d images (%d requests)", out, len(images), client.requests)
    return result
