//! What the API server checks on a custom resource before its CEL rules, done offline for
//! `clip-operator render`: the CRD's structural schema (types, `required`, `enum`, ranges,
//! lengths, item counts, list-map keys) and strict field validation (an unknown field is an
//! error, as `kubectl apply` makes it). Only the keywords the generated CRD uses are
//! implemented; a test fails if the CRD starts using one this module does not know.
//!
//! Nulls follow the API server: a `null` in a field that is not `nullable` is pruned before
//! defaulting, i.e. it counts as absent. Messages are the API server's, field path first.

use std::sync::LazyLock;

use serde_json::{Map, Value};

/// The `openAPIV3Schema` of a derived CRD's served version.
fn served_schema(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the derived CRD has a schema");
    serde_json::to_value(schema).expect("a schema serialises")
}

/// The `ClipProcessor` CRD's schema.
static CLIP_PROCESSOR: LazyLock<Value> = LazyLock::new(|| {
    use kube::CustomResourceExt;
    served_schema(crate::crd::ClipProcessor::crd())
});

/// The `ClipProcessorClass` CRD's schema.
static CLIP_PROCESSOR_CLASS: LazyLock<Value> = LazyLock::new(|| {
    use kube::CustomResourceExt;
    served_schema(crate::class::ClipProcessorClass::crd())
});

/// Every violation of the `ClipProcessor` schema in `object` (a whole manifest), in document
/// order. `status` is not checked: the API server ignores it on create and apply.
pub fn clip_processor_violations(object: &Value) -> Vec<String> {
    violations(object, &CLIP_PROCESSOR)
}

/// The same for a `ClipProcessorClass`.
pub fn clip_processor_class_violations(object: &Value) -> Vec<String> {
    violations(object, &CLIP_PROCESSOR_CLASS)
}

fn violations(object: &Value, schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(fields) = object.as_object() else {
        out.push(format!(
            "<root>: Invalid value: {}: must be of type object",
            show(object)
        ));
        return out;
    };
    for (k, v) in fields {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => metadata(v, &mut out),
            _ => match schema["properties"].get(k) {
                Some(s) => walk(v, s, k, &mut out),
                None => out.push(format!("unknown field {k:?}")),
            },
        }
    }
    required(fields, schema, "", &mut out);
    out
}

/// The fields of `ObjectMeta` a client may send.
const OBJECT_META: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

fn metadata(v: &Value, out: &mut Vec<String>) {
    let Some(meta) = v.as_object() else {
        out.push(format!(
            "metadata: Invalid value: {}: must be of type object",
            show(v)
        ));
        return;
    };
    for k in meta.keys() {
        if !OBJECT_META.contains(&k.as_str()) {
            out.push(format!("unknown field \"metadata.{k}\""));
        }
    }
    for key in ["labels", "annotations"] {
        match meta.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    if !v.is_string() {
                        out.push(format!(
                            "metadata.{key}.{k}: Invalid value: {}: must be of type string",
                            show(v)
                        ));
                    }
                }
            }
            Some(v) => out.push(format!(
                "metadata.{key}: Invalid value: {}: must be of type object",
                show(v)
            )),
        }
    }
    match meta.get("name") {
        None | Some(Value::Null) => {}
        Some(Value::String(name)) if !dns_subdomain(name) => out.push(format!(
            "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        )),
        Some(Value::String(_)) => {}
        Some(v) => out.push(format!("metadata.name: Invalid value: {}: must be of type string", show(v))),
    }
}

/// A DNS-1123 subdomain, what the API server requires of a custom resource's name.
fn dns_subdomain(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
}

fn walk(v: &Value, s: &Value, path: &str, out: &mut Vec<String>) {
    if v.is_null() {
        // Pruned unless nullable; an absent required field is reported by its parent.
        return;
    }
    if s["x-kubernetes-int-or-string"] == true {
        if !(v.is_string() || is_integer(v)) {
            out.push(format!(
                "{path}: Invalid value: {}: must be an integer or a string",
                show(v)
            ));
        }
        return;
    }
    let ty = s["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => is_integer(v),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        let got = json_type(v);
        out.push(format!(
            "{path}: Invalid value: \"{got}\": {path} in body must be of type {ty}: \"{got}\""
        ));
        return;
    }
    if let Some(allowed) = s["enum"].as_array()
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(show).collect();
        out.push(format!(
            "{path}: Unsupported value: {}: supported values: {}",
            show(v),
            list.join(", ")
        ));
    }
    match v {
        Value::Object(fields) => {
            let props = s["properties"].as_object();
            for (k, child) in fields {
                let at = format!("{path}.{k}");
                match (props.and_then(|p| p.get(k)), &s["additionalProperties"]) {
                    (Some(cs), _) => walk(child, cs, &at, out),
                    (None, Value::Object(_)) => walk(child, &s["additionalProperties"], &at, out),
                    (None, Value::Bool(true)) => {}
                    _ if s["x-kubernetes-preserve-unknown-fields"] == true => {}
                    _ => out.push(format!("unknown field {at:?}")),
                }
            }
            let n = fields.len() as u64;
            if let Some(max) = s["maxProperties"].as_u64()
                && n > max
            {
                out.push(format!(
                    "{path}: Too many: {n}: must have at most {max} items"
                ));
            }
            required(fields, s, path, out);
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(max) = s["maxItems"].as_u64()
                && n > max
            {
                out.push(format!(
                    "{path}: Too many: {n}: must have at most {max} items"
                ));
            }
            if let Some(min) = s["minItems"].as_u64()
                && n < min
            {
                out.push(format!(
                    "{path}: Invalid value: {n}: {path} in body should have at least {min} items"
                ));
            }
            for (i, item) in items.iter().enumerate() {
                walk(item, &s["items"], &format!("{path}[{i}]"), out);
            }
            list_type(items, s, path, out);
        }
        Value::String(text) => {
            let n = text.chars().count() as u64;
            if let Some(max) = s["maxLength"].as_u64()
                && n > max
            {
                out.push(format!(
                    "{path}: Too long: may not be more than {max} bytes"
                ));
            }
            if let Some(min) = s["minLength"].as_u64()
                && n < min
            {
                out.push(format!(
                    "{path}: Invalid value: {}: {path} in body should be at least {min} chars long",
                    show(v)
                ));
            }
        }
        Value::Number(x) => {
            let x = x.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = s["minimum"].as_f64()
                && x < min
            {
                out.push(format!(
                    "{path}: Invalid value: {}: {path} in body should be greater than or equal to {}",
                    show(v),
                    bound(min)
                ));
            }
            if let Some(max) = s["maximum"].as_f64()
                && x > max
            {
                out.push(format!(
                    "{path}: Invalid value: {}: {path} in body should be less than or equal to {}",
                    show(v),
                    bound(max)
                ));
            }
        }
        _ => {}
    }
}

fn required(fields: &Map<String, Value>, s: &Value, path: &str, out: &mut Vec<String>) {
    for k in s["required"].as_array().into_iter().flatten() {
        let Some(k) = k.as_str() else { continue };
        let present = match fields.get(k) {
            None => false,
            Some(Value::Null) => s["properties"][k]["nullable"] == true,
            Some(_) => true,
        };
        if !present {
            let at = if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            };
            out.push(format!("{at}: Required value"));
        }
    }
}

/// `x-kubernetes-list-type`: `set` items and `map` keys must be unique.
fn list_type(items: &[Value], s: &Value, path: &str, out: &mut Vec<String>) {
    let key = |item: &Value| -> Value {
        match s["x-kubernetes-list-type"].as_str() {
            Some("map") => Value::Array(
                s["x-kubernetes-list-map-keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str())
                    .map(|k| item[k].clone())
                    .collect(),
            ),
            _ => item.clone(),
        }
    };
    if !matches!(s["x-kubernetes-list-type"].as_str(), Some("map" | "set")) {
        return;
    }
    for (i, item) in items.iter().enumerate() {
        if items[..i].iter().any(|earlier| key(earlier) == key(item)) {
            out.push(format!(
                "{path}[{i}]: Duplicate value: {}",
                show(&key(item))
            ));
        }
    }
}

/// A schema bound as the API server prints it (schemars writes `1.0` for an integer's 1).
fn bound(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        x.to_string()
    }
}

/// The JSON type of a value, as the API server names it.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_integer(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

/// A value as the API server quotes it, cut at 64 characters.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 64 {
        format!("{}...", s.chars().take(64).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(spec: Value) -> Value {
        let mut m = json!({
            "apiVersion": "lakechain.dev/v1alpha1",
            "kind": "ClipProcessor",
            "metadata": {"name": "photos", "namespace": "media", "labels": {"team": "search"}},
            "spec": {
                "source": {"queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/clip-input"},
                "output": {"topicArn": "arn:aws:sns:eu-west-1:123456789012:clip-output"},
                "cacheStorage": {"bucket": "lakechain-cache"}
            }
        });
        for (k, v) in spec.as_object().unwrap() {
            m["spec"][k] = v.clone();
        }
        m
    }

    fn one(spec: Value) -> String {
        let v = clip_processor_violations(&manifest(spec));
        assert_eq!(v.len(), 1, "{v:?}");
        v[0].clone()
    }

    #[test]
    fn a_valid_manifest_has_no_violation() {
        let m = manifest(json!({
            "model": "ViT-L/14",
            "scaling": {"maxInstances": 1000, "minInstances": 0},
            "worker": {"resources": {"limits": {"memory": "8Gi", "cpu": 2}}, "env": [{"name": "A", "value": "1"}]},
            "compute": {"tolerations": [{"key": "k", "operator": "Exists"}], "nodeSelector": {"a": "b"}},
            "region": null,
        }));
        assert_eq!(clip_processor_violations(&m), Vec::<String>::new());
    }

    #[test]
    fn each_keyword_is_enforced_with_the_api_servers_words() {
        assert_eq!(
            one(json!({"scaling": {"maxInstances": 0}})),
            "spec.scaling.maxInstances: Invalid value: 0: spec.scaling.maxInstances in body should be greater than or equal to 1"
        );
        assert_eq!(
            one(json!({"scaling": {"maxInstances": 1001}})),
            "spec.scaling.maxInstances: Invalid value: 1001: spec.scaling.maxInstances in body should be less than or equal to 1000"
        );
        assert_eq!(
            one(json!({"scaling": {"maxInstances": "5"}})),
            "spec.scaling.maxInstances: Invalid value: \"string\": spec.scaling.maxInstances in body must be of type integer: \"string\""
        );
        assert_eq!(
            one(json!({"scaling": {"maxInstances": 2.5}})),
            "spec.scaling.maxInstances: Invalid value: \"number\": spec.scaling.maxInstances in body must be of type integer: \"number\""
        );
        assert_eq!(
            one(json!({"model": "ViT-H/14"})),
            "spec.model: Unsupported value: \"ViT-H/14\": supported values: \"ViT-B/32\", \"ViT-B/16\", \"ViT-L/14\""
        );
        assert_eq!(
            one(json!({"cacheStorage": {"bucket": "b".repeat(64)}})),
            "spec.cacheStorage.bucket: Too long: may not be more than 63 bytes"
        );
        assert_eq!(
            one(json!({"compute": {"instanceTypes": []}})),
            "spec.compute.instanceTypes: Invalid value: 0: spec.compute.instanceTypes in body should have at least 1 items"
        );
        assert_eq!(
            one(json!({"compute": {"instanceTypes": vec!["g5.xlarge"; 33]}})),
            "spec.compute.instanceTypes: Too many: 33: must have at most 32 items"
        );
        assert_eq!(
            one(json!({"worker": {"image": ""}})),
            "spec.worker.image: Invalid value: \"\": spec.worker.image in body should be at least 1 chars long"
        );
        assert_eq!(
            one(json!({"cacheStorage": {}})),
            "spec.cacheStorage.bucket: Required value"
        );
        assert_eq!(
            one(json!({"labelExtraction": "yes"})),
            "spec.labelExtraction: Invalid value: \"string\": spec.labelExtraction in body must be of type boolean: \"string\""
        );
        assert_eq!(
            one(json!({"scaling": {"maxInstance": 3}})),
            "unknown field \"spec.scaling.maxInstance\""
        );
        assert_eq!(
            one(json!({"worker": {"resources": {"limits": {"memory": [1]}}}})),
            "spec.worker.resources.limits.memory: Invalid value: [1]: must be an integer or a string"
        );
        let labels: serde_json::Map<String, Value> =
            (0..65).map(|i| (format!("l{i}"), json!("v"))).collect();
        assert_eq!(
            one(json!({"worker": {"podLabels": labels}})),
            "spec.worker.podLabels: Too many: 65: must have at most 64 items"
        );
        assert_eq!(
            one(json!({"compute": {"nodeSelector": {"a": 1}}})),
            "spec.compute.nodeSelector.a: Invalid value: \"integer\": spec.compute.nodeSelector.a in body must be of type string: \"integer\""
        );
        let mut m = manifest(json!({}));
        m["spec"]["source"] = Value::Null;
        assert_eq!(
            clip_processor_violations(&m),
            ["spec.source: Required value"],
            "a null in a field that is not nullable is pruned"
        );
    }

    #[test]
    fn metadata_and_the_root_are_checked_too() {
        let mut m = manifest(json!({}));
        m["metadata"]["name"] = json!("Photos");
        m["metadata"]["label"] = json!({});
        m["metadata"]["annotations"] = json!({"a": 1});
        m["extra"] = json!(1);
        m.as_object_mut().unwrap().remove("spec");
        let v = clip_processor_violations(&m);
        for needle in [
            "unknown field \"extra\"",
            "unknown field \"metadata.label\"",
            "metadata.annotations.a: Invalid value: 1: must be of type string",
            "metadata.name: Invalid value: \"Photos\": a lowercase RFC 1123 subdomain",
            "spec: Required value",
        ] {
            assert!(
                v.iter().any(|e| e.contains(needle)),
                "{needle} not in {v:?}"
            );
        }
    }

    #[test]
    fn list_maps_refuse_duplicate_keys() {
        let s = json!({"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                       "items": {"type": "object", "properties": {"type": {"type": "string"}}}});
        let mut out = Vec::new();
        walk(
            &json!([{"type": "Ready"}, {"type": "Degraded"}, {"type": "Ready"}]),
            &s,
            "status.conditions",
            &mut out,
        );
        assert_eq!(out, ["status.conditions[2]: Duplicate value: [\"Ready\"]"]);
    }

    /// Every keyword in the generated schema is either enforced here, by the CEL evaluator
    /// (`x-kubernetes-validations`), or carries no rule. A new keyword fails this test until it
    /// is handled.
    #[test]
    fn every_keyword_the_crd_uses_is_known() {
        const KNOWN: &[&str] = &[
            // enforced here
            "type",
            "properties",
            "additionalProperties",
            "required",
            "items",
            "enum",
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
            "minItems",
            "maxItems",
            "maxProperties",
            "nullable",
            "x-kubernetes-int-or-string",
            "x-kubernetes-preserve-unknown-fields",
            "x-kubernetes-list-type",
            "x-kubernetes-list-map-keys",
            // enforced by validate_cel
            "x-kubernetes-validations",
            // no rule: documentation, defaulting (serde applies the same defaults), and formats
            // the API server does not check on integers
            "description",
            "title",
            "default",
            "format",
        ];
        fn keywords(s: &Value, out: &mut std::collections::BTreeSet<String>) {
            let Some(m) = s.as_object() else { return };
            for (k, v) in m {
                out.insert(k.clone());
                match k.as_str() {
                    "properties" => v
                        .as_object()
                        .into_iter()
                        .flatten()
                        .for_each(|(_, p)| keywords(p, out)),
                    "items" | "additionalProperties" => keywords(v, out),
                    _ => {}
                }
            }
        }
        let mut used = Default::default();
        keywords(&CLIP_PROCESSOR, &mut used);
        keywords(&CLIP_PROCESSOR_CLASS, &mut used);
        let unknown: Vec<_> = used
            .iter()
            .filter(|k| !KNOWN.contains(&k.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "schema keywords not handled: {unknown:?}"
        );
        // Strings with a format the API server checks (date-time, ...) only occur in status.
        let spec = serde_json::to_string(&CLIP_PROCESSOR["properties"]["spec"]).unwrap();
        assert!(
            !spec.contains("\"date-time\""),
            "a checked string format in spec"
        );
    }
}
