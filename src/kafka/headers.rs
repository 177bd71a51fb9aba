//! Failure context carried in record headers on retry and dead-letter topics. Every name starts
//! with `orderflow.`; the record's own headers (CloudEvents `ce_*`, ...) are kept beside them.

use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::failure::ErrorClass;

pub const PREFIX: &str = "orderflow.";
/// How many times the step has failed for this record (1 on the first retry record).
pub const ATTEMPT: &str = "orderflow.attempt";
pub const ORIGINAL_TOPIC: &str = "orderflow.original.topic";
pub const ORIGINAL_PARTITION: &str = "orderflow.original.partition";
pub const ORIGINAL_OFFSET: &str = "orderflow.original.offset";
/// The original record's timestamp, ms since the epoch.
pub const ORIGINAL_TIMESTAMP: &str = "orderflow.original.timestamp";
/// The consumer group that failed it.
pub const GROUP: &str = "orderflow.group";
/// transient, service or permanent.
pub const ERROR_CLASS: &str = "orderflow.error.class";
/// A short fixed name, e.g. http_status, corrupt_body.
pub const ERROR_KIND: &str = "orderflow.error.kind";
pub const ERROR_MESSAGE: &str = "orderflow.error.message";
/// When the step first failed for this record, ms since the epoch.
pub const FIRST_FAILURE_TIME: &str = "orderflow.first-failure.time";
/// When a retry record may be handled, ms since the epoch (retry topics only).
pub const DUE_TIME: &str = "orderflow.due.time";
/// The retry tier the record is in (retry topics only).
pub const RETRY_TIER: &str = "orderflow.retry.tier";

/// Where a record first came from and how it has failed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureContext {
    pub attempt: u32,
    pub original_topic: String,
    pub original_partition: i32,
    pub original_offset: i64,
    pub original_timestamp: Option<i64>,
    pub first_failure_ms: i64,
    pub tier: usize,
    pub due_ms: Option<i64>,
}

/// Reads one header as UTF-8 text.
pub fn get<'a, H: Headers>(headers: Option<&'a H>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

impl FailureContext {
    /// The context of a record from a retry topic; `None` when the headers lack it.
    pub fn read<H: Headers>(headers: Option<&H>) -> Option<FailureContext> {
        let num = |name| get(headers, name)?.parse::<i64>().ok();
        Some(FailureContext {
            attempt: u32::try_from(num(ATTEMPT)?).ok()?,
            original_topic: get(headers, ORIGINAL_TOPIC)?.to_string(),
            original_partition: i32::try_from(num(ORIGINAL_PARTITION)?).ok()?,
            original_offset: num(ORIGINAL_OFFSET)?,
            original_timestamp: num(ORIGINAL_TIMESTAMP),
            first_failure_ms: num(FIRST_FAILURE_TIME)?,
            tier: usize::try_from(num(RETRY_TIER)?).ok()?,
            due_ms: num(DUE_TIME),
        })
    }
}

/// The record's own headers (without earlier `orderflow.*` ones) plus the failure context.
pub fn with_failure<H: Headers>(
    original: Option<&H>,
    context: &FailureContext,
    group: &str,
    class: ErrorClass,
    kind: &str,
    message: &str,
) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(original) = original {
        for h in original.iter().filter(|h| !h.key.starts_with(PREFIX)) {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let text = |out: OwnedHeaders, key: &str, value: &str| {
        out.insert(Header {
            key,
            value: Some(value),
        })
    };
    out = text(out, ATTEMPT, &context.attempt.to_string());
    out = text(out, ORIGINAL_TOPIC, &context.original_topic);
    out = text(
        out,
        ORIGINAL_PARTITION,
        &context.original_partition.to_string(),
    );
    out = text(out, ORIGINAL_OFFSET, &context.original_offset.to_string());
    if let Some(ts) = context.original_timestamp {
        out = text(out, ORIGINAL_TIMESTAMP, &ts.to_string());
    }
    out = text(out, GROUP, group);
    out = text(out, ERROR_CLASS, class.as_str());
    out = text(out, ERROR_KIND, kind);
    out = text(out, ERROR_MESSAGE, message);
    out = text(
        out,
        FIRST_FAILURE_TIME,
        &context.first_failure_ms.to_string(),
    );
    if context.tier > 0 {
        out = text(out, RETRY_TIER, &context.tier.to_string());
    }
    if let Some(due) = context.due_ms {
        out = text(out, DUE_TIME, &due.to_string());
    }
    out
}

/// Longest error message written to a header, or read from one.
pub const MAX_ERROR_MESSAGE: usize = 1000;

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The error message a retry or dead-letter record carries, bounded to [`MAX_ERROR_MESSAGE`]
/// (it comes from outside: another process, or anyone who can write to the topic).
pub fn error_message<H: Headers>(headers: Option<&H>) -> Option<String> {
    text(headers, ERROR_MESSAGE).map(|t| truncate(t, MAX_ERROR_MESSAGE))
}

/// Reads one header as text, invalid UTF-8 replaced: for showing what a record carries.
pub fn text<H: Headers>(headers: Option<&H>, name: &str) -> Option<String> {
    headers?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The record's headers without those `drop` names (e.g. the failure context of a record being
/// replayed), in their order.
pub fn without<H: Headers>(original: Option<&H>, drop: impl Fn(&str) -> bool) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(original) = original {
        for h in original.iter().filter(|h| !drop(h.key)) {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    out
}

/// On a replayed dead letter: the `<dlq>:<partition>:<offset>` it was replayed from.
pub const REPLAYED_FROM: &str = "orderflow.replayed.from";
/// On a replayed dead letter: when it was replayed, ms since the epoch.
pub const REPLAYED_TIME: &str = "orderflow.replayed.time";
