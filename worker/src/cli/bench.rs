//! `clip-worker bench`: throughput figures for `make bench`, which runs the Python reference on
//! the same files in the same run and prints the ratio. Files are read into memory first, as
//! the reference does, so disk speed is not measured; model loading is not timed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use serde_json::json;

use super::embed::{decode_pool, load_engine};
use super::{LimitArgs, ModelArgs};
use crate::engine::LabelSource;
use crate::preprocess::{self, PreparedImage};

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Decode + resize + crop on one thread (images/s per core).
    Preprocess,
    /// Bytes in memory to embeddings: parallel preprocessing overlapped with batched inference.
    Embed,
}

#[derive(Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub mode: BenchMode,
    /// Passes over the file list.
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Model (embed mode only).
    #[command(flatten)]
    pub model: Option<ModelArgs>,
    /// Images per forward pass (embed mode).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Decode threads (embed mode; default one per core).
    #[arg(long)]
    pub decode_threads: Option<usize>,
    /// Input side (preprocess mode; embed mode uses the model's).
    #[arg(long, default_value_t = 224)]
    pub size: u32,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Image files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let inputs: Vec<Vec<u8>> = args
        .files
        .iter()
        .map(|f| std::fs::read(f).with_context(|| format!("cannot read {}", f.display())))
        .collect::<Result<_, _>>()?;
    let limits = args.limits.limits();
    let passes = args.passes.max(1);
    let (images, seconds) = match args.mode {
        BenchMode::Preprocess => {
            // Warm-up pass (page cache, allocator), then timed passes on this one thread.
            for b in &inputs {
                preprocess::prepare(b, None, args.size, &limits)?;
            }
            let t = Instant::now();
            for _ in 0..passes {
                for b in &inputs {
                    std::hint::black_box(preprocess::prepare(b, None, args.size, &limits)?);
                }
            }
            (inputs.len() * passes, t.elapsed().as_secs_f64())
        }
        BenchMode::Embed => {
            let m = args.model.as_ref().context("embed mode needs --weights")?;
            let engine = load_engine(m, LabelSource::Off, false)?;
            let size = engine.image_size();
            let pool = decode_pool(args.decode_threads)?;
            let batch = args.batch_size.max(1);
            // One warm-up batch so lazy libtorch initialisation is not timed.
            let warm: Vec<PreparedImage> = inputs
                .iter()
                .take(batch)
                .map(|b| preprocess::prepare(b, None, size, &limits))
                .collect::<Result<_, _>>()?;
            engine.embed_images(&warm.iter().collect::<Vec<_>>(), 5)?;

            let t = Instant::now();
            let work: Vec<&[u8]> = (0..passes)
                .flat_map(|_| inputs.iter().map(Vec::as_slice))
                .collect();
            let (tx, rx) = sync_channel::<Vec<PreparedImage>>(1);
            std::thread::scope(|s| -> anyhow::Result<()> {
                s.spawn(|| {
                    pool.install(|| {
                        for chunk in work.chunks(batch) {
                            let prepared: Vec<PreparedImage> = chunk
                                .par_iter()
                                .filter_map(|b| preprocess::prepare(b, None, size, &limits).ok())
                                .collect();
                            if tx.send(prepared).is_err() {
                                break;
                            }
                        }
                        drop(tx);
                    })
                });
                for prepared in rx {
                    std::hint::black_box(
                        engine.embed_images(&prepared.iter().collect::<Vec<_>>(), 5)?,
                    );
                }
                Ok(())
            })?;
            (work.len(), t.elapsed().as_secs_f64())
        }
    };
    let line = json!({
        "mode": match args.mode { BenchMode::Preprocess => "preprocess", BenchMode::Embed => "embed" },
        "images": images,
        "seconds": seconds,
        "images_per_second": images as f64 / seconds,
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}
