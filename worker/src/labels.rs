//! Zero-shot keywords (the seed's `withLabelExtraction`): every label becomes the prompt
//! `a photo of a <label>`, the prompts are embedded once at start-up, and an image's keywords are
//! the top-K labels by cosine similarity to its embedding.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor};

/// The vocabulary shipped in the binary: common object categories, no duplicates.
pub const DEFAULT_VOCABULARY: &str = include_str!("../labels/default.txt");

/// The prompt template, as in the seed.
pub fn prompt(label: &str) -> String {
    format!("a photo of a {label}")
}

/// Parses a vocabulary: one label per line; blank lines and `#` comments are skipped; whitespace
/// is collapsed. A label that appears twice (ignoring case) is an error naming both lines, so
/// keywords can never repeat.
pub fn parse_vocabulary(text: &str) -> Result<Vec<String>, String> {
    let mut labels = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let label = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Some(first) = seen.insert(label.to_lowercase(), n + 1) {
            return Err(format!(
                "label {label:?} on line {} repeats line {first}",
                n + 1
            ));
        }
        labels.push(label);
    }
    if labels.is_empty() {
        return Err("the label vocabulary is empty".into());
    }
    Ok(labels)
}

/// Reads a vocabulary file (`--labels-file`).
pub fn read_vocabulary(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read labels file {}: {e}", path.display()))?;
    parse_vocabulary(&text).map_err(|e| format!("labels file {}: {e}", path.display()))
}

/// The label vocabulary with its L2-normalised prompt embeddings.
pub struct LabelIndex {
    labels: Vec<String>,
    /// `[labels, dimensions]`, unit rows.
    embeddings: Tensor,
}

impl LabelIndex {
    /// `embeddings`: the text features of `prompt(label)` for each label, in order.
    pub fn new(labels: Vec<String>, embeddings: &Tensor) -> Self {
        LabelIndex {
            labels,
            embeddings: l2_normalize(embeddings),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The `k` best labels for each row of `image_features` (`[batch, dimensions]`), best first.
    pub fn top_k(&self, image_features: &Tensor, k: usize) -> Vec<Vec<String>> {
        let k = k.min(self.labels.len());
        let batch = image_features.size()[0] as usize;
        if k == 0 {
            return vec![Vec::new(); batch];
        }
        let sims = l2_normalize(image_features).matmul(&self.embeddings.tr());
        let (_, idx) = sims.topk(k as i64, 1, true, true);
        let idx: Vec<i64> = idx.flatten(0, -1).try_into().unwrap_or_default();
        idx.chunks(k)
            .map(|row| {
                row.iter()
                    .map(|&i| self.labels[i as usize].clone())
                    .collect()
            })
            .collect()
    }
}

/// Rows scaled to unit length (cosine similarity is then a dot product).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let norm = x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    x / norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_vocabulary_is_clean() {
        let labels = parse_vocabulary(DEFAULT_VOCABULARY).expect("the shipped vocabulary parses");
        assert!(labels.len() >= 400, "{} labels", labels.len());
        for l in &labels {
            assert_eq!(l, &l.to_lowercase(), "labels are lower case: {l}");
            assert!(
                l.chars()
                    .all(|c| c.is_ascii_lowercase() || c == ' ' || c == '-'),
                "odd characters in {l:?}"
            );
        }
        // The seed's list lost two separators, gluing neighbours into "rocketcomputer": a label
        // made of two other labels must be a real compound, listed here on purpose.
        const COMPOUNDS: [&str; 6] = [
            "fire truck",
            "cupcake",
            "teapot",
            "computer mouse",
            "basketball",
            "baseball bat",
        ];
        for l in &labels {
            for (i, _) in l.char_indices().skip(1) {
                let (a, b) = l.split_at(i);
                let glued =
                    labels.contains(&a.to_string()) && labels.contains(&b.trim_start().to_string());
                assert!(
                    !glued || COMPOUNDS.contains(&l.as_str()),
                    "{l:?} looks like {a:?} + {b:?} merged"
                );
            }
        }
    }

    #[test]
    fn duplicates_and_empty_files_are_rejected() {
        let e = parse_vocabulary("cat\ndog\n# c\n  Cat  \n").unwrap_err();
        assert_eq!(e, "label \"Cat\" on line 4 repeats line 1");
        assert!(parse_vocabulary("# nothing\n\n").is_err());
        assert_eq!(
            parse_vocabulary("traffic   light\n").unwrap(),
            vec!["traffic light"]
        );
    }

    #[test]
    fn top_k_ranks_by_cosine_not_magnitude() {
        let labels = vec!["x".to_string(), "y".to_string(), "xy".to_string()];
        let emb = Tensor::from_slice(&[1f32, 0., 0., 10., 1., 1.]).view([3, 2]);
        let index = LabelIndex::new(labels, &emb);
        let img = Tensor::from_slice(&[100f32, 1., 0., 0.001]).view([2, 2]);
        let top = index.top_k(&img, 2);
        assert_eq!(top, vec![vec!["x", "xy"], vec!["y", "xy"]]);
        assert_eq!(index.top_k(&img, 10)[0].len(), 3);
        assert_eq!(prompt("cat"), "a photo of a cat");
    }
}
