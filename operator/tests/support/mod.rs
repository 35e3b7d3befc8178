//! A real Kubernetes control plane for tests: etcd and kube-apiserver built from Go modules
//! (`scripts/control-plane.sh`), started on loopback ports in a temporary directory with a static
//! admin token, torn down on drop (also when a test panics). Plus real kubectl/helm
//! (`scripts/kube-tools.sh`), moto's SQS, and `clip-operator run` processes.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one of the project's setup scripts and returns the directory it prints.
fn script_dir(script: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("scripts").join(script))
        .output()
        .expect("run setup script");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// etcd + kube-apiserver, stopped and removed on drop.
pub struct ControlPlane {
    etcd: Child,
    apiserver: Child,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub tools: PathBuf,
}

impl ControlPlane {
    pub fn start() -> ControlPlane {
        let bin = script_dir("control-plane.sh");
        let tools = script_dir("kube-tools.sh");
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("clip-cp-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        let etcd = Command::new(bin.join("etcd"))
            .args(["--data-dir", dir.join("etcd").to_str().unwrap()])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .arg("--unsafe-no-fsync")
            .stdout(Stdio::null())
            .stderr(log("etcd.log"))
            .spawn()
            .expect("start etcd");
        // Service-account token signing key, and the admin token.
        let key = dir.join("sa.key");
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "openssl genrsa failed");
        let token = "clip-test-admin-token";
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )
        .unwrap();
        // Every request at Metadata level: who did what to which resource, for tests that count
        // the operator's requests.
        std::fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )
        .unwrap();
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .args([
                "--audit-policy-file",
                dir.join("audit-policy.yaml").to_str().unwrap(),
                "--audit-log-path",
                dir.join("audit.log").to_str().unwrap(),
            ])
            .args(["--etcd-servers", &format!("http://127.0.0.1:{etcd_port}")])
            .args([
                "--secure-port",
                &api_port.to_string(),
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
            ])
            .args(["--cert-dir", dir.join("certs").to_str().unwrap()])
            .args([
                "--token-auth-file",
                dir.join("tokens.csv").to_str().unwrap(),
            ])
            .args(["--authorization-mode", "RBAC"])
            .args(["--service-account-issuer", "https://kubernetes.default.svc"])
            .args(["--service-account-key-file", key.to_str().unwrap()])
            .args(["--service-account-signing-key-file", key.to_str().unwrap()])
            .args(["--service-cluster-ip-range", "10.96.0.0/24"])
            // No controller-manager runs: pods would wait forever for service-account tokens.
            .args(["--disable-admission-plugins", "ServiceAccount"])
            .stdout(Stdio::null())
            .stderr(log("kube-apiserver.log"))
            .spawn()
            .expect("start kube-apiserver");
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\n\
                 current-context: test\n"
            ),
        )
        .unwrap();
        let cp = ControlPlane {
            etcd,
            apiserver,
            dir,
            kubeconfig,
            server,
            tools,
        };
        wait_for("kube-apiserver /readyz", Duration::from_secs(90), || {
            cp.kubectl(&["get", "--raw", "/readyz"]).status.success()
        });
        cp
    }

    /// The audit log: one JSON event per request (Metadata level, ResponseComplete stage).
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Runs kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.tools.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap()
    }

    /// kubectl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `kubectl apply -f -` with `manifest` on stdin.
    pub fn apply(&self, manifest: &str) -> Output {
        self.apply_as(None, manifest)
    }

    /// `kubectl apply -f -` as `user` (impersonated, with only that user's RBAC), or as admin.
    pub fn apply_as(&self, user: Option<&str>, manifest: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(self.tools.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(user.map(|u| format!("--as={u}")))
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(manifest.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// An object as JSON, or None when it does not exist.
    pub fn get(&self, args: &[&str]) -> Option<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&a);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Polls `check` on an object until it holds.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        args: &[&str],
        mut check: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.get(args).filter(|v| check(v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.get(args)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until `kubectl get args` fails with NotFound.
    pub fn wait_gone(&self, what: &str, timeout: Duration, args: &[&str]) {
        wait_for(what, timeout, || self.get(args).is_none());
    }

    /// A kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's).
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\n\
                 current-context: test\n",
                self.server
            ),
        )
        .unwrap();
        path
    }

    pub fn helm(&self, args: &[&str]) -> Output {
        Command::new(self.tools.join("helm"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("control plane logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub use clip_test_support::{Moto, free_port};

/// An SQS client for `moto`.
pub async fn sqs(moto: &Moto) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&moto.sdk_config().await)
}

/// A `clip-operator run` process, killed on drop.
pub struct Operator {
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(cp: &ControlPlane, moto: &Moto, identity: &str) -> Operator {
        Operator::start_as(cp, moto, identity, &cp.kubeconfig, &[])
    }

    /// Starts the operator with the credentials in `kubeconfig` and extra environment.
    pub fn start_as(
        cp: &ControlPlane,
        moto: &Moto,
        identity: &str,
        kubeconfig: &Path,
        env: &[(&str, &str)],
    ) -> Operator {
        let metrics_port = free_port();
        let log = cp.dir.join(format!("operator-{identity}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_clip-operator"))
            .args([
                "run",
                "--metrics-port",
                &metrics_port.to_string(),
                "--identity",
                identity,
                "--lease-seconds",
                "4",
            ])
            .env("KUBECONFIG", kubeconfig)
            .envs(env.iter().copied())
            .env("AWS_ENDPOINT_URL", &moto.endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("LOG_LEVEL", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start clip-operator");
        Operator {
            child,
            metrics_port,
            log,
        }
    }

    /// The whole answer to `GET /metrics`, headers included; empty if it does not answer.
    pub fn metrics(&self) -> String {
        clip_test_support::http_exchange(self.metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n")
            .unwrap_or_default()
    }

    pub fn is_leader(&self) -> bool {
        self.metrics()
            .lines()
            .any(|l| l.trim() == "clip_operator_leader 1")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (what the kubelet sends) and waits up to `within` for a clean exit.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Argo CD's verdict on an object: runs examples/argocd/health.lua through
/// tests/argocd/health.py (Lua 5.4 from scripts/sysdeps.sh). Returns (status, message).
pub fn argo_health(obj: &Value) -> (String, String) {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg(path("tests/argocd/health.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(obj.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "health.lua: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.trim_end().split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

/// Path of a file in the repository.
pub fn path(rel: &str) -> PathBuf {
    repo().join(rel)
}

pub fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
