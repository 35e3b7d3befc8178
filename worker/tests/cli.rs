//! The `clip-worker embed` contract: one JSON line per input, in input order; failures are lines
//! with `error` and a non-zero exit status, the rest still run; `--text` adds text lines.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn embed(args: &[&str]) -> (i32, Vec<Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clip-worker"))
        .arg("embed")
        .args(args)
        .env("LOG_FORMAT", "json")
        .output()
        .expect("run clip-worker");
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    (
        out.status.code().unwrap_or(-1),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lines_follow_input_order_and_failures_do_not_stop_the_rest() {
    let f = fixtures();
    let weights = f.join("models/tiny");
    let files = [
        f.join("images/chelsea-baseline.jpg"),
        f.join("bad/truncated.jpg"),
        f.join("images/coffee.gif"),
        f.join("does-not-exist.png"),
        f.join("images/astronaut.png"),
    ];
    let mut args = vec![
        "--weights",
        weights.to_str().unwrap(),
        "--labels",
        "--top-k",
        "3",
        "--batch-size",
        "2",
    ];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--text", "a photo of a cat", "--text", "un chat"]);
    let (code, lines, stderr) = embed(&args);
    assert_eq!(
        code, 1,
        "a failed input makes the exit status 1; stderr: {stderr}"
    );
    assert_eq!(lines.len(), files.len() + 2);
    for (line, file) in lines.iter().zip(&files) {
        assert_eq!(line["file"], file.to_str().unwrap());
    }
    for i in [0, 2, 4] {
        let l = &lines[i];
        assert_eq!(l["model"], "ViT-B/32");
        assert_eq!(l["dimensions"], 32);
        assert_eq!(l["embedding"].as_array().unwrap().len(), 32);
        assert_eq!(l["keywords"].as_array().unwrap().len(), 3);
        assert!(l.get("error").is_none());
    }
    assert!(
        lines[1]["error"]
            .as_str()
            .unwrap()
            .contains("truncated or corrupt JPEG"),
        "{}",
        lines[1]
    );
    assert!(
        lines[3]["error"].as_str().unwrap().contains("cannot read"),
        "{}",
        lines[3]
    );
    assert_eq!(lines[5]["text"], "a photo of a cat");
    assert_eq!(lines[6]["text"], "un chat");
    assert_eq!(lines[6]["embedding"].as_array().unwrap().len(), 32);
}

#[test]
fn all_good_inputs_exit_zero_and_match_the_reference() {
    let f = fixtures();
    let reference = reference("tiny");
    let weights = f.join("models/tiny");
    let file = f.join("images/hopper-original.jpg");
    let (code, lines, _) = embed(&[
        "--weights",
        weights.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 1);
    // Labels off: keywords is present and empty.
    assert_eq!(lines[0]["keywords"], Value::Array(vec![]));
    let ours: Vec<f32> = lines[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let theirs = to_vec(&reference["image/hopper-original.jpg"]);
    assert!(cosine(&ours, &theirs) >= 0.99999);
    // The raw feature, not L2-normalised (as the seed stores it).
    let norm: f32 = ours.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "embedding looks normalised (norm {norm})"
    );
}

#[test]
fn a_custom_label_file_is_used() {
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("clip-labels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, "zebra crossing\nteapot\n# comment\n").unwrap();
    let weights = f.join("models/tiny");
    let file = f.join("images/astronaut.png");
    let (code, lines, _) = embed(&[
        "--weights",
        weights.to_str().unwrap(),
        "--labels-file",
        labels.to_str().unwrap(),
        "--top-k",
        "5",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let mut kw: Vec<&str> = lines[0]["keywords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    kw.sort();
    assert_eq!(
        kw,
        vec!["teapot", "zebra crossing"],
        "top-k is capped by the vocabulary"
    );
    std::fs::write(&labels, "cat\nCat\n").unwrap();
    let (code, lines, stderr) = embed(&[
        "--weights",
        weights.to_str().unwrap(),
        "--labels-file",
        labels.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "a bad vocabulary stops the run before any output");
    assert!(lines.is_empty());
    assert!(stderr.contains("repeats line 1"), "{stderr}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_weights_are_one_clear_error() {
    let dir = std::env::temp_dir().join(format!("clip-noweights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = fixtures();
    let file = f.join("images/astronaut.png");
    let (code, lines, stderr) =
        embed(&["--weights", dir.to_str().unwrap(), file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(lines.is_empty());
    assert!(
        stderr.contains("lacks config.json, model.safetensors"),
        "{stderr}"
    );
    // A checkpoint whose shapes disagree with config.json names the tensor.
    std::fs::copy(
        f.join("models/tiny/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        f.join("models/vit-b-32/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let (code, _, stderr) = embed(&["--weights", dir.to_str().unwrap(), file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("has shape") && stderr.contains("config.json implies"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn nothing_to_do_is_an_error() {
    let (code, lines, stderr) = embed(&["--weights", "/nonexistent"]);
    assert_eq!(code, 2);
    assert!(lines.is_empty());
    assert!(stderr.contains("nothing to embed"), "{stderr}");
}

/// The variables a subcommand reads: clap prints `[env: NAME=...]` for every flag backed by one.
fn variables_read(command: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_clip-worker"))
        .args([command, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let mut read: Vec<String> = help
        .match_indices("[env: ")
        .map(|(i, _)| {
            let rest = &help[i + 6..];
            rest[..rest.find(['=', ']']).unwrap()].to_string()
        })
        .collect();
    read.sort();
    read.dedup();
    read
}

#[test]
fn serve_reads_every_variable_of_the_contract() {
    let mut want: Vec<&str> = clip_contract::env::ALL.to_vec();
    want.sort();
    assert_eq!(variables_read("serve"), want);
}

#[test]
fn query_reads_every_variable_of_its_contract() {
    let mut want: Vec<&str> = clip_contract::env::QUERY.to_vec();
    want.sort();
    assert_eq!(variables_read("query"), want);
}

#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() {
    // `kubectl logs`, `docker logs` and CI captures read stderr from a pipe, as here.
    let f = fixtures();
    let out = Command::new(env!("CARGO_BIN_EXE_clip-worker"))
        .args(["embed", "--weights"])
        .arg(f.join("models/tiny"))
        .arg(f.join("images/coffee.gif"))
        .env("LOG_FORMAT", "text")
        .output()
        .expect("run clip-worker");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("model loaded"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI escapes in {stderr:?}");
    assert!(stderr.contains("placement=cpu fp32"), "{stderr}");
}
