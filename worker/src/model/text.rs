//! The CLIP text tower: token and position embeddings, causal encoder, final norm, the hidden
//! state at the end-of-text token, projection into the shared space.

use tch::Tensor;

use super::ModelError;
use super::checkpoint::TensorReader;
use super::config::TextConfig;
use super::layers::{Encoder, LayerNorm, Linear};

pub struct TextTower {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_norm: LayerNorm,
    projection: Linear,
}

impl TextTower {
    pub fn load(
        r: &TensorReader,
        cfg: &TextConfig,
        projection_dim: i64,
    ) -> Result<Self, ModelError> {
        let t = &cfg.tower;
        let h = t.hidden_size;
        Ok(TextTower {
            token_embedding: r.get(
                "text_model.embeddings.token_embedding.weight",
                &[cfg.vocab_size, h],
            )?,
            position_embedding: r.get(
                "text_model.embeddings.position_embedding.weight",
                &[cfg.max_position_embeddings, h],
            )?,
            encoder: Encoder::load(r, "text_model.encoder", t)?,
            final_norm: LayerNorm::load(r, "text_model.final_layer_norm", h, t.layer_norm_eps)?,
            projection: Linear::load(r, "text_projection", h, projection_dim, false)?,
        })
    }

    /// `ids`: `[batch, tokens]` (tokens <= max_position_embeddings), each row holding an
    /// end-of-text token at `eot[i]`. Because attention is causal, padding after the end-of-text
    /// token cannot change the result, so callers may pad to the longest row, not to 77.
    pub fn forward(&self, ids: &Tensor, eot: &Tensor) -> Tensor {
        let tokens = ids.size()[1];
        let x = Tensor::embedding(&self.token_embedding, ids, -1, false, false)
            + self.position_embedding.narrow(0, 0, tokens);
        let x = self.final_norm.forward(&self.encoder.forward(&x, true));
        let batch = Tensor::arange(ids.size()[0], (tch::Kind::Int64, x.device()));
        let pooled = x.index(&[Some(batch), Some(eot.to_device(x.device()))]);
        self.projection.forward(&pooled)
    }
}
