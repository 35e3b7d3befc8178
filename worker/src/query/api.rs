//! The wire format of `POST /v1/embeddings`, OpenAI's embeddings API plus image inputs, and its
//! validation. Pure: no model, no I/O, so every error a client can cause is unit-tested here.

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};

/// Limits on one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Inputs (texts plus images) in one request.
    pub max_inputs: usize,
    /// Bytes of one text input (CLIP reads at most 77 tokens; longer texts are truncated, as
    /// CLIP's own tokenizer does, but the bytes are bounded first).
    pub max_text_bytes: usize,
    /// Whether `{"image": ...}` inputs are accepted.
    pub images: bool,
    /// Encoded bytes of one image (the worker's `MAX_IMAGE_BYTES`).
    pub max_image_bytes: u64,
}

/// One input of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    /// Encoded image bytes, and the MIME type a `data:` URL declared.
    Image {
        bytes: Vec<u8>,
        declared: Option<String>,
    },
}

/// How vectors are returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    /// Little-endian float32, base64 (what OpenAI's clients ask for by default).
    Base64,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub inputs: Vec<Input>,
    pub encoding: Encoding,
    /// `None`: the server's default.
    pub normalize: Option<bool>,
    pub dimensions: Option<u64>,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Parses and validates a request body.
pub fn parse(body: &[u8], limits: &RequestLimits) -> Result<EmbeddingsRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| {
        ApiError::invalid(
            None,
            "the body must be a JSON object with `model` and `input`",
        )
    })?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a string")),
        None => {
            return Err(ApiError::invalid(
                Some("model"),
                "`model` is required (GET /v1/models lists it)",
            ));
        }
    };
    let encoding = match obj.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(s)) if s == "float" => Encoding::Float,
        Some(Value::String(s)) if s == "base64" => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("`encoding_format` must be \"float\" or \"base64\", not {other}"),
            ));
        }
    };
    let normalize = match obj.get("normalize") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(ApiError::invalid(
                Some("normalize"),
                "`normalize` must be true or false",
            ));
        }
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => Some(d.as_u64().filter(|d| *d > 0).ok_or_else(|| {
            ApiError::invalid(
                Some("dimensions"),
                "`dimensions` must be a positive integer",
            )
        })?),
    };
    let raw: Vec<&Value> = match obj.get("input") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(Some("input"), "`input` is required"));
        }
        Some(Value::Array(items)) => items.iter().collect(),
        Some(one) => vec![one],
    };
    if raw.is_empty() {
        return Err(ApiError::invalid(
            Some("input"),
            "`input` is an empty list: give at least one text or image",
        ));
    }
    if raw.len() > limits.max_inputs {
        return Err(ApiError::invalid(
            Some("input"),
            format!(
                "{} inputs in one request, over the limit of {} (QUERY_MAX_INPUTS): split the request",
                raw.len(),
                limits.max_inputs
            ),
        ));
    }
    let inputs = raw
        .iter()
        .enumerate()
        .map(|(i, item)| input(i, item, limits))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EmbeddingsRequest {
        model,
        inputs,
        encoding,
        normalize,
        dimensions,
    })
}

fn input(i: usize, item: &Value, limits: &RequestLimits) -> Result<Input, ApiError> {
    let param = format!("input[{i}]");
    let bad = |msg: String| ApiError::invalid(Some(&param), msg);
    match item {
        Value::String(s) => text(s, limits).map_err(bad),
        Value::Number(_) => Err(bad(
            "token ids are not accepted: send the text (CLIP's tokenizer is not OpenAI's)".into(),
        )),
        Value::Array(_) => Err(bad(
            "token id arrays are not accepted: send the text (CLIP's tokenizer is not OpenAI's)"
                .into(),
        )),
        Value::Object(o) => {
            if let Some(t) = o.get("text") {
                let s = t
                    .as_str()
                    .ok_or_else(|| bad("`text` must be a string".into()))?;
                return text(s, limits).map_err(bad);
            }
            if o.contains_key("image_url") || o.contains_key("url") {
                return Err(bad(
                    "images by URL are not fetched (no server-side requests): send the bytes as {\"image\": \"<base64>\"}".into(),
                ));
            }
            let Some(img) = o.get("image") else {
                return Err(bad(
                    "an object input must be {\"text\": \"...\"} or {\"image\": \"<base64>\"}"
                        .into(),
                ));
            };
            if !limits.images {
                return Err(bad(
                    "image inputs are turned off on this endpoint (QUERY_IMAGES=false)".into(),
                ));
            }
            let s = img
                .as_str()
                .ok_or_else(|| bad("`image` must be a base64 string".into()))?;
            image(s, limits).map_err(bad)
        }
        other => Err(bad(format!(
            "an input must be a string or an object, not {other}"
        ))),
    }
}

fn text(s: &str, limits: &RequestLimits) -> Result<Input, String> {
    if s.is_empty() {
        return Err("the text is empty".into());
    }
    if s.len() > limits.max_text_bytes {
        return Err(format!(
            "the text is {} bytes, over the limit of {} (QUERY_MAX_TEXT_BYTES); CLIP reads only its first 77 tokens anyway",
            s.len(),
            limits.max_text_bytes
        ));
    }
    Ok(Input::Text(s.to_string()))
}

fn image(s: &str, limits: &RequestLimits) -> Result<Input, String> {
    let (declared, data) = match s.strip_prefix("data:") {
        Some(rest) => {
            let (head, data) = rest
                .split_once(',')
                .ok_or("a data: URL without a comma".to_string())?;
            let mime = head
                .strip_suffix(";base64")
                .ok_or("a data: URL must be base64 (data:<type>;base64,...)".to_string())?;
            (Some(mime.to_string()).filter(|m| !m.is_empty()), data)
        }
        None if s.starts_with("http://") || s.starts_with("https://") || s.starts_with("s3://") => {
            return Err(
                "images by URL are not fetched (no server-side requests): send the bytes as base64"
                    .into(),
            );
        }
        None => (None, s),
    };
    // Refuse an oversized image from its encoded length, before decoding it.
    let decoded_len = (data.len() as u64 / 4) * 3;
    if decoded_len > limits.max_image_bytes.saturating_add(3) {
        return Err(format!(
            "the image is about {decoded_len} bytes, over the limit of {} bytes (MAX_IMAGE_BYTES)",
            limits.max_image_bytes
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim_end())
        .map_err(|e| format!("`image` is not valid base64: {e}"))?;
    Ok(Input::Image { bytes, declared })
}

/// `embedding` as the request asked: a JSON array of floats or base64 of little-endian float32.
pub fn encode_vector(v: &[f32], encoding: Encoding) -> Value {
    match encoding {
        Encoding::Float => json!(v),
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// `usage` of a response.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_inputs: 4,
        max_text_bytes: 64,
        images: true,
        max_image_bytes: 30,
    };

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes(), &LIMITS).unwrap_err()
    }

    #[test]
    fn a_string_a_list_and_objects() {
        let r = parse(br#"{"model":"ViT-B/32","input":"a red car"}"#, &LIMITS).unwrap();
        assert_eq!(r.inputs, vec![Input::Text("a red car".into())]);
        assert_eq!(r.encoding, Encoding::Float);
        assert_eq!(r.normalize, None);
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG....");
        let body = format!(
            r#"{{"model":"m","input":["a",{{"text":"b"}},{{"image":"{png}"}},{{"image":"data:image/png;base64,{png}"}}],"encoding_format":"base64","normalize":true,"dimensions":512}}"#
        );
        let r = parse(body.as_bytes(), &LIMITS).unwrap();
        assert_eq!(r.inputs.len(), 4);
        assert_eq!(
            r.inputs[2],
            Input::Image {
                bytes: b"\x89PNG....".to_vec(),
                declared: None
            }
        );
        assert_eq!(
            r.inputs[3],
            Input::Image {
                bytes: b"\x89PNG....".to_vec(),
                declared: Some("image/png".into())
            }
        );
        assert_eq!(r.encoding, Encoding::Base64);
        assert_eq!(r.normalize, Some(true));
        assert_eq!(r.dimensions, Some(512));
    }

    #[test]
    fn malformed_bodies_name_the_problem() {
        assert!(err("{").message.contains("not valid JSON"));
        assert!(err("[]").message.contains("JSON object"));
        assert_eq!(err(r#"{"input":"a"}"#).param.as_deref(), Some("model"));
        assert_eq!(err(r#"{"model":"m"}"#).param.as_deref(), Some("input"));
        assert!(
            err(r#"{"model":"m","input":[]}"#)
                .message
                .contains("empty list")
        );
        let e = err(r#"{"model":"m","input":["a","b","c","d","e"]}"#);
        assert!(e.message.contains("over the limit of 4"), "{}", e.message);
        let e = err(r#"{"model":"m","input":[[1,2,3]]}"#);
        assert_eq!(e.param.as_deref(), Some("input[0]"));
        assert!(e.message.contains("token id"));
        assert!(
            err(r#"{"model":"m","input":"x","encoding_format":"int8"}"#)
                .param
                .is_some()
        );
        assert!(
            err(r#"{"model":"m","input":"x","dimensions":0}"#)
                .param
                .is_some()
        );
        assert!(
            err(r#"{"model":"m","input":"x","normalize":"yes"}"#)
                .param
                .is_some()
        );
        assert!(err(r#"{"model":"m","input":""}"#).message.contains("empty"));
        let long = "x".repeat(65);
        assert!(
            err(&format!(r#"{{"model":"m","input":"{long}"}}"#))
                .message
                .contains("QUERY_MAX_TEXT_BYTES")
        );
        let e = err(r#"{"model":"m","input":["a",{"image":"@@@@"}]}"#);
        assert_eq!(e.param.as_deref(), Some("input[1]"));
        assert!(e.message.contains("base64"), "{}", e.message);
        assert!(e.body()["error"]["type"] == "invalid_request_error");
    }

    #[test]
    fn no_fetching_by_url_and_no_oversized_images() {
        for body in [
            r#"{"model":"m","input":[{"image_url":"http://169.254.169.254/"}]}"#,
            r#"{"model":"m","input":[{"image":"https://example.com/a.png"}]}"#,
            r#"{"model":"m","input":[{"image":"s3://bucket/a.png"}]}"#,
        ] {
            assert!(err(body).message.contains("not fetched"), "{body}");
        }
        let big = base64::engine::general_purpose::STANDARD.encode([0u8; 60]);
        let e = err(&format!(r#"{{"model":"m","input":[{{"image":"{big}"}}]}}"#));
        assert!(e.message.contains("MAX_IMAGE_BYTES"), "{}", e.message);
        let off = RequestLimits {
            images: false,
            ..LIMITS
        };
        let e = parse(br#"{"model":"m","input":[{"image":"AAAA"}]}"#, &off).unwrap_err();
        assert!(e.message.contains("QUERY_IMAGES"));
    }

    #[test]
    fn vectors_as_floats_base64_and_unit_length() {
        let v = [1.5f32, -2.0, 0.25];
        assert_eq!(encode_vector(&v, Encoding::Float), json!([1.5, -2.0, 0.25]));
        let b = encode_vector(&v, Encoding::Base64);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b.as_str().unwrap())
            .unwrap();
        let back: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, v);
        let mut u = [3.0f32, 4.0];
        l2_normalize(&mut u);
        assert_eq!(u, [0.6, 0.8]);
        let mut z = [0.0f32; 3];
        l2_normalize(&mut z);
        assert_eq!(z, [0.0; 3]);
    }
}
