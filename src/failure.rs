//! The one place that decides how a failure is handled. Steps and decoding report what went
//! wrong ([`Failure`]); [`Classifier::classify`] says which path it takes:
//!
//! | class | examples | path |
//! |---|---|---|
//! | transient | timeout, 408, 429, 503 | immediate in-process retries, jittered |
//! | service | 500, 502, 504, connection refused, registry unreachable | tiered retry topics, then the DLQ |
//! | permanent | 400, 422, other 4xx, bad payloads, invalid events, business rules | the DLQ at once |
//!
//! A pipeline can override the class of an HTTP status (`classify: {"409": permanent}`). A full
//! producer queue is no failure: the writer waits for room (`runtime/writer.rs`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::contracts::{DecodeError, EncodeError, FromDataError};

/// How a failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorClass {
    /// Likely gone in a moment: retried at once, a few times.
    Transient,
    /// A dependency is down: retried later through the retry tiers.
    Service,
    /// Retrying cannot help: to the dead-letter topic.
    Permanent,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 3] = [
        ErrorClass::Transient,
        ErrorClass::Service,
        ErrorClass::Permanent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Service => "service",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "transient" => Ok(ErrorClass::Transient),
            "service" => Ok(ErrorClass::Service),
            "permanent" => Ok(ErrorClass::Permanent),
            other => Err(format!(
                "unknown error class '{other}' (transient, service or permanent)"
            )),
        }
    }
}

/// What went wrong while handling one event.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("HTTP {status} from {url}: {body}")]
    HttpStatus {
        url: String,
        status: u16,
        body: String,
    },
    #[error("no answer from {url} within {timeout_ms} ms")]
    HttpTimeout { url: String, timeout_ms: u128 },
    #[error("cannot reach {url}: {detail}")]
    HttpUnreachable { url: String, detail: String },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("the downstream's answer is not a valid event: {0}")]
    BadAnswer(#[from] FromDataError),
    #[error("business rule: {0}")]
    BusinessRule(String),
    /// A store the runtime itself depends on (the dedup store) is unavailable.
    #[error("{0}")]
    Dependency(String),
    /// A retry record whose failure headers are missing, malformed or out of range.
    #[error("untrusted retry headers: {0}")]
    BadRetryHeaders(String),
}

impl Failure {
    /// A short, fixed name of the kind of failure, for headers and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::HttpStatus { .. } => "http_status",
            Failure::HttpTimeout { .. } => "http_timeout",
            Failure::HttpUnreachable { .. } => "http_unreachable",
            Failure::Decode(e) => e.kind(),
            Failure::Encode(_) => "encode",
            Failure::BadAnswer(_) => "bad_answer",
            Failure::BusinessRule(_) => "business_rule",
            Failure::Dependency(_) => "dependency_unavailable",
            Failure::BadRetryHeaders(_) => "bad_retry_headers",
        }
    }
}

/// Maps failures to classes: the defaults above, plus a pipeline's HTTP status overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classifier {
    http_overrides: BTreeMap<u16, ErrorClass>,
}

impl Classifier {
    pub fn new(http_overrides: BTreeMap<u16, ErrorClass>) -> Classifier {
        Classifier { http_overrides }
    }

    pub fn classify(&self, failure: &Failure) -> ErrorClass {
        match failure {
            Failure::HttpStatus { status, .. } => self
                .http_overrides
                .get(status)
                .copied()
                .unwrap_or_else(|| default_http_class(*status)),
            Failure::HttpTimeout { .. } => ErrorClass::Transient,
            Failure::HttpUnreachable { .. } | Failure::Dependency(_) => ErrorClass::Service,
            Failure::Decode(e) if e.is_retryable() => ErrorClass::Service,
            Failure::Encode(e) if e.is_retryable() => ErrorClass::Service,
            Failure::Decode(_)
            | Failure::Encode(_)
            | Failure::BadAnswer(_)
            | Failure::BusinessRule(_)
            | Failure::BadRetryHeaders(_) => ErrorClass::Permanent,
        }
    }
}

/// Where a failed record goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Run the step again now, in its lane (a transient failure with attempts left).
    RetryNow,
    /// To retry tier n (1-based).
    Tier(usize),
    /// To the dead-letter topic.
    DeadLetter,
}

/// Decides the route of a failure of `class` after `attempts` in-process attempts (of
/// `transient_attempts` allowed) of a record in retry tier `tier` (0 = not retried yet) of a
/// pipeline with `tiers` tiers. A transient failure that outlasts its attempts is a service
/// failure (see [`promoted`]).
pub fn route(
    class: ErrorClass,
    attempts: u32,
    transient_attempts: u32,
    tier: usize,
    tiers: usize,
) -> Route {
    match class {
        ErrorClass::Transient if attempts < transient_attempts => Route::RetryNow,
        ErrorClass::Transient | ErrorClass::Service if tier < tiers => Route::Tier(tier + 1),
        _ => Route::DeadLetter,
    }
}

/// The class a failure is reported with once it leaves the process: a transient failure that
/// outlasted its attempts counts as a service failure.
pub fn promoted(class: ErrorClass) -> ErrorClass {
    match class {
        ErrorClass::Transient => ErrorClass::Service,
        other => other,
    }
}

/// The default class of an HTTP status that is not an expected answer.
pub fn default_http_class(status: u16) -> ErrorClass {
    match status {
        408 | 429 | 503 => ErrorClass::Transient,
        500..=599 => ErrorClass::Service,
        _ => ErrorClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Failure {
        Failure::HttpStatus {
            url: "http://x".into(),
            status: code,
            body: String::new(),
        }
    }

    #[test]
    fn defaults_follow_the_table() {
        let c = Classifier::default();
        for (code, class) in [
            (408, ErrorClass::Transient),
            (429, ErrorClass::Transient),
            (503, ErrorClass::Transient),
            (500, ErrorClass::Service),
            (502, ErrorClass::Service),
            (504, ErrorClass::Service),
            (400, ErrorClass::Permanent),
            (422, ErrorClass::Permanent),
            (404, ErrorClass::Permanent),
        ] {
            assert_eq!(c.classify(&status(code)), class, "HTTP {code}");
        }
        let unreachable = Failure::HttpUnreachable {
            url: "u".into(),
            detail: "refused".into(),
        };
        assert_eq!(c.classify(&unreachable), ErrorClass::Service);
        let timeout = Failure::HttpTimeout {
            url: "u".into(),
            timeout_ms: 5,
        };
        assert_eq!(c.classify(&timeout), ErrorClass::Transient);
        let registry = Failure::Decode(DecodeError::RegistryUnavailable {
            id: 1,
            detail: "down".into(),
        });
        assert_eq!(c.classify(&registry), ErrorClass::Service);
        let magic = Failure::Decode(DecodeError::WrongMagicByte { found: 1 });
        assert_eq!(c.classify(&magic), ErrorClass::Permanent);
        assert_eq!(
            c.classify(&Failure::BusinessRule("no".into())),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn routes_follow_class_attempts_and_tiers() {
        use ErrorClass::*;
        assert_eq!(route(Transient, 0, 3, 0, 5), Route::RetryNow);
        assert_eq!(route(Transient, 3, 3, 0, 5), Route::Tier(1));
        assert_eq!(route(Service, 0, 3, 0, 5), Route::Tier(1));
        assert_eq!(route(Service, 0, 3, 4, 5), Route::Tier(5));
        assert_eq!(route(Service, 0, 3, 5, 5), Route::DeadLetter);
        assert_eq!(route(Transient, 3, 3, 5, 5), Route::DeadLetter);
        assert_eq!(route(Permanent, 0, 3, 0, 5), Route::DeadLetter);
        assert_eq!(route(Service, 0, 3, 0, 0), Route::DeadLetter, "no tiers");
        assert_eq!(promoted(Transient), Service);
        assert_eq!(promoted(Permanent), Permanent);
    }

    #[test]
    fn a_pipeline_can_override_a_status() {
        let c = Classifier::new([(409, ErrorClass::Service), (503, ErrorClass::Permanent)].into());
        assert_eq!(c.classify(&status(409)), ErrorClass::Service);
        assert_eq!(c.classify(&status(503)), ErrorClass::Permanent);
        assert_eq!(c.classify(&status(500)), ErrorClass::Service);
    }
}
