//! A mutation fuzzer over the fixture photos in all seven formats (JPEG, PNG, GIF, WebP, BMP,
//! TIFF, PCX), run through `clip-worker embed` as a user runs it: bit flips, truncations,
//! inserted, deleted and repeated runs, header fields set to extremes, and chunk, segment and
//! dimension fields blown up. Every input must get exactly one line (an embedding or an error
//! that says what is wrong), the process must never die by a signal or a panic, and its peak
//! memory must stay within the decode budget above what the same run takes on the unmutated
//! photos.
//!
//! `make test` runs a short, fixed-seed pass (`FUZZ_INPUTS`, default 300). `make fuzz` runs a long
//! one with a random seed (`FUZZ_SEED=random`); inputs that break a rule are copied to
//! `FUZZ_KEEP` (default `target/fuzz/failures`) and named in the failure, to become regression
//! fixtures. A summary line (`FUZZ:`) and `target/bench/fuzz.json` give the figures for
//! BENCHMARKS.md. Kept in its own test binary so the children's peak RSS is this test's alone.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use serde_json::Value;

/// splitmix64: small, seedable, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values a length or dimension field is set to.
const EXTREMES: [u32; 6] = [0, 1, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF];

/// Offsets of the length or size fields a decoder trusts, by format: PNG chunk lengths (and
/// IHDR's width and height), JPEG segment lengths (and SOF's height and width), GIF's screen and
/// frame sizes, BMP's header sizes and dimensions, TIFF's IFD offset and entry counts, WebP's
/// RIFF and chunk sizes, PCX's window.
fn length_fields(ext: &str, b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    match ext {
        "png" => {
            let mut at = 8;
            while at + 8 <= b.len() {
                out.push((at, 4));
                if &b[at + 4..at + 8] == b"IHDR" {
                    out.extend([(at + 8, 4), (at + 12, 4)]);
                }
                let len = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
                at = at.saturating_add(12).saturating_add(len);
            }
        }
        "jpg" => {
            let mut at = 2;
            while at + 4 <= b.len() && b[at] == 0xFF {
                let marker = b[at + 1];
                out.push((at + 2, 2));
                if (0xC0..=0xC3).contains(&marker) {
                    out.extend([(at + 5, 2), (at + 7, 2)]);
                }
                if marker == 0xDA {
                    break;
                }
                let len = u16::from_be_bytes([b[at + 2], b[at + 3]]) as usize;
                at += 2 + len;
            }
        }
        "gif" => out.extend([(6, 2), (8, 2)]),
        "bmp" => out.extend([(2, 4), (10, 4), (14, 4), (18, 4), (22, 4), (28, 2), (34, 4)]),
        "tiff" => out.extend([(4, 4), (8, 2)]),
        "webp" => out.extend([(4, 4), (16, 4), (26, 2), (28, 2)]),
        "pcx" => out.extend([(4, 2), (6, 2), (8, 2), (10, 2), (66, 2)]),
        _ => {}
    }
    out.retain(|&(at, n)| at + n <= b.len());
    out
}

fn set_field(b: &mut [u8], at: usize, n: usize, v: u32, big_endian: bool) {
    let bytes = if big_endian {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    };
    let src = if big_endian {
        &bytes[4 - n..]
    } else {
        &bytes[..n]
    };
    b[at..at + n].copy_from_slice(src);
}

/// One mutation of `src`; returns the bytes and the mutation's name.
fn mutate(rng: &mut Rng, ext: &str, src: &[u8]) -> (Vec<u8>, &'static str) {
    let mut b = src.to_vec();
    let len = b.len().max(1);
    let kind = match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(16) {
                let i = rng.below(len);
                if let Some(x) = b.get_mut(i) {
                    *x ^= 1 << rng.below(8);
                }
            }
            "bit-flips"
        }
        1 => {
            b.truncate(rng.below(len));
            "truncated"
        }
        2 => {
            let at = rng.below(len);
            let run: Vec<u8> = (0..1 + rng.below(256)).map(|_| rng.next() as u8).collect();
            b.splice(at..at, run);
            "inserted-run"
        }
        3 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(4096)).min(b.len());
            b.drain(at..end);
            "deleted-run"
        }
        4 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(512)).min(b.len());
            let copy = b[at..end].to_vec();
            for _ in 0..1 + rng.below(8) {
                b.splice(at..at, copy.iter().copied());
            }
            "repeated-run"
        }
        5 => {
            // A field in the header region set to an extreme, either byte order.
            let head = b.len().min(128);
            if head >= 4 {
                let at = rng.below(head - 3);
                let v = EXTREMES[rng.below(EXTREMES.len())];
                set_field(&mut b, at, 2 + 2 * rng.below(2), v, rng.below(2) == 0);
            }
            "header-extreme"
        }
        _ => {
            let fields = length_fields(ext, &b);
            if fields.is_empty() {
                b.truncate(len / 2);
            } else {
                let (at, n) = fields[rng.below(fields.len())];
                let v = EXTREMES[rng.below(EXTREMES.len())];
                set_field(&mut b, at, n, v, matches!(ext, "png" | "jpg"));
            }
            "length-blown-up"
        }
    };
    (b, kind)
}

/// Runs `clip-worker embed` on `files`; checks the one-line-per-input contract. Returns the
/// lines, or what broke.
fn embed(files: &[PathBuf], budget: u64) -> Result<Vec<Value>, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_clip-worker"))
        .args(["embed", "--decode-threads", "2", "--weights"])
        .arg(fixtures().join("models/tiny"))
        .env("DECODE_MEMORY", budget.to_string())
        .args(files)
        .output()
        .map_err(|e| format!("cannot run clip-worker: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0 | 1) => {}
        _ => return Err(format!("exit {}: {stderr}", out.status)),
    }
    if stderr.contains("panicked") {
        return Err(format!("a panic: {stderr}"));
    }
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("not JSON ({e}): {l}")))
        .collect::<Result<_, _>>()?;
    if lines.len() != files.len() {
        return Err(format!(
            "{} lines for {} inputs: {stderr}",
            lines.len(),
            files.len()
        ));
    }
    for (line, file) in lines.iter().zip(files) {
        if line["file"].as_str() != Some(file.to_str().unwrap()) {
            return Err(format!("line out of order: {line} for {}", file.display()));
        }
        let ok = line["embedding"].as_array().is_some_and(|v| !v.is_empty());
        let err = line["error"].as_str().is_some_and(|e| e.len() > 8);
        if ok == err {
            return Err(format!("neither an embedding nor a clear error: {line}"));
        }
    }
    Ok(lines)
}

fn peak_children_rss_mib() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    usage.ru_maxrss as u64 / 1024
}

/// The kind of an error: its text up to the first detail (numbers and names vary).
fn error_kind(e: &str) -> String {
    let head = e.split([':', '(', ',']).next().unwrap_or(e);
    head.split_whitespace()
        .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
        .take(8)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn mutated_photos_get_a_line_each_and_never_crash_the_worker() {
    let inputs: usize = std::env::var("FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed = match std::env::var("FUZZ_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        Ok(s) => s.parse().expect("FUZZ_SEED is a number or `random`"),
        Err(_) => 20261205,
    };
    let keep = std::env::var_os("FUZZ_KEEP")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz/failures")
        });
    let budget: u64 = 64 << 20;
    let photos: Vec<(String, Vec<u8>)> = {
        let dir = fixtures().join("images");
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.to_string_lossy().contains("original"))
            .map(|p| {
                let ext = p.extension().unwrap().to_string_lossy().to_string();
                (ext, std::fs::read(&p).unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let formats: std::collections::BTreeSet<&str> =
        photos.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        formats.into_iter().collect::<Vec<_>>(),
        ["bmp", "gif", "jpg", "pcx", "png", "tiff", "webp"],
        "photos in all seven formats"
    );

    let work = std::env::temp_dir().join(format!("clip-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    // The unmutated photos first: the memory baseline.
    let originals: Vec<PathBuf> = photos
        .iter()
        .enumerate()
        .map(|(i, (ext, bytes))| {
            let p = work.join(format!("original-{i:02}.{ext}"));
            std::fs::write(&p, bytes).unwrap();
            p
        })
        .collect();
    let lines = embed(&originals, budget).unwrap();
    assert!(lines.iter().all(|l| l["embedding"].is_array()));
    let baseline = peak_children_rss_mib();

    let mut rng = Rng(seed);
    let mut by_mutation: BTreeMap<&str, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let (mut embedded, mut failures) = (0usize, Vec::new());
    let mut done = 0;
    while done < inputs {
        let n = (inputs - done).min(100);
        let mut files = Vec::with_capacity(n);
        for i in done..done + n {
            let (ext, src) = &photos[rng.below(photos.len())];
            let (bytes, kind) = mutate(&mut rng, ext, src);
            *by_mutation.entry(kind).or_default() += 1;
            let p = work.join(format!("{i:05}-{kind}.{ext}"));
            std::fs::write(&p, bytes).unwrap();
            files.push(p);
        }
        match embed(&files, budget) {
            Ok(lines) => {
                for l in lines {
                    match l["error"].as_str() {
                        Some(e) => *errors.entry(error_kind(e)).or_default() += 1,
                        None => embedded += 1,
                    }
                }
            }
            Err(batch) => {
                // Find the inputs that break a rule on their own, and keep them.
                std::fs::create_dir_all(&keep).unwrap();
                for f in &files {
                    if let Err(why) = embed(std::slice::from_ref(f), budget) {
                        let kept = keep.join(format!(
                            "seed{seed}-{}",
                            f.file_name().unwrap().to_string_lossy()
                        ));
                        std::fs::copy(f, &kept).unwrap();
                        failures.push(format!("{}: {why}", kept.display()));
                    }
                }
                if failures.is_empty() {
                    failures.push(format!("inputs {done}..{}: {batch}", done + n));
                }
            }
        }
        done += n;
    }
    let peak = peak_children_rss_mib();
    let summary = serde_json::json!({
        "seed": seed, "inputs": inputs, "embedded": embedded,
        "errors": errors.values().sum::<usize>(), "errors_by_kind": errors,
        "mutations": by_mutation, "crashes": failures.len(),
        "peak_rss_mib": peak, "baseline_rss_mib": baseline, "decode_budget_mib": budget >> 20,
    });
    println!("FUZZ: {summary}");
    std::fs::create_dir_all(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")).ok();
    std::fs::write(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/fuzz.json"),
        serde_json::to_string_pretty(&summary).unwrap(),
    )
    .ok();
    let _ = std::fs::remove_dir_all(&work);
    assert!(
        failures.is_empty(),
        "seed {seed}: {} inputs broke the contract:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every mutation kind ran, and both outcomes occur (a fuzzer that only produced errors, or
    // only valid images, would prove little).
    assert_eq!(by_mutation.len(), 7, "{by_mutation:?}");
    assert!(
        embedded > 0 && embedded < inputs,
        "{embedded} of {inputs} embedded"
    );
    assert!(
        peak <= baseline + (budget >> 20) + 64,
        "peak RSS {peak} MiB, over the photos' {baseline} MiB plus the {} MiB decode budget",
        budget >> 20
    );
}
