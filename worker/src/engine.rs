//! The embedding engine: a loaded model, its tokenizer and the label index, behind two calls
//! (embed a batch of prepared images, embed texts). Preprocessing is not here: it runs on a CPU
//! pool, apart from the thread that owns the model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::Tensor;

use crate::labels::{self, LabelIndex};
use crate::model::{ClipModel, Gemm, ModelError, ModelSpec, Placement, Towers};
use crate::preprocess::PreparedImage;
use crate::tokenizer::ClipTokenizer;

/// Which label vocabulary to load, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelSource {
    /// No keywords.
    Off,
    /// The vocabulary shipped in the binary.
    Default,
    /// A user-supplied file, one label per line.
    File(PathBuf),
}

/// How to build an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A directory in the Hugging Face layout.
    pub weights: PathBuf,
    /// The model the weights are (echoed in outputs).
    pub spec: ModelSpec,
    pub placement: Placement,
    pub labels: LabelSource,
    /// Whether text queries will be embedded (loads the text tower even without labels).
    pub text_queries: bool,
}

/// Why the engine could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("{0}")]
    Labels(String),
    #[error("{0}")]
    Weights(String),
    #[error("{0}")]
    Text(String),
}

/// Features of one batch: raw embeddings (row per image) and, with labels on, keywords.
pub struct BatchOutput {
    pub embeddings: Vec<Vec<f32>>,
    pub keywords: Vec<Vec<String>>,
}

/// A ready-to-serve model.
pub struct Engine {
    model: ClipModel,
    tokenizer: Option<ClipTokenizer>,
    labels: Option<LabelIndex>,
    spec: ModelSpec,
}

/// Texts per forward pass when embedding the label vocabulary at start-up.
const LABEL_BATCH: usize = 128;

impl Engine {
    /// Loads the model, and with labels or text queries the tokenizer and text tower; embeds the
    /// label prompts once.
    pub fn load(cfg: &EngineConfig) -> Result<Self, EngineError> {
        let vocabulary = match &cfg.labels {
            LabelSource::Off => None,
            LabelSource::Default => Some(
                labels::parse_vocabulary(labels::DEFAULT_VOCABULARY)
                    .map_err(EngineError::Labels)?,
            ),
            LabelSource::File(p) => Some(labels::read_vocabulary(p).map_err(EngineError::Labels)?),
        };
        let need_text = vocabulary.is_some() || cfg.text_queries;
        Self::check_weights_dir(&cfg.weights, need_text).map_err(EngineError::Weights)?;
        let started = Instant::now();
        let towers = if need_text {
            Towers::Both
        } else {
            Towers::VisionOnly
        };
        let model = ClipModel::load(&cfg.weights, cfg.placement, towers)?;
        if !model.matches(&cfg.spec) {
            tracing::warn!(
                weights = %cfg.weights.display(),
                model = cfg.spec.name,
                "config.json does not describe {} (patch {}, width {}, {} dimensions); the vectors will be labelled {} anyway",
                cfg.spec.name, cfg.spec.patch_size, cfg.spec.vision_width, cfg.spec.dimensions, cfg.spec.name
            );
        }
        tracing::info!(
            weights = %cfg.weights.display(),
            placement = %cfg.placement.describe(),
            text_products = model.text_gemm.map_or("-", Gemm::name),
            cpu = %crate::model::cpu_description(),
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        let tokenizer = if need_text {
            Some(ClipTokenizer::from_dir(
                &cfg.weights,
                model.config.text.max_position_embeddings as usize,
            )?)
        } else {
            None
        };
        let mut engine = Engine {
            model,
            tokenizer,
            labels: None,
            spec: cfg.spec,
        };
        if let Some(vocab) = vocabulary {
            let started = Instant::now();
            let prompts: Vec<String> = vocab.iter().map(|l| labels::prompt(l)).collect();
            let mut parts = Vec::new();
            for chunk in prompts.chunks(LABEL_BATCH) {
                parts.push(engine.text_features(chunk)?);
            }
            engine.labels = Some(LabelIndex::new(vocab, &Tensor::cat(&parts, 0)));
            tracing::info!(
                labels = engine.labels.as_ref().map_or(0, LabelIndex::len),
                seconds = started.elapsed().as_secs_f32(),
                "label prompts embedded"
            );
        }
        Ok(engine)
    }

    /// The model these vectors come from.
    pub fn spec(&self) -> ModelSpec {
        self.spec
    }

    /// Vector length.
    pub fn dimensions(&self) -> usize {
        self.model.dimensions()
    }

    /// Input side length images must be prepared at.
    pub fn image_size(&self) -> u32 {
        self.model.image_size() as u32
    }

    /// Tokens the text tower reads (77 for CLIP); longer texts are truncated.
    pub fn text_context(&self) -> usize {
        self.model.config.text.max_position_embeddings as usize
    }

    /// Where the model runs.
    pub fn placement(&self) -> Placement {
        self.model.placement
    }

    /// Whether keywords are produced.
    pub fn has_labels(&self) -> bool {
        self.labels.is_some()
    }

    /// Embeds a batch of prepared images in one forward pass; with labels on, adds the top `k`
    /// keywords of each image.
    pub fn embed_images(
        &self,
        images: &[&PreparedImage],
        k: usize,
    ) -> Result<BatchOutput, EngineError> {
        if images.is_empty() {
            return Ok(BatchOutput {
                embeddings: Vec::new(),
                keywords: Vec::new(),
            });
        }
        let size = self.image_size();
        let plane = (3 * size * size) as usize;
        let mut pixels = vec![0f32; plane * images.len()];
        for (img, out) in images.iter().zip(pixels.chunks_exact_mut(plane)) {
            if img.size != size {
                return Err(EngineError::Model(ModelError::Forward(format!(
                    "image prepared at {} px, the model takes {size} px",
                    img.size
                ))));
            }
            img.write_normalized(out);
        }
        let s = i64::from(size);
        let batch = Tensor::from_slice(&pixels).view([images.len() as i64, 3, s, s]);
        let features = self.model.encode_images(&batch)?;
        let keywords = match &self.labels {
            Some(index) => index.top_k(&features, k),
            None => vec![Vec::new(); images.len()],
        };
        Ok(BatchOutput {
            embeddings: rows(&features)?,
            keywords,
        })
    }

    /// Text features of `texts` (raw, not normalised), one row each.
    pub fn embed_texts(&self, texts: &[impl AsRef<str>]) -> Result<Vec<Vec<f32>>, EngineError> {
        rows(&self.text_features(texts)?)
    }

    fn text_features(&self, texts: &[impl AsRef<str>]) -> Result<Tensor, EngineError> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| EngineError::Text("the text tower was not loaded".into()))?;
        let batch = tok.batch(texts).map_err(EngineError::Text)?;
        Ok(self.model.encode_text(&batch.ids, &batch.eot)?)
    }

    /// The tokenizer (loaded with labels or text queries).
    pub fn tokenizer(&self) -> Option<&ClipTokenizer> {
        self.tokenizer.as_ref()
    }

    /// Checks that `dir` holds the files a load needs, naming the missing ones.
    pub fn check_weights_dir(dir: &Path, need_text: bool) -> Result<(), String> {
        let needed: &[&str] = if need_text {
            &[
                "config.json",
                "model.safetensors",
                "vocab.json",
                "merges.txt",
            ]
        } else {
            &["config.json", "model.safetensors"]
        };
        let missing: Vec<&str> = needed
            .iter()
            .copied()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "weights directory {} lacks {}",
                dir.display(),
                missing.join(", ")
            ))
        }
    }
}

/// `[n, d]` fp32 tensor into rows.
fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>, EngineError> {
    let d = t.size().get(1).copied().unwrap_or(0).max(1) as usize;
    let flat: Vec<f32> = t
        .flatten(0, -1)
        .try_into()
        .map_err(|e| EngineError::Model(ModelError::Forward(format!("reading features: {e}"))))?;
    Ok(flat.chunks(d).map(<[f32]>::to_vec).collect())
}
