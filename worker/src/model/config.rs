//! `config.json` of a Hugging Face CLIP checkpoint, with transformers' defaults for fields the
//! file leaves out (older `openai/clip-vit-*` configs omit many).

use std::path::Path;

use serde::Deserialize;

use super::ModelError;

/// Activation of the MLP blocks. OpenAI's checkpoints use `quick_gelu`; using exact GELU there
/// would drift from the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// Tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            other => Err(format!(
                "unsupported hidden_act {other:?} (supported: quick_gelu, gelu, gelu_new)"
            )),
        }
    }
}

/// Shape of one transformer tower.
#[derive(Debug, Clone, PartialEq)]
pub struct TowerConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

/// Vision tower: a tower plus the patch geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub tower: TowerConfig,
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
}

impl VisionConfig {
    /// Number of patch tokens (without the class token).
    pub fn num_patches(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// Text tower: a tower plus the vocabulary and context length.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub tower: TowerConfig,
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
}

/// The whole model.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Width of the shared embedding space (the vector length).
    pub projection_dim: i64,
}

#[derive(Deserialize, Default)]
struct RawTower {
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    // vision
    image_size: Option<i64>,
    patch_size: Option<i64>,
    num_channels: Option<i64>,
    // text
    vocab_size: Option<i64>,
    max_position_embeddings: Option<i64>,
}

#[derive(Deserialize)]
struct RawConfig {
    projection_dim: Option<i64>,
    text_config: Option<RawTower>,
    vision_config: Option<RawTower>,
}

struct TowerDefaults {
    hidden: i64,
    intermediate: i64,
    layers: i64,
    heads: i64,
}

impl RawTower {
    fn tower(&self, d: TowerDefaults, which: &str) -> Result<TowerConfig, String> {
        let t = TowerConfig {
            hidden_size: self.hidden_size.unwrap_or(d.hidden),
            intermediate_size: self.intermediate_size.unwrap_or(d.intermediate),
            num_hidden_layers: self.num_hidden_layers.unwrap_or(d.layers),
            num_attention_heads: self.num_attention_heads.unwrap_or(d.heads),
            layer_norm_eps: self.layer_norm_eps.unwrap_or(1e-5),
            activation: Activation::parse(self.hidden_act.as_deref().unwrap_or("quick_gelu"))
                .map_err(|e| format!("{which}: {e}"))?,
        };
        for (field, v) in [
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
        ] {
            if !(1..=65536).contains(&v) {
                return Err(format!("{which}.{field} = {v} is out of range"));
            }
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(format!(
                "{which}.hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        Ok(t)
    }
}

impl ClipConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io(path.into(), e))?;
        Self::from_json(&text).map_err(|msg| ModelError::Config(path.into(), msg))
    }

    /// Parses a `config.json` document.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let v = raw.vision_config.unwrap_or_default();
        let t = raw.text_config.unwrap_or_default();
        let vision = VisionConfig {
            tower: v.tower(
                TowerDefaults {
                    hidden: 768,
                    intermediate: 3072,
                    layers: 12,
                    heads: 12,
                },
                "vision_config",
            )?,
            image_size: v.image_size.unwrap_or(224),
            patch_size: v.patch_size.unwrap_or(32),
            num_channels: v.num_channels.unwrap_or(3),
        };
        if vision.num_channels != 3 {
            return Err(format!(
                "vision_config.num_channels = {} (only RGB, 3, is supported)",
                vision.num_channels
            ));
        }
        if vision.patch_size < 1
            || vision.image_size < vision.patch_size
            || vision.image_size > 4096
        {
            return Err(format!(
                "vision_config: image_size {} and patch_size {} do not make a patch grid",
                vision.image_size, vision.patch_size
            ));
        }
        let text = TextConfig {
            tower: t.tower(
                TowerDefaults {
                    hidden: 512,
                    intermediate: 2048,
                    layers: 12,
                    heads: 8,
                },
                "text_config",
            )?,
            vocab_size: t.vocab_size.unwrap_or(49408),
            max_position_embeddings: t.max_position_embeddings.unwrap_or(77),
        };
        let projection_dim = raw.projection_dim.unwrap_or(512);
        if !(1..=65536).contains(&projection_dim) {
            return Err(format!("projection_dim = {projection_dim} is out of range"));
        }
        Ok(ClipConfig {
            vision,
            text,
            projection_dim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_vit_b_32() {
        let c = ClipConfig::from_json("{}").unwrap();
        assert_eq!(c.projection_dim, 512);
        assert_eq!(c.vision.patch_size, 32);
        assert_eq!(c.vision.num_patches(), 49);
        assert_eq!(c.vision.tower.hidden_size, 768);
        assert_eq!(c.text.tower.num_attention_heads, 8);
        assert_eq!(c.text.tower.activation, Activation::QuickGelu);
    }

    #[test]
    fn vit_l_14_shape() {
        let c = ClipConfig::from_json(
            r#"{"projection_dim":768,
                "vision_config":{"hidden_size":1024,"intermediate_size":4096,"num_hidden_layers":24,
                                 "num_attention_heads":16,"patch_size":14},
                "text_config":{"hidden_size":768,"intermediate_size":3072,"num_attention_heads":12}}"#,
        )
        .unwrap();
        assert_eq!(c.vision.num_patches(), 256);
        assert_eq!(c.projection_dim, 768);
    }

    #[test]
    fn rejects_bad_shapes_with_the_field_named() {
        let e = ClipConfig::from_json(
            r#"{"vision_config":{"hidden_size":100,"num_attention_heads":12}}"#,
        )
        .unwrap_err();
        assert!(e.contains("vision_config.hidden_size"), "{e}");
        let e = ClipConfig::from_json(r#"{"text_config":{"hidden_act":"relu"}}"#).unwrap_err();
        assert!(e.contains("text_config") && e.contains("relu"), "{e}");
        let e = ClipConfig::from_json(r#"{"vision_config":{"patch_size":0}}"#).unwrap_err();
        assert!(e.contains("patch"), "{e}");
        assert!(ClipConfig::from_json("not json").is_err());
    }
}
