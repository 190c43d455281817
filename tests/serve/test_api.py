"""The HTTP API against a tiny random model: fields, validation, API keys, url/base64, SSE, the original protocol."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dallemini.checkpoints import load_parts
from dallemini.checkpoints.native import save_model_dir, write_examples, write_vocabulary
from dallemini.models.clip import SmallClip
from dallemini.pipeline import TextToImage
from dallemini.random_model import create_random_model
from dallemini.serve import ServeSettings, create_app
from dallemini.synonyms import write_synonyms
from tests.models.test_clip import tiny_config

PROMPT = "pizza on a blue background, top left"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("api") / "tiny", preset="tiny")


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> TextToImage:
    return TextToImage.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def client(pipe: TextToImage) -> Iterator[TestClient]:
    app = create_app(pipe, ServeSettings(max_images=8, model_name="tiny"))
    with TestClient(app) as c:
        yield c


def png(data: str) -> Image.Image:
    """Decode a base64 PNG as the original front ends do."""
    im = Image.open(io.BytesIO(base64.b64decode(data)))
    assert im.format == "PNG"
    return im


def test_generate_returns_images_seeds_and_settings(client: TestClient, pipe: TextToImage) -> None:
    r = client.post("/v1/generate", json={"prompt": PROMPT, "num_images": 3, "seed": 7, "top_k": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt"] == PROMPT and body["model"] == "tiny"
    assert body["unknown_words"] == []  # the random model lists no vocabulary: nothing to say
    assert body["settings"] == {
        "num_images": 3,
        "seed": 7,
        "temperature": 1.0,
        "top_k": 8,
        "top_p": 1.0,
        "condition_scale": 10.0,
        "rerank": False,  # the tiny model has no CLIP
        "keep_rows": 0,
    }
    assert [im["seed"] for im in body["images"]] == [7, 8, 9]
    assert all(im["score"] is None and im["url"] is None for im in body["images"])
    direct = pipe(PROMPT, num_images=3, seed=7, top_k=8)
    for im, g in zip(body["images"], direct, strict=True):
        got = np.asarray(png(im["base64"]).convert("RGB"), dtype=np.int16)
        assert got.shape == (64, 64, 3)
        assert np.abs(got - np.asarray(g.image, dtype=np.int16)).max() <= 1
    again = client.post(
        "/v1/generate", json={"prompt": PROMPT, "num_images": 3, "seed": 7, "top_k": 8}
    )
    assert [i["base64"] for i in again.json()["images"]] == [i["base64"] for i in body["images"]]


def test_a_random_seed_is_reported(client: TestClient) -> None:
    body = client.post("/v1/generate", json={"prompt": "a cat", "num_images": 2}).json()
    seed = body["settings"]["seed"]
    assert [im["seed"] for im in body["images"]] == [seed, seed + 1]


def test_url_response_serves_pngs_from_the_cache(client: TestClient) -> None:
    r = client.post("/v1/generate", json={"prompt": "a cat", "num_images": 2, "response": "url"})
    assert r.status_code == 200, r.text
    urls = [im["url"] for im in r.json()["images"]]
    assert all(im["base64"] is None for im in r.json()["images"])
    for url in urls:
        assert url.startswith("http://testserver/v1/images/") and url.endswith(".png")
        got = client.get(url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    missing = client.get("/v1/images/not-an-id.png")
    assert missing.status_code == 404 and "no such image" in missing.json()["detail"]


BAD = [
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"prompt": "   "}, "prompt: Value error, prompt must contain more than white space"),
    ({"prompt": "x" * 501}, "prompt: String should have at most 500 characters"),
    ({}, "prompt: Field required"),
    ({"prompt": 5}, "prompt: Input should be a valid string"),
    (
        {"prompt": "\u200b"},
        "prompt: prompt 0 ('\\u200b') has no words left after text normalization",
    ),
    ({"prompt": "a", "num_images": 0}, "num_images: Input should be greater than or equal to 1"),
    ({"prompt": "a", "num_images": 9}, "num_images: Input should be less than or equal to 8"),
    ({"prompt": "a", "num_images": 1.5}, "num_images: Input should be a valid integer"),
    ({"prompt": "a", "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"prompt": "a", "temperature": 0}, "temperature: Input should be greater than 0"),
    ({"prompt": "a", "top_k": -1}, "top_k: Input should be greater than or equal to 0"),
    ({"prompt": "a", "top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    (
        {"prompt": "a", "condition_scale": -2},
        "condition_scale: Input should be greater than or equal",
    ),
    ({"prompt": "a", "rerank": "maybe"}, "rerank: Input should be a valid boolean"),
    ({"prompt": "a", "response": "jpeg"}, "response: Input should be 'base64' or 'url'"),
    ({"prompt": "a", "steps": 3}, "steps: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(
    ("body", "message"), BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)]
)
def test_invalid_requests_get_422_with_a_message(
    client: TestClient, body: dict, message: str
) -> None:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422
    assert message in r.json()["detail"]
    assert r.json()["errors"]


def test_malformed_json_and_oversized_bodies(client: TestClient) -> None:
    r = client.post(
        "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    big = json.dumps({"prompt": "x" * 2_200_000}).encode()  # the limit: 2.1 MB
    r = client.post("/v1/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(220):
            yield b"x" * 10_000
        yield b'"}'

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_original_demo_protocol(client: TestClient) -> None:
    # Exactly what the original Gradio/Streamlit client (backend.py) does.
    r = client.post("/generate", json={"prompt": "a red apple"})
    assert r.status_code == 200
    json_data = r.json()
    images = [Image.open(io.BytesIO(base64.b64decode(img))) for img in json_data["images"]]
    assert len(images) == 9
    assert all(im.size == (64, 64) for im in images)
    assert json_data["version"].startswith("dallemini ")
    assert client.get("/version").json() == {"version": json_data["version"]}
    assert client.post("/generate", json={"prompt": ""}).status_code == 422
    assert client.post("/generate", json={"prompt": "a", "n": 2}).status_code == 422


def sse_events(text: str) -> list[tuple[str, dict]]:
    """Parse a text/event-stream body into (event, data) pairs."""
    out = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        event = next(ln[6:].strip() for ln in lines if ln.startswith("event:"))
        data = "\n".join(ln[5:].lstrip() for ln in lines if ln.startswith("data:"))
        out.append((event, json.loads(data)))
    return out


def test_stream_yields_partial_frames_then_the_final_images(client: TestClient) -> None:
    params = {"prompt": PROMPT, "num_images": 2, "seed": 11}
    with client.stream("GET", "/v1/generate/stream", params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    names = [e for e, _ in events]
    assert names[0] == "accepted" and names[-1] == "result"
    assert set(names[1:-1]) == {"progress"} and len(names) >= 3
    assert events[0][1] == {"num_images": 2, "seed": 11, "unknown_words": [], "read_as": {}}
    dones = [d["done"] for e, d in events if e == "progress"]
    assert dones == sorted(dones) and all(0 < d < 16 for d in dones)
    first = events[1][1]
    assert first["total"] == 16 and len(first["images"]) == 2
    partial = np.asarray(png(first["images"][0]).convert("RGB"))
    assert (partial[-16:] == 128).all()  # rows not sampled yet are grey
    result = events[-1][1]
    plain = client.post("/v1/generate", json=params).json()
    assert [i["seed"] for i in result["images"]] == [11, 12]
    for a, b in zip(result["images"], plain["images"], strict=True):
        x = np.asarray(png(a["base64"]), dtype=np.int16)
        assert np.abs(x - np.asarray(png(b["base64"]), dtype=np.int16)).max() <= 1


def test_stream_validates_its_query(client: TestClient) -> None:
    r = client.get("/v1/generate/stream", params={"prompt": "a", "num_images": 99})
    assert r.status_code == 422 and "num_images" in r.json()["detail"]
    r = client.get("/v1/generate/stream", params={"prompt": "a", "bogus": 1})
    assert r.status_code == 422 and "bogus: Extra inputs are not permitted" in r.json()["detail"]


def test_health_docs_and_page(client: TestClient) -> None:
    h = client.get("/health")
    assert h.status_code == 200
    body = h.json()
    assert body["ready"] is True and body["auth"] is False
    assert body["queue"]["queued_requests"] == 0 and body["queue"]["max_queue_images"] == 64
    assert body["model"]["image_size"] == 64 and body["model"]["grid"] == 4
    assert body["limits"]["max_images"] == 8 and body["defaults"]["top_k"] == 50
    assert body["model"]["builtin"] is False and body["model"]["threads"] >= 1
    assert body["model"]["description"] is None and body["model"]["examples"] == []
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/generate/stream", "/generate", "/health"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "DALL·E Mini" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_api_key(pipe: TextToImage) -> None:
    app = create_app(pipe, ServeSettings(api_key="s3cret"))
    with TestClient(app) as c:
        for method, url, body in [
            ("POST", "/v1/generate", {"prompt": "a"}),
            ("POST", "/generate", {"prompt": "a"}),
            ("GET", "/v1/generate/stream?prompt=a", None),
            ("GET", "/v1/images/x.png", None),
            ("GET", "/version", None),
        ]:
            r = c.request(method, url, json=body)
            assert r.status_code == 401, url
            assert "API key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
        wrong = c.post("/v1/generate", json={"prompt": "a"}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401
        ok = {"prompt": "a", "num_images": 1}
        assert (
            c.post("/v1/generate", json=ok, headers={"Authorization": "Bearer s3cret"}).status_code
            == 200
        )
        assert c.post("/v1/generate", json=ok, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200


def test_rerank_with_a_builtin_clip(tiny_dir: Path, tmp_path: Path) -> None:
    parts = load_parts(tiny_dir)
    clip = tiny_config(vocab_size=parts.config.bart.encoder_vocab_size, max_text_length=32)
    torch.manual_seed(1)
    states = dict(parts.states, clip=SmallClip(clip).state_dict())
    d = save_model_dir(
        tmp_path / "clip", replace(parts.config, clip=clip), states, parts.tokenizer_json
    )
    app = create_app(d, ServeSettings(), device="cpu")
    with TestClient(app) as c:
        assert c.get("/health").json()["model"]["reranker"] is True
        ranked = c.post("/v1/generate", json={"prompt": "a cat", "num_images": 4, "seed": 3}).json()
        scores = [im["score"] for im in ranked["images"]]
        assert None not in scores and scores == sorted(scores, reverse=True)
        assert sorted(im["seed"] for im in ranked["images"]) == [3, 4, 5, 6]
        assert ranked["settings"]["rerank"] is True
        plain = c.post(
            "/v1/generate", json={"prompt": "a cat", "num_images": 4, "seed": 3, "rerank": False}
        ).json()
        assert [im["seed"] for im in plain["images"]] == [3, 4, 5, 6]
        assert all(im["score"] is None for im in plain["images"])


def test_unknown_words_in_the_reply_and_examples_in_health(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    shutil.copytree(tiny_dir, d)
    write_vocabulary(d, [" avocado on a blue background, top left"])
    write_examples(d, ["avocado on a blue background, top left"], "avocados")
    write_synonyms(d, {"guacamole fruit": "avocado"}, ["avocado"])
    app = create_app(d, ServeSettings(), device="cpu")
    prompt = "an armchair in the shape of an avocado"
    with TestClient(app) as c:
        model = c.get("/health").json()["model"]
        assert model["description"] == "avocados" and model["builtin"] is False
        assert model["examples"] == ["avocado on a blue background, top left"]
        body = c.post("/v1/generate", json={"prompt": prompt, "num_images": 1, "seed": 0}).json()
        assert body["unknown_words"] == ["armchair", "shape"] and body["read_as"] == {}
        known = {"prompt": "Avocado, top-left", "num_images": 1, "seed": 0}
        assert c.post("/v1/generate", json=known).json()["unknown_words"] == []
        read = {"prompt": "a Guacamole fruit, top left", "num_images": 1, "seed": 0}
        body = c.post("/v1/generate", json=read).json()
        assert body["read_as"] == {"guacamole fruit": "avocado"} and body["unknown_words"] == []
        params = {"prompt": prompt, "num_images": 1, "seed": 0}
        with c.stream("GET", "/v1/generate/stream", params=params) as r:
            events = dict(sse_events(r.read().decode()))
        assert events["accepted"]["unknown_words"] == ["armchair", "shape"]
        assert events["result"]["unknown_words"] == ["armchair", "shape"]


def test_json_types_are_not_coerced(client: TestClient) -> None:
    for wrong in ({"num_images": "2"}, {"num_images": True}, {"rerank": 0}, {"seed": "7"}):
        r = client.post("/v1/generate", json={"prompt": "a cat", **wrong})
        assert r.status_code == 422, (wrong, r.text)
    ok = client.post("/v1/generate", json={"prompt": "a cat", "num_images": 1, "temperature": 1})
    assert ok.status_code == 200  # an integer is a number
    # URL query parameters are text: the stream's still parse
    r = client.get(
        "/v1/generate/stream", params={"prompt": "a cat", "num_images": "1", "rerank": "false"}
    )
    assert r.status_code == 200 and "event: result" in r.text


def test_metrics_in_prometheus_format(client: TestClient) -> None:
    assert client.post("/v1/generate", json={"prompt": "a cat", "num_images": 2}).status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    assert samples[("dallemini_requests_total", (("outcome", "done"),))] >= 1
    assert samples[("dallemini_images_total", ())] >= 2
    assert samples[("dallemini_queued_requests", ())] == 0
    assert samples[("dallemini_request_seconds_count", (("route", "/v1/generate"),))] >= 1
    # continuous batching: decoding steps, their time and rows, and time to the first token
    assert samples[("dallemini_steps_total", ())] >= 16
    assert samples[("dallemini_step_seconds_count", ())] >= 16
    assert samples[("dallemini_step_rows_count", ())] >= 16
    assert samples[("dallemini_time_to_first_token_seconds_count", ())] >= 1


def test_every_answer_has_a_request_id_and_an_access_log_line(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dallemini.access"):
        mine = client.get("/health", headers={"X-Request-ID": "abc-123"})
        made = client.post("/v1/generate", json={"prompt": "a cat", "num_images": "2"})  # 422
        odd = client.get("/health", headers={"X-Request-ID": "no spaces allowed"})
    assert mine.headers["x-request-id"] == "abc-123"
    assert made.status_code == 422 and len(made.headers["x-request-id"]) == 16
    assert odd.headers["x-request-id"] != "no spaces allowed"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "dallemini.access"]
    assert [(x["request_id"], x["status"]) for x in lines] == [
        ("abc-123", 200),
        (made.headers["x-request-id"], 422),
        (odd.headers["x-request-id"], 200),
    ]


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_completion_keeps_the_init_images_rows(client: TestClient, pipe: TextToImage) -> None:
    init = pipe("an init image", seed=1)[0].image
    body = {"prompt": PROMPT, "num_images": 2, "seed": 5, "init_image": _png_b64(init)}
    r = client.post("/v1/generate", json=body | {"keep_rows": 2})
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["keep_rows"] == 2
    want = pipe(PROMPT, num_images=2, seed=5, init_image=init, keep_rows=2)
    for im, g in zip(r.json()["images"], want, strict=True):
        got = np.asarray(png(im["base64"]).convert("RGB"), dtype=np.int16)
        assert np.abs(got - np.asarray(g.image, dtype=np.int16)).max() <= 1
    # the same through the event stream's JSON body
    with client.stream("POST", "/v1/generate/stream", json=body | {"keep_rows": 2}) as s:
        text = "".join(s.iter_text())
    assert s.status_code == 200 and "event: result" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"keep_rows": 2}, "keep_rows needs an init_image"),
        ({"init_image": "not base64!", "keep_rows": 1}, "not valid base64"),
        ({"init_image": base64.b64encode(b"GIF89a...").decode(), "keep_rows": 1}, "not a PNG"),
        ({"init_image": "", "keep_rows": 99}, "less than or equal to 64"),
        ({"keep_rows": 5}, "at most 4"),
    ],
)
def test_bad_completions_get_422(client: TestClient, extra: dict, message: str) -> None:
    r = client.post("/v1/generate", json={"prompt": PROMPT} | extra)
    assert r.status_code == 422 and message in r.json()["detail"], r.text
