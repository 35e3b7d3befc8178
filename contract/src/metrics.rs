//! Metric names as the docs and the Grafana dashboard use them, so both binaries can check that
//! what is documented is what they export.

use std::collections::BTreeSet;

/// The `Content-Type` of both binaries' `/metrics`: prometheus-client writes the OpenMetrics text
/// format (counters' `_total` suffix, `# EOF` at the end), which Prometheus negotiates as such.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every name starting with `prefix` (e.g. `clip_worker_`) in a document or a PromQL query.
pub fn referenced(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

/// The names a Prometheus text exposition makes queryable: every sample name, plus the family
/// name of each histogram (documents name histograms by their family).
pub fn exposed(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.strip_suffix(" histogram").map(str::to_string),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next().map(str::to_string),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_queries_and_expositions() {
        let q = "sum(rate(clip_worker_batch_size_sum[5m])) / clip_worker_ready{x=\"1\"}";
        assert_eq!(
            referenced(q, "clip_worker_"),
            BTreeSet::from([
                "clip_worker_batch_size_sum".into(),
                "clip_worker_ready".into()
            ])
        );
        let text =
            "# TYPE a histogram\na_bucket{le=\"1\"} 0\na_sum 0\n# TYPE b counter\nb_total 1\n";
        assert_eq!(
            exposed(text),
            BTreeSet::from([
                "a".into(),
                "a_bucket".into(),
                "a_sum".into(),
                "b_total".into()
            ])
        );
    }
}
