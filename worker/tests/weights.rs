//! `clip-worker fetch-weights` and the shared model cache: many processes starting together on
//! one volume download once, never see a torn file, verify checksums, and a complete cache is used
//! as is.

mod common;
#[path = "common/local_aws.rs"]
mod local_aws;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clip_test_support::wait_for_port;
use clip_worker::weights::{FILES, MARKER};
use common::fixtures;
use local_aws::{Moto, clients, free_port};
use sha2::{Digest, Sha256};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clip-weights-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A directory served over HTTP by Python's http.server; its access log counts downloads.
struct HttpServer {
    child: Child,
    url: String,
    log: PathBuf,
}

impl HttpServer {
    fn serve(dir: &Path, log: PathBuf) -> HttpServer {
        let port = free_port();
        let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        let child = Command::new(python)
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for_port(port, Duration::from_secs(20), "http.server");
        HttpServer {
            child,
            url: format!("http://127.0.0.1:{port}/"),
            log,
        }
    }

    fn gets(&self, file: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(&format!("\"GET /{file} "))
            .count()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the tiny model with a SHA256SUMS file.
fn source_dir(name: &str, corrupt_sum: bool) -> PathBuf {
    let src = tmp(name);
    let mut sums = String::new();
    for f in FILES {
        let bytes = std::fs::read(fixtures().join("models/tiny").join(f)).unwrap();
        std::fs::write(src.join(f), &bytes).unwrap();
        let mut sum = hex::encode(Sha256::digest(&bytes));
        if corrupt_sum && f == "model.safetensors" {
            sum = "0".repeat(64);
        }
        sums.push_str(&format!("{sum}  {f}\n"));
    }
    std::fs::write(src.join("SHA256SUMS"), sums).unwrap();
    src
}

fn fetch(cache: &Path, source: &str, extra_env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_clip-worker"))
        .arg("fetch-weights")
        .env("CACHE_DIR", cache)
        .env("CLIP_WEIGHTS_SOURCE", source)
        .env("CLIP_MODEL", "ViT-B/32")
        .envs(extra_env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn assert_same_files(dir: &Path) {
    for f in FILES {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(fixtures().join("models/tiny").join(f)).unwrap(),
            "{f} differs"
        );
    }
    assert!(dir.join(MARKER).is_file());
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn concurrent_starts_download_once_from_an_http_source() {
    let src = source_dir("http-src", false);
    let server = HttpServer::serve(&src, tmp("http-log").join("access.log"));
    let cache = tmp("http-cache");
    let children: Vec<Child> = (0..3).map(|_| fetch(&cache, &server.url, &[])).collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            cache.join("ViT-B-32").display().to_string()
        );
    }
    assert_same_files(&cache.join("ViT-B-32"));
    assert_eq!(
        server.gets("model.safetensors"),
        1,
        "three processes, one download"
    );
    // A later start finds the marker: no download, no hashing, nothing written.
    let before = std::fs::metadata(cache.join("ViT-B-32").join(MARKER))
        .unwrap()
        .modified()
        .unwrap();
    let out = fetch(&cache, &server.url, &[]).wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(server.gets("model.safetensors"), 1);
    assert_eq!(
        std::fs::metadata(cache.join("ViT-B-32").join(MARKER))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
}

#[test]
fn a_checksum_mismatch_leaves_nothing_behind() {
    let src = source_dir("bad-src", true);
    let server = HttpServer::serve(&src, tmp("bad-log").join("access.log"));
    let cache = tmp("bad-cache");
    let out = fetch(&cache, &server.url, &[]).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.safetensors")
            && err.contains("failed verification")
            && err.contains("SHA-256"),
        "{err}"
    );
    let dir = cache.join("ViT-B-32");
    assert!(
        !dir.join("model.safetensors").exists(),
        "no unverified weights in place"
    );
    assert!(!dir.join(MARKER).exists());
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| {
        !e.unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".partial-")
    }));
}

#[test]
fn s3_sources_work_too() {
    let moto = Moto::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = clients(&moto).await;
        c.s3.create_bucket().bucket("models").send().await.unwrap();
        for f in FILES {
            let body = std::fs::read(fixtures().join("models/tiny").join(f)).unwrap();
            c.s3.put_object()
                .bucket("models")
                .key(format!("clip/ViT-B-32/{f}"))
                .body(body.into())
                .send()
                .await
                .unwrap();
        }
    });
    let cache = tmp("s3-cache");
    let env = [
        ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ];
    let out = fetch(&cache, "s3://models/clip/ViT-B-32/", &env)
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_files(&cache.join("ViT-B-32"));
}

#[test]
fn missing_weights_without_a_source_are_one_clear_error() {
    let cache = tmp("nosrc");
    // An unreachable source fails with the file and the source named.
    let out = fetch(&cache, "http://127.0.0.1:9/", &[])
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("downloading config.json from http://127.0.0.1:9/"),
        "{err}"
    );
    // An explicit CLIP_WEIGHTS_DIR is never downloaded into.
    let out = Command::new(env!("CARGO_BIN_EXE_clip-worker"))
        .arg("fetch-weights")
        .env("CLIP_WEIGHTS_DIR", &cache)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lacks config.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
