//! Every bad input gets a clear error naming the problem, nothing panics, and a decompression
//! bomb is refused in bounded memory. Kept in its own test binary so the peak-RSS measurement
//! of the child process is not mixed with other tests' children.

mod common;

use std::process::Command;

use clip_worker::preprocess::{DecodeMemory, Limits, Preprocessor};
use common::*;

#[test]
fn each_bad_input_has_its_documented_error() {
    for bad in manifest().bad {
        let bytes = std::fs::read(fixtures().join("bad").join(&bad.file)).unwrap();
        let result =
            std::panic::catch_unwind(|| Preprocessor::new(224).prepare(&bytes, Some(&bad.mime)));
        let err = match result {
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(_)) => panic!("{} was accepted", bad.file),
            Err(_) => panic!("{} panicked", bad.file),
        };
        assert!(
            err.contains(&bad.error_contains),
            "{}: {err:?} lacks {:?}",
            bad.file,
            bad.error_contains
        );
    }
}

#[test]
fn truncating_a_valid_image_anywhere_never_panics() {
    // Every prefix of every format's encoding is either decoded or refused with an error.
    for img in manifest()
        .images
        .iter()
        .filter(|e| !e.file.contains("original"))
    {
        let bytes = std::fs::read(fixtures().join("images").join(&img.file)).unwrap();
        let step = (bytes.len() / 23).max(1);
        for n in (0..bytes.len()).step_by(step) {
            let r = std::panic::catch_unwind(|| Preprocessor::new(224).prepare(&bytes[..n], None));
            assert!(r.is_ok(), "{} truncated at {n} bytes panicked", img.file);
        }
    }
}

#[test]
fn limits_are_configurable() {
    let bytes = std::fs::read(fixtures().join("bad/one-pixel.png")).unwrap();
    let tolerant = Limits {
        min_side: 1,
        ..Limits::default()
    };
    let img = Preprocessor {
        limits: tolerant,
        ..Preprocessor::new(224)
    }
    .prepare(&bytes, Some("image/png"))
    .expect("1x1 allowed with min_side 1");
    assert_eq!(img.rgb.len(), 224 * 224 * 3);
    assert!(
        img.rgb.chunks(3).all(|p| p == [200, 10, 10]),
        "a 1x1 image upscales to its colour"
    );
}

#[test]
fn decodes_share_one_memory_budget_and_give_it_back() {
    // A budget of one byte: every image is larger, so each decode runs alone. Four threads over
    // every fixture (all formats and modes) and a truncated copy of each must all finish with the
    // same results, and every permit must come back, also on errors; a permit that leaked would
    // block the next decode forever, which the watchdog turns into a failure.
    let images: Vec<(String, Vec<u8>)> = manifest()
        .images
        .into_iter()
        .map(|e| {
            let bytes = std::fs::read(fixtures().join("images").join(&e.file)).unwrap();
            (e.file, bytes)
        })
        .collect();
    let tight = Preprocessor {
        memory: DecodeMemory::new(1),
        ..Preprocessor::new(224)
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = {
        let (tight, images) = (tight.clone(), images.clone());
        std::thread::spawn(move || {
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for (file, bytes) in &images {
                            let ours = tight.prepare(bytes, None).unwrap().rgb;
                            let free = Preprocessor::new(224).prepare(bytes, None).unwrap().rgb;
                            assert!(ours == free, "{file}: the budget changed the pixels");
                            // Most halves are refused, a few formats decode them: either way
                            // the permit must come back.
                            let _ = tight.prepare(&bytes[..bytes.len() / 2], None);
                        }
                    });
                }
            });
            done_tx.send(()).unwrap();
        })
    };
    if done_rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .is_err()
    {
        panic!(
            "decodes did not finish: {} bytes still held",
            tight.memory.in_use()
        );
    }
    worker.join().unwrap();
    assert_eq!(tight.memory.in_use(), 0);
    assert_eq!(tight.memory.peak(), 1);
}

#[test]
fn the_bomb_is_refused_in_bounded_memory() {
    let f = fixtures();
    let out = Command::new(env!("CARGO_BIN_EXE_clip-worker"))
        .args(["embed", "--weights"])
        .arg(f.join("models/tiny"))
        .arg(f.join("bad/bomb-30000.png"))
        .arg(f.join("bad/bomb-header.jpg"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2);
    assert!(
        stdout.lines().all(|l| l.contains("pixel limit")),
        "{stdout}"
    );
    // Decoding the PNG would take 900 MB; refusing it from the header keeps the whole process
    // (libtorch and the model included) far below that.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    let peak_mb = usage.ru_maxrss / 1024;
    assert!(peak_mb < 600, "peak RSS {peak_mb} MB");
}
