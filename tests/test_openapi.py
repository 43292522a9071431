"""The OpenAPI document tells the truth: every status a route answers is listed with the
error envelope, content types are right, the labels-or-prompts rule is in the schema, and
schemathesis, with all its checks, finds no failure against a real server in a bounded run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from model_registry.demo import DEMO_MODEL

from .helpers import API_KEY, ARTIFACTS, REPO, ServerProcess

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess([DEMO_MODEL], tmp_path_factory.mktemp("openapi")) as proc:
        yield proc


def test_document_lists_every_status_and_content_type(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/images/generations", "/v1/generate"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "408", "413", "429", "500",
                                  "503", "504"}
        assert "422" not in responses  # validation errors are 400s
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        for status in set(responses) - {"200"}:
            assert responses[status]["content"]["application/json"]["schema"] == envelope
    # Edits take a form or JSON with the images by reference; variations a form.
    edits = doc["paths"]["/v1/images/edits"]["post"]
    assert set(edits["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    json_edit = edits["requestBody"]["content"]["application/json"]["schema"]
    image_url = json_edit["properties"]["images"]["items"]["properties"]["image_url"]
    assert image_url["anyOf"][0]["maxLength"] == 20_971_520  # OpenAI's limit
    variations = doc["paths"]["/v1/images/variations"]["post"]
    assert set(variations["requestBody"]["content"]) == {"multipart/form-data"}
    assert "prompt" not in variations["requestBody"]["content"]["multipart/form-data"][
        "schema"]["properties"]
    for operation in (edits, variations):
        assert set(operation["responses"]) == set(responses)
    # A response's optional strings are absent, never null, as in OpenAI's schema.
    image = doc["components"]["schemas"]["Image"]["properties"]
    assert image["url"] == {"type": "string", "title": "Url"}
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    assert httpx.get(f"{server.url}/metrics").headers["content-type"].startswith("text/plain")
    assert set(doc["paths"]["/ready"]["get"]["responses"]) == {"200", "503"}
    rule = doc["components"]["schemas"]["NativeGenerateRequest"]["oneOf"]
    assert [branch["required"] for branch in rule] == [["labels"], ["prompts"]]
    # What the schema says, the server does: neither, or both, is a 400.
    for body in ({}, {"labels": [1], "prompts": ["a cat"]}):
        response = httpx.post(f"{server.url}/v1/generate", json=body, headers=AUTH)
        assert response.status_code == 400, response.text
    # A JSON type other than the documented one is refused, not coerced.
    response = httpx.post(f"{server.url}/v1/generate", headers=AUTH,
                          json={"labels": [1], "partial_images": False})
    assert response.status_code == 400 and response.json()["error"]["param"] == "partial_images"


def test_a_huge_numeric_prompt_gets_our_message(server):
    """Schemathesis once drew a 32,000-digit prompt: Python's own complaint came back."""
    response = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH,
                          json={"prompt": "9" * 32000})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "prompt", error
    assert error["message"] == "class id of over 40 digits out of range 0..9"


def test_schemathesis_finds_nothing(server):
    """All checks, every operation, about 90 s of generated requests (fixed seed)."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    report = ARTIFACTS / "schemathesis"
    report.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(schemathesis), "--config-file", str(REPO / "tests" / "schemathesis.toml"), "run",
         f"{server.url}/openapi.json", "--checks", "all", "--header", f"Authorization: "
         f"Bearer {API_KEY}", "--max-time", "90", "--workers", "1", "--seed", "20261203",
         "--request-timeout", "60", "--report", "junit", "--report-dir", str(report)],
        capture_output=True, text=True, timeout=600, cwd=report)
    summary = result.stdout[-3000:]
    print(summary)
    assert result.returncode == 0, summary
    assert " passed" in summary and "failure" not in summary.split("SUMMARY")[-1], summary
