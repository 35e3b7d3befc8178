"""A real OCI registry on loopback for the tests: the CNCF Distribution registry, built from its
Go module by scripts/go-tools.sh, storing into a temporary directory."""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.request

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Registry:
    """`with Registry(dir) as r:` serves at `r.host` (127.0.0.1:<free port>) until the block ends."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.host = f"127.0.0.1:{s.getsockname()[1]}"

    def __enter__(self) -> "Registry":
        binary = subprocess.run(["bash", str(ROOT / "scripts/go-tools.sh"), "registry"], capture_output=True,
                                text=True, check=True).stdout.strip()
        config = self.root / "config.yml"
        config.write_text(yaml.safe_dump({"version": 0.1, "log": {"level": "warn"},
                                          "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}},
                                          "http": {"addr": self.host}}))
        self.log = self.root / "registry.log"
        self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2)
                return self
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.time() < deadline, "the registry did not start"
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        # Gigabytes of image layers: not left behind for pytest's kept temporary directories.
        shutil.rmtree(self.root / "data", ignore_errors=True)


def release(registry: str, images: str, tag: str) -> str:
    """scripts/release.sh to `registry` (host/path); returns the chart's oci:// reference."""
    out = subprocess.run(["bash", str(ROOT / "scripts/release.sh")], capture_output=True, text=True,
                         env={**os.environ, "REGISTRY": registry, "IMAGE_TAG": tag, "RELEASE_IMAGES": images})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
