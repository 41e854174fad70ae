"""The MFSC caption generator against a real HTTP server on 127.0.0.1 that speaks chat-completions."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fsad.caption_generator import CaptionGenerationError, EndpointConfig, generate, merge_records
from fsad.lightning_modules.finegrainedad.mfsc import load_record, packaged_record

API_KEY = "sk-test-7c1f9e2b4d6a8f0e3b5c7d9e1f2a4b6c"
REPO = Path(__file__).resolve().parents[2]


def answer(colour: str = "Brown", number: str = "one", extra_component: bool = False) -> str:
    components = [{
        "name": "shell", "number": number, "location": "center",
        "attributes": {"color": {"base": [colour, "beige"], "connector": "and"}, "texture": {"base": ["smooth"]},
                       "shape": {"base": ["round"]}, "direction": {"base": ["any"]}},
        "caption": "a round brown hazelnut shell in the center.",
    }]  # fmt: skip
    if extra_component:
        components.append({**components[0], "name": "tip", "caption": "a pale pointed tip."})
    return json.dumps({
        "image_level": {"foreground": "hazelnut", "background": "black", "summary": "a brown hazelnut on black."},
        "foreground_level": {"logical_relation": "the shell carries a pale tip at one end."},
        "components": components, "abnormal_states": ["{} with a crack", "{} with a hole"],
    })  # fmt: skip


class ScriptedEndpoint:
    """Serves scripted replies in order: ("json", text) | ("status", code) | ("sleep", seconds)."""

    def __init__(self, script: list[tuple[str, object]]) -> None:
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    kind, value = endpoint.script.pop(0) if endpoint.script else ("json", answer())
                if kind == "sleep":
                    time.sleep(value)
                    kind, value = "json", answer()
                if kind == "status":
                    self.send_response(value)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": value}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def config(url: str, **kwargs) -> EndpointConfig:
    return EndpointConfig(base_url=url, model="vision-model", api_key=API_KEY, backoff=0.01, **kwargs)


@pytest.fixture
def nut_images(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "hazelnut_toy/train/good").glob("*.jpg"))[:3]


def test_valid_answer_becomes_a_valid_normalised_record(tmp_path: Path, nut_images, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    with ScriptedEndpoint([("json", answer())]) as server:
        result = generate(nut_images[:1], "hazelnut_toy", tmp_path / "r.json", config(server.url), cache_dir=tmp_path)
        request = server.requests[0]
    record = load_record(tmp_path / "r.json")
    assert record.components[0].attributes.color.base == ["brown", "beige"]  # "Brown" normalised
    assert record.provenance.kind == "image-derived" and not result.conflicts
    assert record.provenance.generator.model == "vision-model"
    expected_hash = hashlib.sha256(nut_images[0].read_bytes()).hexdigest()  # independent of image_digest
    assert [(i.name, i.sha256) for i in record.provenance.images] == [(nut_images[0].name, expected_hash)]
    assert request["body"]["response_format"] == {"type": "json_object"}
    content = request["body"]["messages"][1]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert request["auth"] == f"Bearer {API_KEY}"
    assert API_KEY not in caplog.text + capsys.readouterr().out + (tmp_path / "r.json").read_text()


@pytest.mark.parametrize("bad", ["{not json", json.dumps({"image_level": {}})])
def test_invalid_answers_are_retried_with_the_errors_fed_back(tmp_path: Path, nut_images, bad: str) -> None:
    with ScriptedEndpoint([("json", bad), ("json", answer())]) as server:
        generate(nut_images[:1], "hazelnut_toy", tmp_path / "r.json", config(server.url), cache_dir=tmp_path)
        second = server.requests[1]["body"]["messages"]
    assert len(server.requests) == 2
    assert second[-2] == {"role": "assistant", "content": bad}
    assert second[-1]["content"].startswith("That JSON is invalid:")
    assert ("Expecting property name" in second[-1]["content"]) or ("Field required" in second[-1]["content"])


def test_rate_limit_then_success_backs_off(tmp_path: Path, nut_images) -> None:
    with ScriptedEndpoint([("status", 429), ("status", 503), ("json", answer())]) as server:
        generate(nut_images[:1], "hazelnut_toy", tmp_path / "r.json", config(server.url), cache_dir=tmp_path)
    assert len(server.requests) == 3 and (tmp_path / "r.json").is_file()


def test_timeouts_and_endless_errors_fail_clearly(tmp_path: Path, nut_images, caplog) -> None:
    with ScriptedEndpoint([("sleep", 1.0)] * 3) as server:
        with pytest.raises(CaptionGenerationError, match=r"no answer after 3 tries: .*timed out"):
            generate(nut_images[:1], "n", tmp_path / "t.json", config(server.url, timeout=0.2, http_retries=2),
                     cache_dir=tmp_path)  # fmt: skip
    with ScriptedEndpoint([("json", "[]")] * 3) as server:
        with pytest.raises(CaptionGenerationError, match=r"after 3 attempts:\n  - the answer is not a JSON object"):
            generate(nut_images[:1], "n", tmp_path / "u.json", config(server.url), cache_dir=tmp_path, max_attempts=3)
    assert not (tmp_path / "u.json").exists()
    assert API_KEY not in caplog.text


def test_rerun_hits_the_cache_and_sends_nothing(tmp_path: Path, nut_images) -> None:
    with ScriptedEndpoint([]) as server:
        generate(nut_images, "hazelnut_toy", tmp_path / "a.json", config(server.url), cache_dir=tmp_path / "cache")
        sent = len(server.requests)
        generate(nut_images, "hazelnut_toy", tmp_path / "b.json", config(server.url), cache_dir=tmp_path / "cache")
        assert sent == 3 and len(server.requests) == 3
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_merge_takes_majority_counts_and_reports_conflicts() -> None:
    from fsad.lightning_modules.finegrainedad.mfsc import parse_record

    def record(number: str, colour: str, extra: bool) -> object:
        data = json.loads(answer(colour, number, extra))
        data.update(dataset="custom", category="nut", provenance={
            "kind": "image-derived", "source": "test", "date": "2026-01-01", "generator": {"model": "m", "prompt_id": "p"},
            "images": [{"name": f"{number}-{colour}.png", "sha256": "0" * 64}]})  # fmt: skip
        return parse_record(data, "test")

    merged = merge_records(
        [record("one", "brown", False), record("two", "dark brown", True), record("one", "tan", False)]
    )
    shell = next(c for c in merged.record.components if c.name == "shell")
    assert shell.number == "one"  # 2 of 3 votes
    assert shell.attributes.color.base == ["brown", "beige", "dark brown", "tan"]  # union, first-seen order
    assert any("shell.number" in c and "'one'" in c for c in merged.conflicts)
    assert any("'tip' appears in 1 of 3" in c for c in merged.conflicts)
    assert [i.name for i in merged.record.provenance.images] == ["one-brown.png", "two-dark brown.png", "one-tan.png"]


def test_cli_generate_then_finegrainedad_fit_on_the_record(
    tmp_path: Path, shared_data: Path, monkeypatch, capsys
) -> None:
    from fsad.cli import main

    hazelnut = shared_data / "hazelnut_toy"
    monkeypatch.setenv("FSAD_LLM_API_KEY", API_KEY)
    with ScriptedEndpoint([("json", answer()), ("json", answer(number="two")), ("json", answer())]) as server:
        code = main(["captions", "generate", "--images", *map(str, sorted((hazelnut / "train/good").glob("*.jpg"))[:3]),
                     "--category", "hazelnut_toy", "--out", str(tmp_path / "hazelnut.json"), "--base-url", server.url,
                     "--model", "vision-model", "--backoff", "0.01", "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "conflict: shell.number" in out and API_KEY not in out
    assert packaged_record("mvtec", "hazelnut").category == "hazelnut"  # shipped records untouched
    fit = ["fit", "-c", str(REPO / "configs/finegrainedad/synthetic_tiny.yaml"), "--run_root", str(tmp_path / "runs"),
           "--model.init_args.captions", str(tmp_path / "hazelnut.json"), "--trainer.max_epochs", "2",
           "--data", "fsad.datamodules.folder.FolderDataModule", "--data.init_args.normal_dir", str(hazelnut / "train/good"),
           "--data.init_args.abnormal_dir", str(hazelnut / "test/colour"),
           "--data.init_args.mask_dir", str(hazelnut / "ground_truth/colour"),
           "--data.init_args.category", "hazelnut_toy", "--data.init_args.k_shot", "2",
           "--data.init_args.image_size", "96", "--data.init_args.eval_size", "64"]  # fmt: skip
    assert main(fit) == 0
    assert (tmp_path / "runs/finegrainedad/folder/hazelnut_toy/k2_s0/checkpoints/last.ckpt").is_file()
