//! A small client for the Confluent Schema Registry API (Apicurio serves it at
//! `/apis/ccompat/v7`): register, look up, list, and ask about compatibility.
//!
//! Encoding and decoding go through `schema_registry_converter`, which keeps its own cache;
//! this client is for the administrative calls the `schemas` commands make.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No answer: connection refused, DNS, timeout. Worth retrying later.
    #[error("schema registry at {url} is unreachable: {cause}")]
    Unreachable { url: String, cause: String },
    /// The registry answered with an error; `code` is its Confluent error code when given.
    #[error("schema registry refused {action}: HTTP {status}{}: {message}",
        .code.map(|c| format!(" (error {c})")).unwrap_or_default())]
    Refused {
        action: String,
        status: u16,
        code: Option<i64>,
        message: String,
    },
    #[error("schema registry sent an answer to {action} that is not the expected JSON: {detail}")]
    BadAnswer { action: String, detail: String },
}

impl RegistryError {
    /// True when the same call may succeed later (the registry is down or overloaded).
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Refused { status, .. } => *status >= 500 || *status == 429,
            RegistryError::BadAnswer { .. } => false,
        }
    }
}

/// A subject's schema version as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegisteredSchema {
    pub subject: String,
    pub id: u32,
    pub version: u32,
}

#[derive(Debug, Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
    credentials: Option<(String, String)>,
}

/// Registry basic-auth credentials from `ORDERFLOW_REGISTRY_USERNAME` and
/// `ORDERFLOW_REGISTRY_PASSWORD` (or `ORDERFLOW_REGISTRY_PASSWORD_FILE`, for mounted Secrets).
pub fn credentials_from_env() -> Option<(String, String)> {
    let username = std::env::var("ORDERFLOW_REGISTRY_USERNAME")
        .ok()
        .filter(|u| !u.is_empty())?;
    let password = std::env::var("ORDERFLOW_REGISTRY_PASSWORD")
        .ok()
        .or_else(|| {
            let path = std::env::var("ORDERFLOW_REGISTRY_PASSWORD_FILE").ok()?;
            std::fs::read_to_string(path)
                .ok()
                .map(|p| p.trim_end().to_string())
        })?;
    Some((username, password))
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

impl RegistryClient {
    /// `base` is the Confluent-compatible root, e.g. `http://127.0.0.1:18081/apis/ccompat/v7`.
    pub fn new(base: &str) -> RegistryClient {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .expect("a reqwest client with timeouts only always builds");
        RegistryClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            credentials: credentials_from_env(),
        }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// reqwest repeats the URL at every level of its error chain; the root says what happened.
    fn unreachable(&self, error: &reqwest::Error) -> RegistryError {
        let mut cause: &dyn std::error::Error = error;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let kind = if error.is_timeout() {
            "timed out: "
        } else {
            ""
        };
        RegistryError::Unreachable {
            url: self.base.clone(),
            cause: format!("{kind}{cause}"),
        }
    }

    fn path(&self, segments: &[&str]) -> String {
        let mut url = self.base.clone();
        for s in segments {
            url.push('/');
            // Subjects such as `order.created-value` are safe, but user-chosen names may not be.
            url.push_str(&urlencode(s));
        }
        url
    }

    async fn send<T: for<'de> Deserialize<'de>>(
        &self,
        action: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<T>, RegistryError> {
        let request = match &self.credentials {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        };
        let response = request
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| self.unreachable(&e))?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let parsed: Option<ErrorBody> = serde_json::from_str(&body).ok();
            return Err(RegistryError::Refused {
                action: action.to_string(),
                status: status.as_u16(),
                code: parsed.as_ref().and_then(|b| b.error_code),
                message: parsed.and_then(|b| b.message).unwrap_or(body),
            });
        }
        serde_json::from_str(&body)
            .map(Some)
            .map_err(|e| RegistryError::BadAnswer {
                action: action.to_string(),
                detail: format!("{e}: {body}"),
            })
    }

    /// The subject's version holding exactly this schema, if it has one.
    pub async fn lookup(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Option<RegisteredSchema>, RegistryError> {
        let request = self
            .http
            .post(self.path(&["subjects", subject]))
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&json!({"schema": schema, "schemaType": "AVRO"}));
        self.send(&format!("lookup of {subject}"), request).await
    }

    /// Registers the schema under the subject (a no-op returning the same id when it is already
    /// there) and returns its id and version.
    pub async fn register(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<RegisteredSchema, RegistryError> {
        #[derive(Deserialize)]
        struct Id {
            id: u32,
        }
        let action = format!("registration of {subject}");
        let request = self
            .http
            .post(self.path(&["subjects", subject, "versions"]))
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&json!({"schema": schema, "schemaType": "AVRO"}));
        let id =
            self.send::<Id>(&action, request)
                .await?
                .ok_or_else(|| RegistryError::BadAnswer {
                    action: action.clone(),
                    detail: "404 on register".into(),
                })?;
        let registered =
            self.lookup(subject, schema)
                .await?
                .ok_or_else(|| RegistryError::BadAnswer {
                    action: action.clone(),
                    detail: format!(
                        "schema id {} was returned but lookup finds no version",
                        id.id
                    ),
                })?;
        Ok(registered)
    }

    /// All subjects, sorted.
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        let request = self.http.get(self.path(&["subjects"]));
        let mut subjects: Vec<String> = self
            .send("listing subjects", request)
            .await?
            .unwrap_or_default();
        subjects.sort();
        Ok(subjects)
    }

    /// The newest version of a subject, if the subject exists.
    pub async fn latest(&self, subject: &str) -> Result<Option<RegisteredSchema>, RegistryError> {
        let request = self
            .http
            .get(self.path(&["subjects", subject, "versions", "latest"]));
        self.send(&format!("latest version of {subject}"), request)
            .await
    }

    /// The schema text stored under an id.
    pub async fn schema_by_id(&self, id: u32) -> Result<Option<String>, RegistryError> {
        #[derive(Deserialize)]
        struct Body {
            schema: String,
        }
        let request = self
            .http
            .get(self.path(&["schemas", "ids", &id.to_string()]));
        Ok(self
            .send::<Body>(&format!("schema {id}"), request)
            .await?
            .map(|b| b.schema))
    }

    /// Version numbers of a subject, oldest first (empty when the subject does not exist).
    pub async fn versions(&self, subject: &str) -> Result<Vec<u32>, RegistryError> {
        let request = self.http.get(self.path(&["subjects", subject, "versions"]));
        let mut versions: Vec<u32> = self
            .send(&format!("versions of {subject}"), request)
            .await?
            .unwrap_or_default();
        versions.sort_unstable();
        Ok(versions)
    }

    /// The schema text of one version of a subject.
    pub async fn version_schema(
        &self,
        subject: &str,
        version: u32,
    ) -> Result<Option<String>, RegistryError> {
        #[derive(Deserialize)]
        struct Body {
            schema: String,
        }
        let request =
            self.http
                .get(self.path(&["subjects", subject, "versions", &version.to_string()]));
        Ok(self
            .send::<Body>(&format!("version {version} of {subject}"), request)
            .await?
            .map(|b| b.schema))
    }

    /// The compatibility level that applies to a subject: its own, else the global one.
    pub async fn compatibility(&self, subject: &str) -> Result<String, RegistryError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            compatibility_level: String,
        }
        for path in [self.path(&["config", subject]), self.path(&["config"])] {
            let request = self.http.get(path);
            if let Some(body) = self
                .send::<Body>(&format!("compatibility of {subject}"), request)
                .await?
            {
                return Ok(body.compatibility_level);
            }
        }
        Ok("BACKWARD".into())
    }

    /// Asks the registry whether `schema` may become the subject's next version under its
    /// compatibility rule. `None` when the subject does not exist yet.
    pub async fn is_compatible(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Option<bool>, RegistryError> {
        #[derive(Deserialize)]
        struct Body {
            is_compatible: bool,
        }
        let request = self
            .http
            .post(self.path(&["compatibility", "subjects", subject, "versions", "latest"]))
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&json!({"schema": schema, "schemaType": "AVRO"}));
        Ok(self
            .send::<Body>(&format!("compatibility check of {subject}"), request)
            .await?
            .map(|b| b.is_compatible))
    }

    /// Sets the subject's compatibility level (BACKWARD, BACKWARD_TRANSITIVE, FULL, ...).
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), RegistryError> {
        #[derive(Serialize)]
        struct Body<'a> {
            compatibility: &'a str,
        }
        let request = self
            .http
            .put(self.path(&["config", subject]))
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&Body {
                compatibility: level,
            });
        self.send::<serde_json::Value>(&format!("compatibility of {subject}"), request)
            .await?;
        Ok(())
    }
}

fn urlencode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
