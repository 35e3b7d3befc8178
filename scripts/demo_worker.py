#!/usr/bin/env python3
"""`make demo-worker`: the whole data path on one machine, without a cluster.

Starts a local S3/SQS/SNS (moto's server, on loopback), creates what a Lakechain middleware has
(input queue with a dead-letter queue, cache bucket, output topic with a queue subscribed to it),
uploads the sample photos, sends one Lakechain `document-created` event per photo, runs
`clip-worker serve` until the queue is drained, prints the enriched events and a throughput line,
then stops everything.

Weights: $CLIP_WEIGHTS_DIR if set; else real ViT-B/32 weights fetched from Hugging Face into
~/.cache/clip-operator when it is reachable; else the random-weight ViT-B/32 the test fixtures
generate (and a banner says so).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "target/release/clip-worker"
FIXTURES = Path(os.environ.get("CLIP_FIXTURES", ROOT / "target/fixtures"))
MIME = {".jpg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".bmp": "image/bmp",
        ".tiff": "image/tiff", ".webp": "image/webp", ".pcx": "image/x-pcx"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not start on port {port}")


def banner(lines: list[str]) -> None:
    width = max(len(l) for l in lines) + 4
    print("#" * width, file=sys.stderr)
    for l in lines:
        print(f"# {l.ljust(width - 4)} #", file=sys.stderr)
    print("#" * width, file=sys.stderr)


def weights() -> tuple[Path, bool]:
    """(directory, real?)"""
    if os.environ.get("CLIP_WEIGHTS_DIR"):
        return Path(os.environ["CLIP_WEIGHTS_DIR"]), True
    cache = Path.home() / ".cache/clip-operator/models"
    try:
        urllib.request.urlopen("https://huggingface.co/openai/clip-vit-base-patch32/resolve/main/config.json", timeout=5)
        r = subprocess.run([str(WORKER), "fetch-weights"], env={**os.environ, "CACHE_DIR": str(cache)},
                           capture_output=True, text=True)
        if r.returncode == 0:
            return Path(r.stdout.strip()), True
        print(f"could not fetch real weights: {r.stderr.strip()[-300:]}", file=sys.stderr)
    except OSError:
        pass
    banner([
        "DEMO WITH RANDOM WEIGHTS: no model hub is reachable, so this runs a",
        "ViT-B/32-shaped CLIP with random weights generated locally. The pipeline is",
        "real; the vectors and keywords are meaningless. For real embeddings:",
        "    CLIP_WEIGHTS_DIR=/path/to/clip-vit-base-patch32 make demo",
    ])
    return FIXTURES / "models/vit-b-32", False


def main() -> None:
    weights_dir, _ = weights()
    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        wait_port(port, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="demo", aws_secret_access_key="demo")
        s3, sqs, sns = (boto3.client(s, **kw) for s in ("s3", "sqs", "sns"))
        s3.create_bucket(Bucket="documents")
        s3.create_bucket(Bucket="cache-storage")
        dlq = sqs.create_queue(QueueName="clip-input-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        queue = sqs.create_queue(QueueName="clip-input", Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 5})})["QueueUrl"]
        topic = sns.create_topic(Name="clip-output")["TopicArn"]
        sink = sqs.create_queue(QueueName="downstream")["QueueUrl"]
        sink_arn = sqs.get_queue_attributes(QueueUrl=sink, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=sink_arn, Attributes={"RawMessageDelivery": "true"})

        photos = sorted(p for p in (FIXTURES / "images").iterdir() if p.suffix in MIME)
        for p in photos:
            etag = s3.put_object(Bucket="documents", Key=p.name, Body=p.read_bytes())["ETag"].strip('"')
            doc = {"url": f"s3://documents/{p.name}", "type": MIME[p.suffix], "size": p.stat().st_size, "etag": etag}
            event = {"specversion": "1.0", "id": str(uuid.uuid4()), "type": "document-created",
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                     "data": {"chainId": str(uuid.uuid4()), "source": doc, "document": doc, "metadata": {},
                              "callStack": ["s3-event-trigger"]}}
            sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(event))
        print(f"sent {len(photos)} Lakechain events to {queue}")

        http = free_port()
        env = {**os.environ, "INPUT_QUEUE_URL": queue, "SNS_TARGET_TOPIC": topic,
               "LAKECHAIN_CACHE_STORAGE": "cache-storage", "CLIP_WEIGHTS_DIR": str(weights_dir),
               "CACHE_DIR": str(ROOT / "target/demo-cache"), "AWS_ENDPOINT_URL": endpoint,
               "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1",
               "HTTP_PORT": str(http), "PROGRESS_INTERVAL_SECONDS": "5"}
        started = time.time()
        worker = subprocess.Popen([str(WORKER), "serve"], env=env)
        outputs = []
        deadline = time.time() + 300
        while len(outputs) < len(photos) and time.time() < deadline:
            for m in sqs.receive_message(QueueUrl=sink, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
                outputs.append(json.loads(m["Body"]))
                sqs.delete_message(QueueUrl=sink, ReceiptHandle=m["ReceiptHandle"])
        elapsed = time.time() - started
        print(f"\n{len(outputs)} enriched events on {topic}:")
        for ev in sorted(outputs, key=lambda e: e["data"]["document"]["url"]):
            meta = ev["data"]["metadata"]
            emb = meta["properties"]["attrs"]["embeddings"]
            print(f"  {ev['data']['document']['url']:42} {emb['model']} {emb['dimensions']}-d -> {emb['vectors']}"
                  f"  keywords: {', '.join(meta.get('keywords', []))}")
        if outputs:
            print("\none event in full:\n" + json.dumps(outputs[0], indent=2))
        rate = len(outputs) / elapsed if elapsed else 0
        print(f"\n{len(outputs)}/{len(photos)} images in {elapsed:.1f}s including start-up and model load"
              f" ({rate:.1f} images/s); dead-lettered: "
              f"{sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=['ApproximateNumberOfMessages'])['Attributes']['ApproximateNumberOfMessages']}")
        if len(outputs) < len(photos):
            sys.exit("not every image was processed")
    finally:
        if worker and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main()
