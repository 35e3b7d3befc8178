//! A fault-injecting HTTP proxy on loopback between `clip-worker` and moto: every request is
//! forwarded as it is, except while a fault is active for its operation. Operations are named as
//! AWS names them (`s3:GetObject`, `sqs:ReceiveMessage`, `sns:Publish`), read from the request
//! the SDK sends (SQS's JSON protocol `X-Amz-Target`, SNS's form `Action`, S3's method and path).
//! Faults: an HTTP status with the service's own error body (5xx, throttling), added latency, a
//! connection reset. The proxy counts requests and injected faults per operation.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What happens to a request that a rule matches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// An error answer with this status and the service's error code (`InternalError`,
    /// `ServiceUnavailable`, `SlowDown`, `ThrottlingException`, `Throttling`, ...).
    Error(u16, &'static str),
    /// Forwarded after this delay.
    Delay(Duration),
    /// The connection is closed without an answer.
    Reset,
}

struct Rule {
    /// Operation prefix: `s3:GetObject`, `sqs:` (every SQS call), `` (everything).
    op: &'static str,
    fault: Fault,
    until: Instant,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    requests: BTreeMap<String, u64>,
    injected: BTreeMap<String, u64>,
}

/// The proxy; stops with the test process.
pub struct FaultProxy {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`http://127.0.0.1:PORT`), on
    /// a runtime thread of its own so it serves whatever the test's thread does.
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("upstream is http://IP:PORT");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", std_listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            handle(req, upstream, st.clone())
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        FaultProxy { endpoint, state }
    }

    /// Applies `fault` to the operations starting with `op` for the next `for_`.
    pub fn inject(&self, op: &'static str, fault: Fault, for_: Duration) {
        self.state.lock().unwrap().rules.push(Rule {
            op,
            fault,
            until: Instant::now() + for_,
        });
    }

    /// Ends every fault now.
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Requests seen for the operations starting with `op`.
    pub fn requests(&self, op: &str) -> u64 {
        sum(&self.state.lock().unwrap().requests, op)
    }

    /// Faults injected into the operations starting with `op`.
    pub fn injected(&self, op: &str) -> u64 {
        sum(&self.state.lock().unwrap().injected, op)
    }
}

fn sum(map: &BTreeMap<String, u64>, op: &str) -> u64 {
    map.iter()
        .filter(|(k, _)| k.starts_with(op))
        .map(|(_, v)| v)
        .sum()
}

/// The AWS operation a request is, as `service:Operation`.
pub fn operation(
    method: &hyper::Method,
    headers: &hyper::HeaderMap,
    path: &str,
    body: &[u8],
) -> String {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        return match target.split_once('.') {
            Some(("AmazonSQS", op)) => format!("sqs:{op}"),
            _ => format!("other:{target}"),
        };
    }
    let form = headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if *method == hyper::Method::POST && form {
        let text = String::from_utf8_lossy(body);
        let field = |name: &str| {
            text.split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_default()
                .to_string()
        };
        let service = if field("Version") == "2010-03-31" {
            "sns"
        } else {
            "sqs"
        };
        return format!("{service}:{}", field("Action"));
    }
    // S3, path-style: /bucket or /bucket/key.
    let object = path
        .trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, key)| !key.is_empty());
    let op = match (method.as_str(), object) {
        ("GET", true) => "GetObject",
        ("PUT", true) => "PutObject",
        ("HEAD", true) => "HeadObject",
        ("DELETE", true) => "DeleteObject",
        ("GET", false) => "ListObjects",
        _ => "Other",
    };
    format!("s3:{op}")
}

/// The error answer each service's SDK parses: S3's and SNS's XML, SQS's JSON.
fn error_response(op: &str, status: u16, code: &str) -> Response<Full<Bytes>> {
    let message = "injected by the test's fault proxy";
    let (content_type, body) = if op.starts_with("sqs:") {
        (
            "application/x-amz-json-1.0",
            format!(r#"{{"__type":"com.amazonaws.sqs#{code}","message":"{message}"}}"#),
        )
    } else if op.starts_with("sns:") {
        let kind = if status >= 500 { "Receiver" } else { "Sender" };
        (
            "text/xml",
            format!(
                "<ErrorResponse><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>fault</RequestId></ErrorResponse>"
            ),
        )
    } else {
        (
            "application/xml",
            format!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault</RequestId></Error>"#
            ),
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, content_type.parse().unwrap());
    if op.starts_with("sqs:") {
        r.headers_mut().insert(
            "x-amzn-query-error",
            format!(
                "{code};{}",
                if status >= 500 { "Receiver" } else { "Sender" }
            )
            .parse()
            .unwrap(),
        );
    }
    r
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .to_bytes();
    let op = operation(&parts.method, &parts.headers, parts.uri.path(), &body);
    let fault = {
        let mut st = state.lock().unwrap();
        *st.requests.entry(op.clone()).or_default() += 1;
        let now = Instant::now();
        st.rules.retain(|r| r.until > now);
        let fault = st
            .rules
            .iter()
            .find(|r| op.starts_with(r.op))
            .map(|r| r.fault);
        if fault.is_some() {
            *st.injected.entry(op.clone()).or_default() += 1;
        }
        fault
    };
    match fault {
        Some(Fault::Error(status, code)) => return Ok(error_response(&op, status, code)),
        // An error from the service makes hyper drop the connection without an answer.
        Some(Fault::Reset) => return Err(std::io::Error::other("injected reset")),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    forward(Request::from_parts(parts, Full::new(body)), upstream)
        .await
        .map_err(|e| std::io::Error::other(format!("upstream: {e}")))
}

async fn forward(
    req: Request<Full<Bytes>>,
    upstream: SocketAddr,
) -> Result<Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
