//! The CLIP vision tower: patch embedding, class token, position embedding, pre-norm, encoder,
//! post-norm of the class token, projection into the shared space.

use tch::Tensor;

use super::ModelError;
use super::checkpoint::TensorReader;
use super::config::VisionConfig;
use super::layers::{Encoder, LayerNorm};

pub struct VisionTower {
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    encoder: Encoder,
    post_norm: LayerNorm,
    projection: Tensor,
    patch_size: i64,
}

impl VisionTower {
    pub fn load(
        r: &TensorReader,
        cfg: &VisionConfig,
        projection_dim: i64,
    ) -> Result<Self, ModelError> {
        let t = &cfg.tower;
        let (h, p, eps) = (t.hidden_size, cfg.patch_size, t.layer_norm_eps);
        Ok(VisionTower {
            patch_weight: r.get(
                "vision_model.embeddings.patch_embedding.weight",
                &[h, cfg.num_channels, p, p],
            )?,
            class_embedding: r.get("vision_model.embeddings.class_embedding", &[h])?,
            position_embedding: r.get(
                "vision_model.embeddings.position_embedding.weight",
                &[cfg.num_patches() + 1, h],
            )?,
            // "pre_layrnorm" is the name Hugging Face's CLIP checkpoints use.
            pre_norm: LayerNorm::load(r, "vision_model.pre_layrnorm", h, eps)?,
            encoder: Encoder::load(r, "vision_model.encoder", t)?,
            post_norm: LayerNorm::load(r, "vision_model.post_layernorm", h, eps)?,
            projection: r.get("visual_projection.weight", &[projection_dim, h])?,
            patch_size: p,
        })
    }

    /// `pixels`: `[batch, 3, image_size, image_size]`, normalised. Returns `[batch, projection_dim]`.
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let batch = pixels.size()[0];
        let patches = pixels
            .conv2d::<Tensor>(&self.patch_weight, None, [self.patch_size], [0], [1], 1)
            .flatten(2, -1)
            .transpose(1, 2);
        let width = self.class_embedding.size()[0];
        let class = self
            .class_embedding
            .view([1, 1, width])
            .expand([batch, 1, width], false);
        let x = Tensor::cat(&[class, patches], 1) + &self.position_embedding;
        let x = self.encoder.forward(&self.pre_norm.forward(&x), false);
        let pooled = self.post_norm.forward(&x.select(1, 0));
        pooled.matmul(&self.projection.tr())
    }
}
