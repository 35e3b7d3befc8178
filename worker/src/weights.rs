//! Model weights on the shared cache (the EFS volume every worker pod mounts at `/cache`).
//!
//! * Location: `CLIP_WEIGHTS_DIR` when set, else `$CACHE_DIR/<slug>/` (`ViT-B-32`, ...), in the
//!   Hugging Face layout.
//! * A directory is complete when its marker file (`.complete.json`, written last, listing each
//!   file's size and SHA-256) exists, or, for directories users provide, when every file exists.
//!   Start-up checks the marker and the sizes only: gigabytes are never re-hashed on every start.
//! * Missing weights are downloaded once, from `CLIP_WEIGHTS_SOURCE` (`https://...`, default the
//!   model's Hugging Face repository, or `s3://bucket/prefix/`), under an exclusive lock on a file
//!   in the cache, so many pods starting together on one volume download once; the others wait
//!   and find the marker. Files are written under temporary names, verified, synced and renamed
//!   into place, so no reader ever sees a torn file.
//! * Checksums: from a `SHA256SUMS` file at the source when it has one, else the SHA-256 Hugging
//!   Face reports for large files (`X-Linked-Etag`); the size is always checked.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::aws::Aws;
use crate::event::parse_s3_url;
use crate::model::ModelSpec;

/// The files a model directory needs.
pub const FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
];
/// Written last; its presence means the directory is complete.
pub const MARKER: &str = ".complete.json";
const LOCK: &str = ".download.lock";

/// Where the weights are and where missing ones come from.
#[derive(Debug, Clone)]
pub struct WeightsConfig {
    pub spec: ModelSpec,
    /// Model cache root (`CACHE_DIR`).
    pub cache_dir: PathBuf,
    /// Explicit directory (`CLIP_WEIGHTS_DIR`): used as is, never downloaded into.
    pub weights_dir: Option<PathBuf>,
    /// Download source (`CLIP_WEIGHTS_SOURCE`); `None`: the model's Hugging Face repository.
    pub source: Option<String>,
}

/// Why weights are not available.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{0}")]
    Missing(String),
    #[error("cannot write the model cache {0}: {1} (mount it read-write, or provide the weights)")]
    ReadOnly(PathBuf, std::io::Error),
    #[error("downloading {file} from {source_url}: {msg}")]
    Download {
        file: String,
        source_url: String,
        msg: String,
    },
    #[error("{file} from {source_url} failed verification: {msg}")]
    Verify {
        file: String,
        source_url: String,
        msg: String,
    },
    #[error("{0}")]
    Io(String),
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Marker {
    model: String,
    source: String,
    files: BTreeMap<String, FileDigest>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct FileDigest {
    size: u64,
    sha256: String,
}

impl WeightsConfig {
    /// The directory the weights live in.
    pub fn dir(&self) -> PathBuf {
        self.weights_dir
            .clone()
            .unwrap_or_else(|| self.cache_dir.join(self.spec.slug))
    }

    /// The download source, as a base URL ending in `/`.
    pub fn source(&self) -> String {
        let s = self.source.clone().unwrap_or_else(|| {
            format!("https://huggingface.co/{}/resolve/main/", self.spec.hf_repo)
        });
        if s.ends_with('/') { s } else { format!("{s}/") }
    }
}

/// Whether `dir` holds a complete model (marker with matching sizes, or all files present for a
/// directory without a marker). Cheap: no hashing.
pub fn is_complete(dir: &Path) -> bool {
    match fs::read(dir.join(MARKER))
        .ok()
        .and_then(|b| serde_json::from_slice::<Marker>(&b).ok())
    {
        Some(m) => FILES.iter().all(|f| {
            m.files
                .get(*f)
                .is_some_and(|d| fs::metadata(dir.join(f)).is_ok_and(|md| md.len() == d.size))
        }),
        None => FILES.iter().all(|f| dir.join(f).is_file()) && !dir.join(LOCK).exists(),
    }
}

/// Makes sure the weights are present, downloading them once if needed; returns their directory.
pub async fn ensure(cfg: &WeightsConfig, aws: Option<&Aws>) -> Result<PathBuf, WeightsError> {
    let dir = cfg.dir();
    if is_complete(&dir) {
        return Ok(dir);
    }
    if let Some(explicit) = &cfg.weights_dir {
        let missing: Vec<_> = FILES
            .iter()
            .filter(|f| !explicit.join(f).is_file())
            .copied()
            .collect();
        return Err(WeightsError::Missing(format!(
            "CLIP_WEIGHTS_DIR {} lacks {}",
            explicit.display(),
            missing.join(", ")
        )));
    }
    fs::create_dir_all(&dir).map_err(|e| WeightsError::ReadOnly(dir.clone(), e))?;
    let lock_path = dir.join(LOCK);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| WeightsError::ReadOnly(lock_path.clone(), e))?;
    let lock = acquire(lock, &lock_path).await?;
    // Another process may have finished while we waited.
    if is_complete(&dir) {
        drop(lock);
        return Ok(dir);
    }
    let source = cfg.source();
    tracing::info!(model = cfg.spec.name, source = %source, dir = %dir.display(), "downloading model weights");
    let started = Instant::now();
    let sums = fetch_sums(&source, aws).await;
    let mut files = BTreeMap::new();
    for f in FILES {
        let digest = download(&source, f, &dir, sums.get(f).map(String::as_str), aws).await?;
        files.insert(f.to_string(), digest);
    }
    let marker = Marker {
        model: cfg.spec.name.to_string(),
        source: source.clone(),
        files,
    };
    let body = serde_json::to_vec_pretty(&marker).map_err(|e| WeightsError::Io(e.to_string()))?;
    write_atomically(&dir, MARKER, &body)?;
    tracing::info!(
        model = cfg.spec.name,
        seconds = started.elapsed().as_secs_f32(),
        "model weights ready"
    );
    drop(lock);
    Ok(dir)
}

/// Holds the exclusive lock until dropped.
struct LockGuard(File);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

async fn acquire(file: File, path: &Path) -> Result<LockGuard, WeightsError> {
    if file.try_lock().is_ok() {
        return Ok(LockGuard(file));
    }
    tracing::info!(lock = %path.display(), "another process is downloading the weights; waiting for it");
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        file.lock()
            .map_err(|e| WeightsError::Io(format!("locking {}: {e}", path.display())))?;
        Ok(LockGuard(file))
    })
    .await
    .map_err(|e| WeightsError::Io(e.to_string()))?
}

/// `SHA256SUMS` at the source (`<hex>  <file>` lines), if there is one.
async fn fetch_sums(source: &str, aws: Option<&Aws>) -> BTreeMap<String, String> {
    let Ok(bytes) = fetch_small(source, "SHA256SUMS", aws).await else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| {
            let (hash, name) = l.split_once(char::is_whitespace)?;
            Some((
                name.trim().trim_start_matches('*').to_string(),
                hash.trim().to_ascii_lowercase(),
            ))
        })
        .collect()
}

async fn fetch_small(source: &str, file: &str, aws: Option<&Aws>) -> Result<Vec<u8>, String> {
    if source.starts_with("s3://") {
        let loc = parse_s3_url(&format!("{source}{file}")).map_err(|e| e.to_string())?;
        let aws = aws.ok_or("an s3:// weights source needs AWS access")?;
        aws.get_object(&loc, 1 << 20)
            .await
            .map(|(b, _)| b)
            .map_err(|e| e.to_string())
    } else {
        let resp = http_client()?
            .get(format!("{source}{file}"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }
}

fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("clip-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// Downloads one file into `dir` under a temporary name, hashing as it goes; checks size and
/// checksum; syncs; renames into place.
async fn download(
    source: &str,
    file: &str,
    dir: &Path,
    expected: Option<&str>,
    aws: Option<&Aws>,
) -> Result<FileDigest, WeightsError> {
    let derr = |msg: String| WeightsError::Download {
        file: file.into(),
        source_url: source.into(),
        msg,
    };
    let verr = |msg: String| WeightsError::Verify {
        file: file.into(),
        source_url: source.into(),
        msg,
    };
    let tmp = dir.join(format!(".{file}.partial-{}", std::process::id()));
    let mut out = File::create(&tmp).map_err(|e| WeightsError::ReadOnly(tmp.clone(), e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut write_err = None;
    let mut sink = |chunk: &[u8]| {
        hasher.update(chunk);
        size += chunk.len() as u64;
        if write_err.is_none() {
            write_err = out.write_all(chunk).err();
        }
    };
    let (declared_len, linked_sha) = if source.starts_with("s3://") {
        let loc = parse_s3_url(&format!("{source}{file}")).map_err(|e| derr(e.to_string()))?;
        let aws = aws.ok_or_else(|| derr("an s3:// weights source needs AWS access".into()))?;
        aws.get_object_chunks(&loc, u64::MAX, |chunk| {
            sink(chunk);
            Ok(())
        })
        .await
        .map_err(|e| derr(e.to_string()))?;
        (None, None)
    } else {
        let mut resp = http_client()
            .map_err(derr)?
            .get(format!("{source}{file}"))
            .send()
            .await
            .map_err(|e| derr(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(derr(format!("HTTP {}", resp.status())));
        }
        let len = resp.content_length();
        // Hugging Face puts the SHA-256 of large (LFS) files in X-Linked-Etag.
        let linked = resp
            .headers()
            .get("x-linked-etag")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_ascii_lowercase())
            .filter(|v| v.len() == 64);
        while let Some(chunk) = resp.chunk().await.map_err(|e| derr(e.to_string()))? {
            sink(&chunk);
        }
        (len, linked)
    };
    if let Some(e) = write_err {
        let _ = fs::remove_file(&tmp);
        return Err(WeightsError::Io(format!("writing {}: {e}", tmp.display())));
    }
    let sha = hex::encode(hasher.finalize());
    let cleanup = |e: WeightsError| {
        let _ = fs::remove_file(&tmp);
        e
    };
    if let Some(len) = declared_len.filter(|&len| len != size) {
        return Err(cleanup(verr(format!("got {size} bytes, expected {len}"))));
    }
    if let Some(want) = expected
        .or(linked_sha.as_deref())
        .filter(|&want| want != sha)
    {
        return Err(cleanup(verr(format!("SHA-256 is {sha}, expected {want}"))));
    }
    out.sync_all()
        .map_err(|e| cleanup(WeightsError::Io(format!("syncing {}: {e}", tmp.display()))))?;
    drop(out);
    fs::rename(&tmp, dir.join(file))
        .map_err(|e| cleanup(WeightsError::Io(format!("renaming {}: {e}", tmp.display()))))?;
    Ok(FileDigest { size, sha256: sha })
}

fn write_atomically(dir: &Path, name: &str, body: &[u8]) -> Result<(), WeightsError> {
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let io =
        |e: std::io::Error| WeightsError::Io(format!("writing {}: {e}", dir.join(name).display()));
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(body).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, dir.join(name)).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        crate::model::DEFAULT_MODEL
    }

    #[test]
    fn locations_follow_the_contract() {
        let cfg = WeightsConfig {
            spec: spec(),
            cache_dir: "/cache".into(),
            weights_dir: None,
            source: None,
        };
        assert_eq!(cfg.dir(), PathBuf::from("/cache/ViT-B-32"));
        assert_eq!(
            cfg.source(),
            "https://huggingface.co/openai/clip-vit-base-patch32/resolve/main/"
        );
        let cfg = WeightsConfig {
            weights_dir: Some("/w".into()),
            source: Some("s3://b/models/B32".into()),
            ..cfg
        };
        assert_eq!(cfg.dir(), PathBuf::from("/w"));
        assert_eq!(cfg.source(), "s3://b/models/B32/");
    }

    #[test]
    fn completeness_needs_the_marker_sizes_to_match() {
        let dir = std::env::temp_dir().join(format!("clip-weights-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(!is_complete(&dir));
        for f in FILES {
            fs::write(dir.join(f), b"abc").unwrap();
        }
        assert!(
            is_complete(&dir),
            "user-provided directory without a marker"
        );
        let files = FILES
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    FileDigest {
                        size: 3,
                        sha256: "x".into(),
                    },
                )
            })
            .collect();
        let marker = Marker {
            model: "ViT-B/32".into(),
            source: "s".into(),
            files,
        };
        fs::write(dir.join(MARKER), serde_json::to_vec(&marker).unwrap()).unwrap();
        assert!(is_complete(&dir));
        fs::write(dir.join("model.safetensors"), b"torn").unwrap();
        assert!(!is_complete(&dir), "a size mismatch is not complete");
        fs::remove_dir_all(&dir).unwrap();
    }
}
