"""OpenAI's own Python client against `clip-worker query`, unchanged but for its base URL: the
vectors it decodes (it asks for base64 by default) are the ones `clip-worker embed` gives, and the
endpoint's errors reach it as the exceptions its users already handle."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "target/release/clip-worker"
FIXTURES = Path(os.environ.get("CLIP_FIXTURES", ROOT / "target/fixtures"))
TINY = FIXTURES / "models/tiny"
TEXTS = ["a photo of a cat", "un chat", "a diagram of a transformer"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    assert WORKER.is_file(), f"{WORKER} missing: make build-worker"
    assert TINY.is_dir(), f"{TINY} missing: make fixtures"
    port = free_port()
    log = tmp_path_factory.mktemp("query") / "query.log"
    env = {"PATH": os.environ.get("PATH", ""), "HTTP_PORT": str(port), "CLIP_WEIGHTS_DIR": str(TINY),
           "CLIP_DEVICE": "cpu", "BATCH_WAIT_MS": "20", "QUERY_MAX_INPUTS": "8"}
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(WORKER), "query"], env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    yield url
    proc.terminate()
    assert proc.wait(timeout=20) == 0, log.read_text()


def embed_cli(texts: list[str]) -> list[np.ndarray]:
    args = [str(WORKER), "embed", "--weights", str(TINY), "--device", "cpu"]
    for t in texts:
        args += ["--text", t]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [np.array(json.loads(line)["embedding"], dtype=np.float32) for line in out.splitlines()]


def test_embeddings_create_returns_the_vectors_embed_gives(endpoint):
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key="unused")
    r = client.embeddings.create(model="ViT-B/32", input=TEXTS)
    assert r.model == "ViT-B/32" and len(r.data) == len(TEXTS)
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    want = embed_cli(TEXTS)
    for d, w in zip(r.data, want):
        assert np.array_equal(np.array(d.embedding, dtype=np.float32), w)
    assert r.usage.prompt_tokens == r.usage.total_tokens > 2 * len(TEXTS)
    one = client.embeddings.create(model="ViT-B/32", input="a photo of a cat", encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == len(want[0])
    assert [m.id for m in client.models.list()] == ["ViT-B/32"]


def test_errors_reach_the_client_as_its_own_exceptions(endpoint):
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert "serves ViT-B/32" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="ViT-B/32", input=[f"t{i}" for i in range(9)])
    assert "QUERY_MAX_INPUTS" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="ViT-B/32", input="x", dimensions=8)
    assert "cannot be shortened" in str(e.value)


def test_image_inputs_through_the_client_extra_body(endpoint):
    import base64
    photo = base64.b64encode((FIXTURES / "images/astronaut.png").read_bytes()).decode()
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key="unused")
    # The client types `input` as text or tokens; images go in as the extension objects.
    r = client.embeddings.create(model="ViT-B/32", input=[{"image": photo}], encoding_format="float")  # type: ignore[list-item]
    out = subprocess.run([str(WORKER), "embed", "--weights", str(TINY), "--device", "cpu",
                          str(FIXTURES / "images/astronaut.png")], capture_output=True, text=True, check=True).stdout
    want = np.array(json.loads(out)["embedding"], dtype=np.float32)
    assert np.array_equal(np.array(r.data[0].embedding, dtype=np.float32), want)
