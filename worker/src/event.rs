//! Lakechain CloudEvents: reading what arrives on the queue and writing the enriched event.
//!
//! Input bodies, in the order they are tried:
//! 1. a bare Lakechain CloudEvent (SNS raw message delivery, what the seed receives);
//! 2. an SNS notification envelope whose `Message` is such an event;
//! 3. a native S3 event notification (`Records[].s3`), turned into one `document-created` (or
//!    `document-deleted`) event per record, as Lakechain's S3 trigger would have built it.
//!
//! Events are kept as JSON values (key order preserved) so that every field we do not own passes
//! through untouched.

use percent_encoding::percent_decode_str;
use serde_json::{Map, Value, json};

/// `type` of a new or updated document.
pub const DOCUMENT_CREATED: &str = "document-created";
/// `type` of a removed document.
pub const DOCUMENT_DELETED: &str = "document-deleted";

/// Why a message body is not an event we can act on (permanent: retrying cannot help).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the message body is not JSON: {0}")]
    NotJson(String),
    #[error("the message is not a Lakechain event, an SNS notification or an S3 notification")]
    UnknownShape,
    #[error("malformed event: {0}")]
    Malformed(String),
}

/// A Lakechain event as received.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent(pub Value);

/// Where a document lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub key: String,
}

impl CloudEvent {
    /// The event `type` (`document-created`, `document-deleted`).
    pub fn kind(&self) -> &str {
        self.0
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The event `id`, for logs.
    pub fn id(&self) -> &str {
        self.0.get("id").and_then(Value::as_str).unwrap_or_default()
    }

    fn document(&self) -> Result<&Map<String, Value>, EventError> {
        self.0
            .pointer("/data/document")
            .and_then(Value::as_object)
            .ok_or_else(|| EventError::Malformed("data.document is missing".into()))
    }

    /// `data.document.type`, the declared MIME type.
    pub fn mime_type(&self) -> Result<&str, EventError> {
        self.document()?
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| EventError::Malformed("data.document.type is missing".into()))
    }

    /// `data.document.etag`, without surrounding quotes, if present and non-empty.
    pub fn etag(&self) -> Option<String> {
        let etag = self
            .document()
            .ok()?
            .get("etag")?
            .as_str()?
            .trim()
            .trim_matches('"');
        (!etag.is_empty()).then(|| etag.to_string())
    }

    /// `data.document.url` as a bucket and key: `s3://<bucket>/<key>`, each part
    /// percent-decoded (Lakechain encodes key segments).
    pub fn location(&self) -> Result<S3Location, EventError> {
        let url = self
            .document()?
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| EventError::Malformed("data.document.url is missing".into()))?;
        parse_s3_url(url)
    }
}

/// Parses `s3://bucket/key` (percent-encoded parts allowed).
pub fn parse_s3_url(url: &str) -> Result<S3Location, EventError> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        EventError::Malformed(format!(
            "data.document.url {url:?} is not an s3:// URL (the only scheme supported)"
        ))
    })?;
    let (bucket, key) = rest.split_once('/').ok_or_else(|| {
        EventError::Malformed(format!("data.document.url {url:?} has no object key"))
    })?;
    let decode = |s: &str| percent_decode_str(s).decode_utf8().map(|c| c.into_owned());
    let (bucket, key) = (
        decode(bucket)
            .map_err(|_| EventError::Malformed(format!("{url:?}: bucket is not UTF-8")))?,
        decode(key).map_err(|_| EventError::Malformed(format!("{url:?}: key is not UTF-8")))?,
    );
    if bucket.is_empty() || key.is_empty() {
        return Err(EventError::Malformed(format!(
            "data.document.url {url:?} lacks a bucket or key"
        )));
    }
    Ok(S3Location { bucket, key })
}

/// Reads a message body into the events it carries.
pub fn parse_body(body: &str) -> Result<Vec<CloudEvent>, EventError> {
    let value: Value =
        serde_json::from_str(body).map_err(|e| EventError::NotJson(e.to_string()))?;
    if value.get("specversion").is_some() || value.get("data").is_some() {
        return Ok(vec![checked(value)?]);
    }
    if value.get("Type").and_then(Value::as_str) == Some("Notification") {
        let inner = value
            .get("Message")
            .and_then(Value::as_str)
            .ok_or_else(|| EventError::Malformed("SNS notification without a Message".into()))?;
        return parse_body(inner);
    }
    if let Some(records) = value.get("Records").and_then(Value::as_array) {
        return records.iter().map(from_s3_record).collect();
    }
    if value.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        // S3 sends this once when a notification is configured: nothing to do.
        return Ok(Vec::new());
    }
    Err(EventError::UnknownShape)
}

fn checked(value: Value) -> Result<CloudEvent, EventError> {
    if !value.is_object() {
        return Err(EventError::Malformed(
            "the event is not a JSON object".into(),
        ));
    }
    let ev = CloudEvent(value);
    match ev.kind() {
        DOCUMENT_CREATED | DOCUMENT_DELETED => {}
        "" => return Err(EventError::Malformed("the event has no type".into())),
        other => {
            return Err(EventError::Malformed(format!(
                "unknown event type {other:?}"
            )));
        }
    }
    ev.document()?;
    if ev.0.pointer("/data/chainId").is_none() {
        return Err(EventError::Malformed("data.chainId is missing".into()));
    }
    Ok(ev)
}

/// One S3 notification record as the event Lakechain's S3 trigger would publish for it.
fn from_s3_record(r: &Value) -> Result<CloudEvent, EventError> {
    let bad = |what: &str| EventError::Malformed(format!("S3 notification record: {what}"));
    let name = r
        .get("eventName")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no eventName"))?;
    let kind = if name.starts_with("ObjectCreated") {
        DOCUMENT_CREATED
    } else if name.starts_with("ObjectRemoved") {
        DOCUMENT_DELETED
    } else {
        return Err(bad(&format!("unsupported eventName {name:?}")));
    };
    let bucket = r
        .pointer("/s3/bucket/name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no bucket"))?;
    let raw_key = r
        .pointer("/s3/object/key")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no key"))?;
    // S3 notifications form-encode keys (spaces as '+').
    let key = percent_decode_str(&raw_key.replace('+', " "))
        .decode_utf8()
        .map_err(|_| bad("key is not UTF-8"))?
        .into_owned();
    let url = format!("s3://{}/{}", bucket, encode_key(&key));
    let mut document = json!({"url": url, "type": mime_from_key(&key)});
    if let Some(size) = r.pointer("/s3/object/size").and_then(Value::as_u64) {
        document["size"] = json!(size);
    }
    if let Some(etag) = r.pointer("/s3/object/eTag").and_then(Value::as_str) {
        document["etag"] = json!(etag);
    }
    let time = r
        .get("eventTime")
        .cloned()
        .unwrap_or_else(|| json!(now_rfc3339()));
    let (id, chain_id) = s3_record_ids(r, name, bucket, &key);
    Ok(CloudEvent(json!({
        "specversion": "1.0",
        "id": id,
        "type": kind,
        "time": time,
        "data": {
            "chainId": chain_id,
            "source": document.clone(),
            "document": document,
            "metadata": {},
            "callStack": [],
        }
    })))
}

/// The namespace of the name-based (version 5) UUIDs given to events made from S3 notifications.
const S3_EVENT_NAMESPACE: uuid::Uuid = uuid::uuid!("5d0b6c1e-9a52-4f43-8c1f-0f6f2a7d3e11");

/// The event `id` and `chainId` of an S3 notification record: UUIDv5s of what identifies the
/// change (event name, bucket, key, version id, ETag and S3's per-key `sequencer`), so a
/// notification S3 or SQS delivers twice becomes the same event twice and downstream
/// de-duplication on `id` works. Two different writes of one key differ in their sequencer (and
/// usually their ETag), so they stay two events.
fn s3_record_ids(r: &Value, name: &str, bucket: &str, key: &str) -> (String, String) {
    let field = |p: &str| r.pointer(p).and_then(Value::as_str).unwrap_or_default();
    // NUL cannot occur in any of these fields, so the joined name is unambiguous.
    let identity = [
        name,
        bucket,
        key,
        field("/s3/object/versionId"),
        field("/s3/object/eTag"),
        field("/s3/object/sequencer"),
    ]
    .join("\0");
    let derive = |what: &str| {
        uuid::Uuid::new_v5(
            &S3_EVENT_NAMESPACE,
            format!("{what}\0{identity}").as_bytes(),
        )
        .to_string()
    };
    (derive("id"), derive("chainId"))
}

/// Percent-encodes each `/`-separated segment of a key, as Lakechain does in document URLs.
fn encode_key(key: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    key.split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// MIME type from the key's extension, as Lakechain's trigger guesses it first.
fn mime_from_key(key: &str) -> String {
    let ext = key.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    crate::preprocess::ImageFormat::from_extension(ext)
        .map(|f| f.mime().to_string())
        .unwrap_or_else(|| "application/octet-stream".into())
}

/// Now as Lakechain writes times: RFC 3339, UTC, milliseconds.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// What the worker adds to an event it embedded.
#[derive(Debug, Clone)]
pub struct Enrichment<'a> {
    /// `s3://bucket/key` of the vector file.
    pub vectors: String,
    /// Model name as users write it (`ViT-B/32`).
    pub model: &'a str,
    pub dimensions: usize,
    pub keywords: &'a [String],
    /// Prepended to `data.callStack`.
    pub service: &'a str,
}

/// The outgoing event: everything as received, plus `metadata.properties.attrs.embeddings`,
/// `metadata.properties.kind = "image"`, the keywords merged after upstream ones, and the
/// service prepended to `callStack`.
pub fn enrich(ev: &CloudEvent, e: &Enrichment) -> Value {
    let mut out = ev.0.clone();
    let data = child(as_object(&mut out), "data");
    let metadata = child(data, "metadata");
    // Upstream keywords stay first; ours follow, without repeats.
    let mut keywords: Vec<Value> = metadata
        .get("keywords")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for k in e.keywords {
        if !keywords.iter().any(|v| v.as_str() == Some(k)) {
            keywords.push(json!(k));
        }
    }
    metadata.insert("keywords".into(), Value::Array(keywords));
    let properties = child(metadata, "properties");
    // The seed writes "text" here for images; an image stays an image.
    properties.insert("kind".into(), json!("image"));
    let attrs = child(properties, "attrs");
    attrs.insert(
        "embeddings".into(),
        json!({"vectors": e.vectors, "model": e.model, "dimensions": e.dimensions}),
    );
    prepend_call_stack(&mut out, e.service);
    out
}

/// A pass-through event (deletions): unchanged but for `callStack`.
pub fn forward(ev: &CloudEvent, service: &str) -> Value {
    let mut out = ev.0.clone();
    prepend_call_stack(&mut out, service);
    out
}

fn prepend_call_stack(ev: &mut Value, service: &str) {
    let data = child(as_object(ev), "data");
    let stack = data.entry("callStack").or_insert_with(|| json!([]));
    if !stack.is_array() {
        *stack = json!([]);
    }
    if let Some(a) = stack.as_array_mut() {
        a.insert(0, json!(service));
    }
}

/// `v` as an object (replaced by an empty one if it is not).
fn as_object(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("made an object above")
}

/// The object at `key` of `map`, created (or replaced, if not an object) as needed.
fn child<'m>(map: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    as_object(map.entry(key).or_insert_with(|| json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lakechain_event() -> Value {
        json!({
            "specversion": "1.0",
            "id": "1780d5de-fd6f-4530-98d7-82ebee85ea39",
            "type": "document-created",
            "time": "2023-10-22T13:19:10.657Z",
            "data": {
                "chainId": "6ebf76e4-f70c-440c-98f9-3e3e7eb34c79",
                "source": {"url": "s3://bucket/image.png", "type": "image/png", "size": 245328, "etag": "1243cbd6"},
                "document": {"url": "s3://bucket/my%20dir/image%2B1.png", "type": "image/png", "size": 245328, "etag": "\"1243cbd6\""},
                "metadata": {"keywords": ["beach", "cat"], "properties": {"kind": "image", "attrs": {"dimensions": {"width": 10}}}},
                "callStack": ["s3-event-trigger"]
            }
        })
    }

    #[test]
    fn bare_event_and_sns_envelope_give_the_same_event() {
        let ev = lakechain_event();
        let bare = parse_body(&ev.to_string()).unwrap();
        let envelope = json!({"Type": "Notification", "MessageId": "x", "Message": ev.to_string()});
        assert_eq!(parse_body(&envelope.to_string()).unwrap(), bare);
        assert_eq!(bare[0].kind(), DOCUMENT_CREATED);
        assert_eq!(bare[0].etag().as_deref(), Some("1243cbd6"));
        assert_eq!(
            bare[0].location().unwrap(),
            S3Location {
                bucket: "bucket".into(),
                key: "my dir/image+1.png".into()
            }
        );
    }

    #[test]
    fn s3_notifications_become_lakechain_events() {
        let body = json!({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "eventTime": "2026-01-02T03:04:05.000Z",
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "photos"}, "object": {"key": "holiday/my+cat+%C3%A9.JPG", "size": 1234, "eTag": "abc123"}}
        }]});
        let evs = parse_body(&body.to_string()).unwrap();
        assert_eq!(evs.len(), 1);
        let ev = &evs[0];
        assert_eq!(ev.kind(), DOCUMENT_CREATED);
        assert_eq!(ev.mime_type().unwrap(), "image/jpeg");
        assert_eq!(
            ev.location().unwrap(),
            S3Location {
                bucket: "photos".into(),
                key: "holiday/my cat é.JPG".into()
            }
        );
        assert_eq!(
            ev.0["data"]["document"]["url"],
            "s3://photos/holiday/my%20cat%20%C3%A9.JPG"
        );
        assert_eq!(ev.0["data"]["source"], ev.0["data"]["document"]);
        assert_eq!(ev.0["time"], "2026-01-02T03:04:05.000Z");
        assert_eq!(ev.etag().as_deref(), Some("abc123"));
        let removed = json!({"Records": [{"eventName": "ObjectRemoved:Delete", "s3": {"bucket": {"name": "b"}, "object": {"key": "a.png"}}}]});
        assert_eq!(
            parse_body(&removed.to_string()).unwrap()[0].kind(),
            DOCUMENT_DELETED
        );
        assert!(
            parse_body(&json!({"Service": "Amazon S3", "Event": "s3:TestEvent"}).to_string())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_redelivered_s3_notification_is_the_same_event() {
        let record = |name: &str, etag: &str, sequencer: &str| {
            json!({"Records": [{
                "eventName": name, "eventTime": "2026-01-02T03:04:05.000Z",
                "s3": {"bucket": {"name": "photos"}, "object": {"key": "a.png", "eTag": etag, "sequencer": sequencer}}
            }]})
            .to_string()
        };
        let first = parse_body(&record("ObjectCreated:Put", "e1", "0A")).unwrap();
        let again = parse_body(&record("ObjectCreated:Put", "e1", "0A")).unwrap();
        assert_eq!(
            first, again,
            "the same notification twice is the same event"
        );
        let id = first[0].0["id"].as_str().unwrap();
        let chain = first[0].0["data"]["chainId"].as_str().unwrap();
        assert_ne!(id, chain);
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 5);
        // Another write of the key, or its deletion, is another event.
        for other in [
            record("ObjectCreated:Put", "e2", "0B"),
            record("ObjectCreated:Put", "e1", "0B"),
            record("ObjectRemoved:Delete", "e1", "0A"),
        ] {
            let ev = parse_body(&other).unwrap();
            assert_ne!(ev[0].0["id"], first[0].0["id"], "{other}");
            assert_ne!(ev[0].0["data"]["chainId"], first[0].0["data"]["chainId"]);
        }
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(matches!(
            parse_body("not json"),
            Err(EventError::NotJson(_))
        ));
        assert_eq!(parse_body("{\"hello\": 1}"), Err(EventError::UnknownShape));
        let mut ev = lakechain_event();
        ev["data"].as_object_mut().unwrap().remove("document");
        assert_eq!(
            parse_body(&ev.to_string()).unwrap_err().to_string(),
            "malformed event: data.document is missing"
        );
        let mut ev = lakechain_event();
        ev["type"] = json!("document-updated");
        assert!(
            parse_body(&ev.to_string())
                .unwrap_err()
                .to_string()
                .contains("unknown event type")
        );
        let e = parse_s3_url("https://bucket.s3.amazonaws.com/key").unwrap_err();
        assert!(e.to_string().contains("not an s3:// URL"), "{e}");
        assert!(parse_s3_url("s3://bucket").is_err());
    }

    #[test]
    fn enrichment_follows_the_seed_with_its_defects_fixed() {
        let ev = CloudEvent(lakechain_event());
        let keywords = vec!["cat".to_string(), "sofa".to_string()];
        let out = enrich(
            &ev,
            &Enrichment {
                vectors: "s3://cache/clip-image-processor/ViT-B-32/1243cbd6".into(),
                model: "ViT-B/32",
                dimensions: 512,
                keywords: &keywords,
                service: "clip-image-processor",
            },
        );
        let original = lakechain_event();
        for k in ["specversion", "id", "type", "time"] {
            assert_eq!(out[k], original[k], "{k}");
        }
        for k in ["chainId", "source", "document"] {
            assert_eq!(out["data"][k], original["data"][k], "data.{k}");
        }
        let meta = &out["data"]["metadata"];
        assert_eq!(
            meta["keywords"],
            json!(["beach", "cat", "sofa"]),
            "upstream keywords kept, ours merged"
        );
        assert_eq!(meta["properties"]["kind"], "image");
        assert_eq!(
            meta["properties"]["attrs"]["dimensions"],
            json!({"width": 10}),
            "other attrs kept"
        );
        assert_eq!(
            meta["properties"]["attrs"]["embeddings"],
            json!({"vectors": "s3://cache/clip-image-processor/ViT-B-32/1243cbd6", "model": "ViT-B/32", "dimensions": 512})
        );
        assert_eq!(
            out["data"]["callStack"],
            json!(["clip-image-processor", "s3-event-trigger"])
        );
        // Key order is kept (preserve_order), so diffs of events stay readable.
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["specversion", "id", "type", "time", "data"]);
    }

    #[test]
    fn enrichment_creates_missing_metadata() {
        let mut ev = lakechain_event();
        ev["data"].as_object_mut().unwrap().remove("metadata");
        ev["data"].as_object_mut().unwrap().remove("callStack");
        let out = enrich(
            &CloudEvent(ev),
            &Enrichment {
                vectors: "s3://c/k".into(),
                model: "ViT-L/14",
                dimensions: 768,
                keywords: &[],
                service: "svc",
            },
        );
        assert_eq!(out["data"]["metadata"]["keywords"], json!([]));
        assert_eq!(
            out["data"]["metadata"]["properties"]["attrs"]["embeddings"]["dimensions"],
            768
        );
        assert_eq!(out["data"]["callStack"], json!(["svc"]));
        let fwd = forward(&CloudEvent(lakechain_event()), "svc");
        assert_eq!(fwd["data"]["callStack"], json!(["svc", "s3-event-trigger"]));
        assert_eq!(
            fwd["data"]["metadata"],
            lakechain_event()["data"]["metadata"]
        );
    }

    #[test]
    fn synthesized_events_carry_a_lakechain_timestamp() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2023-11-14T22:13:20.123Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
