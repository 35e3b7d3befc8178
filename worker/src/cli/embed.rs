//! `clip-worker embed`: files in, one JSON line per input out, in input order.
//!
//! Exit status: 0 when every input was embedded, 1 when at least one failed (its line carries
//! `error`; the others still run), 2 when nothing could run (bad weights, bad flags).

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::sync_channel;

use anyhow::Context;
use clap::Args;
use rayon::prelude::*;
use serde_json::json;

use super::{ModelArgs, PreprocessArgs};
use crate::engine::{Engine, EngineConfig, LabelSource};
use crate::model::Placement;
use crate::preprocess::{ImageFormat, PreparedImage, Preprocessor};

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Add zero-shot keywords from the default label vocabulary.
    #[arg(long)]
    pub labels: bool,
    /// Label vocabulary file, one label per line (implies --labels).
    #[arg(long, env = clip_contract::env::LABELS_FILE, value_name = "PATH")]
    pub labels_file: Option<PathBuf>,
    /// Number of keywords per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Images per forward pass.
    #[arg(long, env = clip_contract::env::BATCH_SIZE, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch_size: u16,
    /// Threads that decode and preprocess (default: one per core).
    #[arg(long, env = clip_contract::env::DECODE_THREADS)]
    pub decode_threads: Option<usize>,
    /// A text query to embed too (repeatable); one line each, after the images.
    #[arg(long = "text", value_name = "STRING")]
    pub texts: Vec<String>,
    #[command(flatten)]
    pub preprocess: PreprocessArgs,
    /// Image files.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: EmbedArgs) -> anyhow::Result<ExitCode> {
    if args.files.is_empty() && args.texts.is_empty() {
        anyhow::bail!("nothing to embed: give image files and/or --text STRING");
    }
    let engine = load_engine(
        &args.model,
        labels_source(args.labels, args.labels_file.clone()),
        !args.texts.is_empty(),
    )?;
    let pool = super::decode_pool(args.decode_threads)?;
    let model_name = engine.spec().name;
    let dims = engine.dimensions();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut failed = 0usize;

    let pre = args.preprocess.preprocessor(engine.image_size());
    let batch_size = usize::from(args.batch_size);
    let files = args.files.clone();
    // Preparation of the next batch overlaps inference on this one.
    let (tx, rx) = sync_channel::<Vec<(PathBuf, Result<PreparedImage, String>)>>(1);
    let producer = std::thread::spawn(move || {
        pool.install(|| {
            for chunk in files.chunks(batch_size) {
                let prepared: Vec<_> = chunk
                    .par_iter()
                    .map(|f| (f.clone(), prepare_file(f, &pre)))
                    .collect();
                if tx.send(prepared).is_err() {
                    break;
                }
            }
        })
    });

    for batch in rx {
        let ok: Vec<&PreparedImage> = batch.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
        let (mut outputs, batch_error) = match engine.embed_images(&ok, args.top_k) {
            Ok(o) => (Some(o.embeddings.into_iter().zip(o.keywords)), None),
            Err(e) => {
                tracing::error!("batch failed: {e}");
                (None, Some(e.to_string()))
            }
        };
        for (file, prepared) in &batch {
            let line = match (prepared, outputs.as_mut()) {
                (Err(e), _) => {
                    failed += 1;
                    json!({"file": file, "error": e})
                }
                (Ok(_), Some(outs)) => match outs.next() {
                    Some((embedding, keywords)) => json!({
                        "file": file, "model": model_name, "dimensions": dims,
                        "embedding": embedding, "keywords": keywords,
                    }),
                    None => {
                        failed += 1;
                        json!({"file": file, "error": "internal error: missing output row"})
                    }
                },
                (Ok(_), None) => {
                    failed += 1;
                    json!({"file": file, "error": batch_error.as_deref().unwrap_or("inference failed")})
                }
            };
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("the preprocessing thread panicked"))?;

    if !args.texts.is_empty() {
        let features = engine.embed_texts(&args.texts)?;
        for (text, embedding) in args.texts.iter().zip(features) {
            let line = json!({"text": text, "model": model_name, "dimensions": dims, "embedding": embedding});
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    if failed > 0 {
        tracing::warn!(
            failed,
            total = args.files.len(),
            "some inputs could not be embedded"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `--labels` / `--labels-file` into a label source.
pub fn labels_source(labels: bool, file: Option<PathBuf>) -> LabelSource {
    match (labels, file) {
        (_, Some(f)) => LabelSource::File(f),
        (true, None) => LabelSource::Default,
        (false, None) => LabelSource::Off,
    }
}

/// Resolves placement, sets libtorch threads and loads the engine.
pub fn load_engine(
    m: &ModelArgs,
    labels: LabelSource,
    text_queries: bool,
) -> anyhow::Result<Engine> {
    if let Some(n) = m.torch_threads {
        tch::set_num_threads(n.max(1));
    }
    let placement = Placement::detect(m.device, m.precision)?;
    let cfg = EngineConfig {
        weights: m.weights.clone(),
        spec: m.model,
        placement,
        labels,
        text_queries,
    };
    Engine::load(&cfg)
        .with_context(|| format!("cannot load the model from {}", m.weights.display()))
}

/// Reads (at most the byte limit, plus one to detect excess) and prepares one file. The declared
/// type is the one its extension suggests; the bytes decide.
pub fn prepare_file(path: &Path, pre: &Preprocessor) -> Result<PreparedImage, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(pre.limits.max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let declared = path
        .extension()
        .and_then(|e| ImageFormat::from_extension(&e.to_string_lossy()))
        .map(|f| f.mime());
    let img = pre.prepare(&bytes, declared).map_err(|e| e.to_string())?;
    if let Some(m) = &img.mismatch {
        tracing::warn!(file = %path.display(), declared = %m.declared, actual = %m.actual, "declared type disagrees with the bytes; decoded as {}", m.actual);
    }
    Ok(img)
}
