#!/usr/bin/env bash
# A single-node Kubernetes built from source, in the spirit of Kubernetes' own
# hack/local-up-cluster.sh, for `make cluster-up`, `make e2e` and `make demo`.
#
#   tests/cluster/cluster.sh up      start everything (idempotent) and print how to use it
#   tests/cluster/cluster.sh down    stop everything it started and remove its state
#   tests/cluster/cluster.sh env     print the variables (KUBECONFIG, AWS_ENDPOINT_URL, ...)
#   tests/cluster/cluster.sh load IMAGE...   copy images from Docker into the node's containerd
#   tests/cluster/cluster.sh trust-registry HOST:PORT   let the node's containerd pull from a
#                                  plain-HTTP registry on loopback (a hosts.toml in its certs.d)
#   tests/cluster/cluster.sh restart-kubelet   stop and start the kubelet (fault tests)
#
# What runs (needs root; Linux with cgroup v1 or v2):
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy, built
#   from their Go modules by scripts/control-plane.sh and cached by version; containerd (CRI
#   plugin) and runc from Debian; the bridge/host-local/loopback CNI plugins from Debian's
#   containernetworking-plugins; a pause image built here from tests/cluster/pause.c.
#   Client certificates for every component from one CA, the Node and RBAC authorizers,
#   NodeRestriction and the default admission plugins (ServiceAccount included), service-account
#   tokens issued by the controller-manager's token controller and projected by the kubelet.
#   The aggregation layer as kubeadm configures it (front-proxy CA, --requestheader-*, the API
#   server's proxy client certificate; aggregator routing to endpoints), for extension API
#   servers such as KEDA's metrics server.
#   kube-proxy (iptables mode) makes the `kubernetes` Service reach the API server from pods.
#   moto's server (S3, SQS, SNS) from the project's venv: the cluster's AWS.
#
# Network: everything is on loopback or on a bridge this script creates (clip0, 10.88.0.1/16),
# whose pods live in network namespaces the CNI plugin creates. The API server, moto and the test
# servers listen on 10.88.0.1; a FORWARD rule drops anything from the bridge to other interfaces,
# so no pod traffic leaves the machine. There is no cluster DNS: workers are given addresses.
#
# The node advertises nvidia.com/gpu (8) as an extended resource so GPU-requesting pods schedule;
# the worker then runs on the CPU. The model cache: an NFSv4.1 export from nfs-kernel-server
# when the kernel serves NFS (EFS is NFSv4.1), else a hostPath directory; `env` says which. (The
# kernel this project is developed on has no nfsd, so there it is hostPath.)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
STATE=${CLIP_CLUSTER_STATE:-/var/lib/clip-cluster}
NODE=${CLIP_NODE_NAME:-clip-node}
BRIDGE=clip0
GW=10.88.0.1
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.96.0.0/16
API_PORT=6443
MOTO_PORT=5000
GPUS=8
PKI=$STATE/pki
LOGS=$STATE/logs
RUN=$STATE/run
CTR_SOCK=$STATE/containerd/containerd.sock
PAUSE_IMAGE=localhost/clip-local/pause:3.10

say() { echo "==> $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# start NAME COMMAND...: runs in its own session, log in $LOGS/NAME.log, pid in $RUN/NAME.pid.
start() {
  local name=$1; shift
  alive "$name" && return 0
  setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

stop() { # NAME [SIGNAL]
  local name=$1 sig=${2:-TERM} pid
  [ -f "$RUN/$name.pid" ] || return 0
  pid=$(cat "$RUN/$name.pid")
  kill -"$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$RUN/$name.pid"
}

wait_until() { # WHAT SECONDS COMMAND...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${secs}s waiting for $what (logs: $LOGS)"
}

tools() {
  BIN=$(bash "$ROOT/scripts/control-plane.sh" node)
  KTOOLS=$(bash "$ROOT/scripts/kube-tools.sh")
  KUBECTL="$KTOOLS/kubectl --kubeconfig $STATE/admin.kubeconfig"
}

packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v gcc >/dev/null || missing+=(gcc)
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
  }
}

# --- PKI: one CA; a serving certificate for the API server; a client certificate per component;
# and, as kubeadm does, a second CA for the aggregation layer's front proxy (the API server's
# client certificate towards extension API servers such as KEDA's metrics server).
cert() { # NAME CN O [SAN]   (signed by $CERT_CA, default ca)
  local name=$1 cn=$2 o=$3 san=${4:-}
  [ -f "$PKI/$name.crt" ] && return 0
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  local subj="/CN=$cn"
  [ -n "$o" ] && subj="/O=$o/CN=$cn"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  local ext=$PKI/$name.ext
  echo "basicConstraints=CA:FALSE" > "$ext"
  echo "keyUsage=critical,digitalSignature,keyEncipherment" >> "$ext"
  if [ -n "$san" ]; then
    echo "extendedKeyUsage=serverAuth,clientAuth" >> "$ext"
    echo "subjectAltName=$san" >> "$ext"
  else
    echo "extendedKeyUsage=clientAuth" >> "$ext"
  fi
  local ca=${CERT_CA:-ca}
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

kubeconfig() { # NAME (client certificate $PKI/NAME.crt)
  local name=$1
  cat > "$STATE/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$GW:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $name
  user:
    client-certificate: $PKI/$name.crt
    client-key: $PKI/$name.key
contexts:
- name: local
  context: {cluster: local, user: $name}
current-context: local
EOF
}

pki() {
  mkdir -p "$PKI"
  if [ ! -f "$PKI/ca.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
      -days 3650 -subj "/CN=clip-local-ca" 2>/dev/null
  fi
  [ -f "$PKI/sa.key" ] || openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  if [ ! -f "$PKI/front-proxy-ca.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/front-proxy-ca.key" \
      -out "$PKI/front-proxy-ca.crt" -days 3650 -subj "/CN=clip-local-front-proxy-ca" 2>/dev/null
  fi
  CERT_CA=front-proxy-ca cert front-proxy-client front-proxy-client ""
  cert apiserver kube-apiserver "" \
    "IP:$GW,IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin admin system:masters
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  cert kubelet "system:node:$NODE" system:nodes
  cert kube-proxy system:kube-proxy ""
  for c in admin controller-manager scheduler kubelet kube-proxy; do kubeconfig "$c"; done
}

network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$GW/16" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  # Nothing from the pods leaves the machine: only traffic between the bridge's own addresses.
  iptables -C FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP 2>/dev/null \
    || iptables -I FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP
  mkdir -p "$STATE/cni"
  cat > "$STATE/cni/10-clip.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "clip",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$GW"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$STATE/cni/ipam"}},
    {"type": "loopback"}
  ]
}
EOF
}

containerd_up() {
  mkdir -p "$STATE/containerd"
  cat > "$STATE/containerd/config.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CTR_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The sandbox here lacks CAP_SYS_RESOURCE: without this runc fails the pause container with
  # "can't get final child's PID from pipe" (its oom_score_adj write was refused).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni"
  # Per-registry settings, read at each pull (trust-registry adds one).
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$STATE/containerd/certs.d"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
EOF
  start containerd containerd --config "$STATE/containerd/config.toml"
  wait_until containerd 30 ctr --address "$CTR_SOCK" version
}

ctr_() { ctr --address "$CTR_SOCK" -n k8s.io "$@"; }

# A registry on loopback that speaks HTTP (scripts/release.sh's target in the e2e): containerd
# pulls from it as the kubelet asks, like a node pulling from ECR.
trust_registry() {
  local host=${1:?HOST:PORT}
  case "$host" in 127.0.0.1:*|localhost:*) ;; *) die "trust-registry: only loopback registries ($host)" ;; esac
  mkdir -p "$STATE/containerd/certs.d/$host"
  cat > "$STATE/containerd/certs.d/$host/hosts.toml" <<EOF
server = "http://$host"
[host."http://$host"]
  capabilities = ["pull", "resolve"]
EOF
}
# docker.io/library/ prefixes, as containerd names images.
normalized() {
  case "$1" in
    */*/*) echo "$1" ;;
    *.*/*|localhost/*) echo "$1" ;;
    */*) echo "docker.io/$1" ;;
    *) echo "docker.io/library/$1" ;;
  esac
}
has_image() { ctr_ images ls -q | grep -qxF "$1"; }

pause_image() {
  has_image "$PAUSE_IMAGE" && return 0
  say "building the pause image from tests/cluster/pause.c"
  local dir; dir=$(mktemp -d)
  gcc -static -O2 -s -o "$dir/pause" "$ROOT/tests/cluster/pause.c"
  # An OCI image layout by hand: one layer holding /pause.
  python3 - "$dir" "$PAUSE_IMAGE" <<'PY'
import hashlib, io, json, os, sys, tarfile
d, ref = sys.argv[1], sys.argv[2]
blobs = os.path.join(d, "oci", "blobs", "sha256"); os.makedirs(blobs)
def blob(data):
    h = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, h), "wb").write(data)
    return {"digest": "sha256:" + h, "size": len(data)}
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    info = t.gettarinfo(os.path.join(d, "pause"), arcname="pause"); info.uid = info.gid = 0
    info.uname = info.gname = ""; info.mtime = 0
    t.addfile(info, open(os.path.join(d, "pause"), "rb"))
layer = buf.getvalue()
config = {"architecture": "amd64", "os": "linux",
          "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
          "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}
cfg = blob(json.dumps(config).encode()); cfg["mediaType"] = "application/vnd.oci.image.config.v1+json"
lay = blob(layer); lay["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cfg, "layers": [lay]}
man = blob(json.dumps(manifest).encode()); man["mediaType"] = manifest["mediaType"]
man["annotations"] = {"org.opencontainers.image.ref.name": ref}
json.dump({"schemaVersion": 2, "manifests": [man]}, open(os.path.join(d, "oci", "index.json"), "w"))
open(os.path.join(d, "oci", "oci-layout"), "w").write('{"imageLayoutVersion": "1.0.0"}')
PY
  tar -C "$dir/oci" -cf "$dir/pause.tar" .
  ctr_ images import --index-name "$PAUSE_IMAGE" "$dir/pause.tar" >/dev/null
  rm -rf "$dir"
}

etcd_up() {
  start etcd "$BIN/etcd" --data-dir "$STATE/etcd" --name clip \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster clip=http://127.0.0.1:2380 --unsafe-no-fsync
}

apiserver_up() {
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers http://127.0.0.1:2379 \
    --bind-address "$GW" --advertise-address "$GW" --secure-port "$API_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$PKI/sa.key" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --allow-privileged=true \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" \
    --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --audit-log-path "$LOGS/audit.log" --audit-policy-file "$STATE/audit-policy.yaml" \
    --audit-log-maxsize 200
}

controllers_up() {
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10257 --leader-elect=false \
    --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --allocate-node-cidrs=false
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false
}

kubelet_up() {
  mkdir -p "$STATE/kubelet"
  cat > "$STATE/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This VM has cgroup v1 only, which kubelet 1.35 refuses unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$CTR_SOCK
address: $GW
port: 10250
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
failSwapOn: false
serializeImagePulls: false
# The images are loaded from Docker, not pulled: never garbage-collect them, never evict.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
shutdownGracePeriod: 0s
EOF
  start kubelet "$BIN/kubelet" \
    --config "$STATE/kubelet-config.yaml" \
    --kubeconfig "$STATE/kubelet.kubeconfig" \
    --root-dir "$STATE/kubelet" \
    --hostname-override "$NODE" --node-ip "$GW"
}

proxy_up() {
  start kube-proxy "$BIN/kube-proxy" \
    --kubeconfig "$STATE/kube-proxy.kubeconfig" \
    --hostname-override "$NODE" --proxy-mode iptables --cluster-cidr "$POD_CIDR" \
    --conntrack-max-per-core 0 --metrics-bind-address 127.0.0.1:10249 \
    --healthz-bind-address 127.0.0.1:10256
}

moto_up() {
  local venv_bin="$ROOT/.venv/bin"
  [ -x "$venv_bin/moto_server" ] || die "moto_server is missing: run make venv"
  start moto "$venv_bin/moto_server" -H "$GW" -p "$MOTO_PORT"
  wait_until "moto on $GW:$MOTO_PORT" 60 curl -fsS "http://$GW:$MOTO_PORT/moto-api/"
}

# NFSv4.1 export of $STATE/nfs when the kernel serves NFS; else the cache is a hostPath.
model_cache() {
  # Owned by the workers' uid/gid, as an EFS access point for them would be.
  mkdir -p "$STATE/cache-export"
  chown 1000:1000 "$STATE/cache-export"
  chmod 0775 "$STATE/cache-export"
  if [ -f "$STATE/cache-kind" ]; then return 0; fi
  echo hostPath > "$STATE/cache-kind"
  if nfs_up; then echo nfs > "$STATE/cache-kind"; fi
}

nfs_up() {
  # The kernel must serve NFS (nfsd built in or as a module); many VM and container kernels do not.
  grep -qw nfsd /proc/filesystems || { modprobe nfsd 2>/dev/null && grep -qw nfsd /proc/filesystems; } || return 1
  if [ ! -x /usr/sbin/exportfs ]; then
    say "installing nfs-kernel-server (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nfs-kernel-server >/dev/null 2>&1 || return 1
  fi
  mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd 2>/dev/null || return 1
  mkdir -p /etc/exports.d
  echo "$STATE/cache-export $GW/16(rw,sync,no_subtree_check,no_root_squash,insecure,fsid=1)" \
    > /etc/exports.d/clip-cluster.exports
  (rpcbind -w 2>/dev/null || rpcbind 2>/dev/null || true)
  exportfs -ra 2>/dev/null || return 1
  rpc.nfsd -N 2 -N 3 -V 4.1 8 2>/dev/null || return 1
  rpc.mountd -N 2 -N 3 2>/dev/null || true
  local probe; probe=$(mktemp -d)
  if mount -t nfs4 -o vers=4.1 "$GW:$STATE/cache-export" "$probe" 2>/dev/null; then
    umount "$probe"; rmdir "$probe"; return 0
  fi
  rmdir "$probe"
  return 1
}

audit_policy() {
  cat > "$STATE/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  resources: [{group: coordination.k8s.io, resources: [leases]}]
- level: None
  verbs: [get, list, watch]
- level: Metadata
EOF
}

node_ready() { $KUBECTL get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -q True; }

advertise_gpus() {
  $KUBECTL patch node "$NODE" --subresource=status --type=merge \
    -p "{\"status\":{\"capacity\":{\"nvidia.com/gpu\":\"$GPUS\"}}}" >/dev/null
}

env_lines() {
  cat <<EOF
export KUBECONFIG=$STATE/admin.kubeconfig
export AWS_ENDPOINT_URL=http://$GW:$MOTO_PORT
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export CLIP_CLUSTER_NODE=$NODE CLIP_CLUSTER_HOST=$GW
export CLIP_CLUSTER_CACHE=$(cat "$STATE/cache-kind" 2>/dev/null || echo hostPath) CLIP_CLUSTER_CACHE_PATH=$STATE/cache-export
export CLIP_CLUSTER_CONTAINERD=$CTR_SOCK CLIP_CLUSTER_LOGS=$LOGS
export PATH=$KTOOLS:\$PATH
EOF
}

up() {
  [ "$(id -u)" -eq 0 ] || die "needs root (containerd, the kubelet, a bridge, iptables)"
  mkdir -p "$STATE" "$LOGS" "$RUN"
  packages
  say "building or finding Kubernetes v1.35 components and etcd (cached; first run ~15 minutes)"
  tools
  pki
  audit_policy
  network
  containerd_up
  pause_image
  etcd_up
  apiserver_up
  wait_until "kube-apiserver /readyz" 90 $KUBECTL get --raw /readyz
  controllers_up
  kubelet_up
  moto_up
  model_cache
  say "waiting for node $NODE to be Ready"
  wait_until "node $NODE Ready" 120 node_ready
  # After the node registered: a kube-proxy started before it programs no Service rules.
  proxy_up
  wait_until "kube-proxy's rule for the kubernetes Service" 60 \
    sh -c "iptables-save -t nat | grep -q 'default/kubernetes:https cluster IP'"
  advertise_gpus
  wait_until "the default ServiceAccount" 60 $KUBECTL -n default get serviceaccount default
  say "cluster is up: $(cat "$STATE/cache-kind") model cache, $GPUS nvidia.com/gpu advertised"
  cat >&2 <<EOF

Use it:
$(env_lines)

Images from Docker: tests/cluster/cluster.sh load IMAGE...
Logs: $LOGS    Stop and remove: make cluster-down
EOF
}

restart_kubelet() {
  tools
  stop kubelet
  kubelet_up
  wait_until "node $NODE Ready" 120 node_ready
  advertise_gpus
}

load() {
  local docker; docker=$(bash "$ROOT/scripts/docker.sh")
  for image in "$@"; do
    local id; id=$($docker image inspect -f '{{.Id}}' "$image")
    if [ "$(cat "$RUN/loaded-$(echo "$image" | tr '/:' '__')" 2>/dev/null)" = "$id" ] \
       && has_image "$(normalized "$image")"; then
      continue
    fi
    say "loading $image into the node's containerd ($($docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec))"
    $docker save "$image" | ctr_ images import - >/dev/null
    echo "$id" > "$RUN/loaded-$(echo "$image" | tr '/:' '__')"
  done
}

down() {
  [ -d "$STATE" ] || return 0
  say "stopping the local cluster and removing $STATE"
  for c in kube-proxy kube-scheduler kube-controller-manager moto; do stop "$c"; done
  stop kubelet
  # The pods' containers outlive containerd in their shims: stop them through the CRI first.
  if alive containerd; then
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$t" 2>/dev/null || true; done
    sleep 1
  fi
  stop containerd
  pkill -KILL -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address $CTR_SOCK" 2>/dev/null || true
  stop kube-apiserver
  stop etcd
  if [ -f /etc/exports.d/clip-cluster.exports ]; then
    rm -f /etc/exports.d/clip-cluster.exports
    exportfs -ra 2>/dev/null || true
    rpc.nfsd 0 2>/dev/null || true
  fi
  # Every mount under the state directory (pod volumes, overlay snapshots, the NFS cache).
  grep " $STATE" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  if [ -n "${BIN:-}" ] || BIN=$(bash "$ROOT/scripts/control-plane.sh" node 2>/dev/null); then
    "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  fi
  iptables -D FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP 2>/dev/null || true
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/{print $1}'); do ip netns delete "$ns" 2>/dev/null || true; done
  ip link delete "$BRIDGE" 2>/dev/null || true
  rm -rf "$STATE"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) tools >/dev/null; env_lines ;;
  load) shift; load "$@" ;;
  restart-kubelet) restart_kubelet ;;
  trust-registry) shift; trust_registry "$@" ;;
  *) echo "usage: $0 up|down|env|load IMAGE...|restart-kubelet|trust-registry HOST:PORT" >&2; exit 2 ;;
esac
