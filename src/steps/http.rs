//! The HTTP step: POST the event as JSON to a downstream service, with the event id as
//! `Idempotency-Key` so a retried call has no second effect there, and turn the answer into an
//! event.

use crate::contracts::AnyEvent;
use crate::failure::Failure;
use crate::pipeline::HttpStep;

/// Longest part of an error body kept in a failure (it ends up in DLQ headers).
const BODY_EXCERPT: usize = 300;

#[derive(Clone)]
pub struct HttpCaller {
    step: HttpStep,
    source: String,
    client: reqwest::Client,
}

impl HttpCaller {
    pub fn new(step: HttpStep, pipeline: &str) -> HttpCaller {
        let client = reqwest::Client::builder()
            .timeout(step.timeout)
            .build()
            .expect("a reqwest client with a timeout always builds");
        HttpCaller {
            step,
            source: format!("orderflow/{pipeline}"),
            client,
        }
    }

    pub async fn call(&self, event: &AnyEvent) -> Result<AnyEvent, Failure> {
        let url = &self.step.url;
        let envelope = event.envelope();
        let response = self
            .client
            .post(url)
            .header("Idempotency-Key", envelope.event_id.to_string())
            .header("ce-type", event.event_type())
            .header("ce-id", envelope.event_id.to_string())
            .json(&event.to_json())
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    Failure::HttpTimeout {
                        url: url.clone(),
                        timeout_ms: self.step.timeout.as_millis(),
                    }
                } else {
                    let mut cause: &dyn std::error::Error = &e;
                    while let Some(next) = cause.source() {
                        cause = next;
                    }
                    Failure::HttpUnreachable {
                        url: url.clone(),
                        detail: cause.to_string(),
                    }
                }
            })?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(|e| Failure::HttpTimeout {
            url: format!("{url} (reading the answer: {e})"),
            timeout_ms: self.step.timeout.as_millis(),
        })?;
        match self.step.emits(status) {
            Some(event_type) => {
                let data: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
                    Failure::BusinessRule(format!(
                        "HTTP {status} from {url} is not JSON ({e}): {}",
                        excerpt(&body)
                    ))
                })?;
                Ok(AnyEvent::from_data(
                    event_type,
                    data,
                    &self.source,
                    envelope,
                )?)
            }
            None => Err(Failure::HttpStatus {
                url: url.clone(),
                status,
                body: excerpt(&body),
            }),
        }
    }
}

fn excerpt(body: &str) -> String {
    let mut end = body.len().min(BODY_EXCERPT);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    body[..end].to_string()
}
