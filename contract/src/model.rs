//! The CLIP models the worker serves: the one table every other part (CLI, env parsing, weights
//! cache, the operator's CRD) reads its names from.

use std::fmt;
use std::str::FromStr;

/// One supported CLIP model, as the seed names it (`CLIP_MODEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelSpec {
    /// The name users write and events carry, e.g. `ViT-B/32`.
    pub name: &'static str,
    /// Directory name under the model cache (`$CACHE_DIR/<slug>/`), e.g. `ViT-B-32`.
    pub slug: &'static str,
    /// The Hugging Face repository with the weights in the layout the worker reads.
    pub hf_repo: &'static str,
    /// Vision tower patch size, used to tell a mislabelled weights directory.
    pub patch_size: i64,
    /// Vision tower width.
    pub vision_width: i64,
    /// Length of the embedding vector.
    pub dimensions: i64,
}

/// Every model the worker supports, default first.
pub const MODELS: [ModelSpec; 3] = [
    ModelSpec {
        name: "ViT-B/32",
        slug: "ViT-B-32",
        hf_repo: "openai/clip-vit-base-patch32",
        patch_size: 32,
        vision_width: 768,
        dimensions: 512,
    },
    ModelSpec {
        name: "ViT-B/16",
        slug: "ViT-B-16",
        hf_repo: "openai/clip-vit-base-patch16",
        patch_size: 16,
        vision_width: 768,
        dimensions: 512,
    },
    ModelSpec {
        name: "ViT-L/14",
        slug: "ViT-L-14",
        hf_repo: "openai/clip-vit-large-patch14",
        patch_size: 14,
        vision_width: 1024,
        dimensions: 768,
    },
];

/// The default model (`ViT-B/32`), as in the seed.
pub const DEFAULT_MODEL: ModelSpec = MODELS[0];

impl ModelSpec {
    /// Looks a model up by its name (`ViT-B/32`) or its slug (`ViT-B-32`), case-insensitively.
    pub fn lookup(name: &str) -> Option<ModelSpec> {
        let name = name.trim();
        MODELS
            .into_iter()
            .find(|m| m.name.eq_ignore_ascii_case(name) || m.slug.eq_ignore_ascii_case(name))
    }

    /// The names accepted, for error messages.
    pub fn names() -> String {
        MODELS.map(|m| m.name).join(", ")
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl FromStr for ModelSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelSpec::lookup(s).ok_or_else(|| {
            format!(
                "unknown CLIP model {s:?}; expected one of {}",
                ModelSpec::names()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_accepts_names_and_slugs() {
        assert_eq!(ModelSpec::lookup("ViT-B/32"), Some(MODELS[0]));
        assert_eq!(ModelSpec::lookup("vit-l-14"), Some(MODELS[2]));
        assert_eq!(ModelSpec::lookup(" ViT-B/16 "), Some(MODELS[1]));
        assert_eq!(ModelSpec::lookup("ViT-H/14"), None);
        let err = "RN50".parse::<ModelSpec>().unwrap_err();
        assert!(err.contains("ViT-B/32, ViT-B/16, ViT-L/14"), "{err}");
    }

    #[test]
    fn slugs_are_the_seed_cache_names() {
        // The seed caches `/cache/ViT-B-32.pt` etc.: our directories reuse those names.
        for m in MODELS {
            assert_eq!(m.slug, m.name.replace('/', "-"));
        }
    }
}
