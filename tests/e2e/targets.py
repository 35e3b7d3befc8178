"""Where `make e2e` runs (E2E_CLUSTER):

  local (default)  the single-node cluster tests/cluster/cluster.sh runs on this machine (root)
  kind, k3d        a cluster of that tool on a laptop's Docker (KIND_CLUSTER / K3D_CLUSTER name
                   it; defaults: kind's "kind", k3d's "k3s-default"); KUBECONFIG must select it

What differs between them is only how images reach the node, how its kubelet is restarted, where
the model-cache hostPath lives and how the test reads it, and which address the pods reach this
machine at (moto and the weights server run here). The tests are the same.

kind and k3d: the node is a Docker container, so the cache directory and its files are reached
with `docker exec`; moto's server is started here on 0.0.0.0 and the pods reach it, like the
weights server, at the Docker network's gateway (E2E_HOST overrides it, e.g. on Docker Desktop).
k3d's kubelet lives inside the k3s server process, so its "kubelet restart" restarts the node
container: a harder fault than kind's `systemctl restart kubelet`. These two presets run the
commands their tools document; the project's CI has neither (it cannot pull their node images)
and runs `local`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from local import CLUSTER, ROOT, Kube, cluster_env, load_images, log, wait

CACHE_IN_NODE = "/var/lib/clip-e2e-cache"
GPUS = 8


class LocalCluster:
    name = "local"

    def __init__(self):
        self.env = cluster_env()
        self.node = self.env["CLIP_CLUSTER_NODE"]

    def load(self, images: list[str]) -> None:
        load_images(images)

    def restart_kubelet(self) -> None:
        subprocess.run(["bash", str(CLUSTER), "restart-kubelet"], check=True)

    def read_cache_file(self, rel: str) -> str | None:
        p = Path(self.env["CLIP_CLUSTER_CACHE_PATH"]) / rel
        return p.read_text() if p.is_file() else None

    def close(self) -> None:
        pass


class DockerNodeCluster:
    """kind or k3d: one node container on this machine's Docker."""

    PRESETS = {
        "kind": {"var": "KIND_CLUSTER", "default": "kind", "node": "{name}-control-plane", "network": "kind",
                 "load": ["kind", "load", "docker-image", "--name", "{name}"],
                 "restart": ["docker", "exec", "{node}", "systemctl", "restart", "kubelet"]},
        "k3d": {"var": "K3D_CLUSTER", "default": "k3s-default", "node": "k3d-{name}-server-0",
                "network": "k3d-{name}", "load": ["k3d", "image", "import", "-c", "{name}"],
                "restart": ["docker", "restart", "{node}"]},
    }

    def __init__(self, tool: str):
        self.name = tool
        preset = self.PRESETS[tool]
        for binary in (tool, "docker"):
            if not shutil.which(binary):
                raise SystemExit(f"E2E_CLUSTER={tool} needs {binary} on PATH")
        if not os.environ.get("KUBECONFIG") and not Path.home().joinpath(".kube/config").is_file():
            raise SystemExit(f"E2E_CLUSTER={tool}: set KUBECONFIG to the {tool} cluster's kubeconfig")
        cluster = os.environ.get(preset["var"], preset["default"])
        self.node = preset["node"].format(name=cluster)
        fmt = {"name": cluster, "node": self.node}
        self.load_cmd = [a.format(**fmt) for a in preset["load"]]
        self.restart_cmd = [a.format(**fmt) for a in preset["restart"]]
        network = preset["network"].format(name=cluster)
        host = os.environ.get("E2E_HOST") or subprocess.run(
            ["docker", "network", "inspect", network, "-f", "{{range .IPAM.Config}}{{.Gateway}} {{end}}"],
            capture_output=True, text=True, check=True).stdout.split()[0]
        port = int(os.environ.get("E2E_MOTO_PORT", "5055"))
        log(f"{tool}: node {self.node}; moto and the weights served at {host} (moto on :{port})")
        self.moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "0.0.0.0", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://{host}:{port}"
        wait("moto's server", 30, lambda: reachable(f"{endpoint}/moto-api/"))
        self.docker_exec("mkdir", "-p", CACHE_IN_NODE)
        self.docker_exec("chmod", "0777", CACHE_IN_NODE)
        self.env = {"KUBECONFIG": os.environ.get("KUBECONFIG", str(Path.home() / ".kube/config")),
                    "AWS_ENDPOINT_URL": endpoint, "CLIP_CLUSTER_HOST": host, "CLIP_CLUSTER_NODE": self.node,
                    "CLIP_CLUSTER_CACHE": "hostPath", "CLIP_CLUSTER_CACHE_PATH": CACHE_IN_NODE}
        # GPU-requesting workers schedule on the node, as on the local cluster.
        Kube(self.env).run("patch", "node", self.node, "--subresource=status", "--type=merge",
                           "-p", f'{{"status":{{"capacity":{{"nvidia.com/gpu":"{GPUS}"}}}}}}')

    def docker_exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "exec", self.node, *args], capture_output=True, text=True, check=check)

    def load(self, images: list[str]) -> None:
        for image in images:
            log(f"{self.name}: loading {image}")
            subprocess.run([*self.load_cmd, image], check=True)

    def restart_kubelet(self) -> None:
        subprocess.run(self.restart_cmd, check=True)
        time.sleep(2)

    def read_cache_file(self, rel: str) -> str | None:
        r = self.docker_exec("cat", f"{CACHE_IN_NODE}/{rel}", check=False)
        return r.stdout if r.returncode == 0 else None

    def close(self) -> None:
        self.moto.terminate()
        self.moto.wait(10)


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def target():
    which = os.environ.get("E2E_CLUSTER", "local")
    if which == "local":
        return LocalCluster()
    if which in DockerNodeCluster.PRESETS:
        return DockerNodeCluster(which)
    raise SystemExit(f"E2E_CLUSTER={which}: expected local, kind or k3d (see {ROOT / 'docs/local-cluster.md'})")
