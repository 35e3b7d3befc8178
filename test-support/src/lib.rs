//! What the workspace's tests share: a real S3/SQS/SNS on loopback (moto's server, from the
//! project's `.venv`, which `make venv` installs) and free ports. The worker's and the operator's
//! tests build their stacks on it; none of them keeps its own copy.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A program from the project's virtual environment: `$VIRTUAL_ENV/bin/NAME`, else
/// `<workspace>/.venv/bin/NAME`. A missing one fails the test with the command that installs it.
pub fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv"));
    let p = venv.join("bin").join(name);
    assert!(p.exists(), "{} missing: run `make venv`", p.display());
    p
}

/// moto's server on a free loopback port, killed on drop (also when a test panics).
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Moto {
    /// Starts it and waits until it accepts connections.
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        wait_for_port(port, Duration::from_secs(60), "moto_server");
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The SDK configuration every test client uses against it: its endpoint, `us-east-1`, and
    /// static `test` credentials. S3 clients add path-style addressing on top.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::Credentials::new(
                "test", "test", None, None, "moto",
            ))
            .load()
            .await
    }
}

/// Blocks until something accepts TCP connections on `127.0.0.1:port`; fails the test naming
/// `what` after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `request` as is to `127.0.0.1:port` on a new connection and reads the answer to its end
/// (send HTTP/1.0 requests, so the server closes it). `None` if nothing accepts or the read fails.
pub fn http_exchange(port: u16, request: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(request).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
