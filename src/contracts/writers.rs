//! Writer schemas by id: fetched from the registry once, then served from memory.
//!
//! Invariant: however many records miss the cache for one id at once, one request is made and
//! every one of them gets its answer; a failed fetch is not kept (the next miss fetches again);
//! a schema once cached stays (a registry outage after warm-up does not stop decoding).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::future::{BoxFuture, FutureExt, Shared};

use apache_avro::Schema;

use super::codec::DecodeError;
use super::registry::{RegistryClient, RegistryError};

/// A writer schema fetched once by id.
pub struct WriterSchema {
    pub schema: Schema,
    pub name: String,
    pub canonical: String,
    /// The same schema for the direct path; `None` if that parser refuses it (the generic path
    /// still reads it).
    pub direct: Option<serde_avro_fast::Schema>,
}

impl WriterSchema {
    pub fn new(id: u32, schema: Schema) -> WriterSchema {
        let canonical = schema.canonical_form();
        let direct = match canonical.parse::<serde_avro_fast::Schema>() {
            Ok(direct) => Some(direct),
            Err(e) => {
                tracing::debug!("schema {id} is read by the generic decoder only: {e}");
                None
            }
        };
        WriterSchema {
            name: record_name(&schema),
            canonical,
            schema,
            direct,
        }
    }
}

fn record_name(schema: &Schema) -> String {
    match schema {
        Schema::Record(record) => record.name.fullname(None),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)),
    }
}

/// One writer schema's fetch from the registry, awaited by every lookup that missed the cache
/// while it runs: a task of its own, so a lookup that gives up (an inline attempt, a revoked
/// record) does not cancel it for the others. It ends with the schema (then cached) or the
/// error they all get.
type Fetch = Shared<BoxFuture<'static, Result<Arc<WriterSchema>, DecodeError>>>;

type Cache = Arc<RwLock<HashMap<u32, Arc<WriterSchema>>>>;

/// The writer schemas seen so far, and those being fetched.
#[derive(Default)]
pub struct WriterSchemas {
    cached: Cache,
    /// Fetches under way, by schema id: a backlog of records with a new writer schema makes one
    /// request, not one per record. A fetch takes itself out when it ends.
    fetching: Arc<Mutex<HashMap<u32, Fetch>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl WriterSchemas {
    /// Lookups so far: (served from the cache or by a fetch already under way, fetched from the
    /// registry).
    pub fn lookups(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Caches `schema` under `id`.
    pub fn insert(&self, id: u32, schema: Schema) -> Arc<WriterSchema> {
        cache(&self.cached, id, schema)
    }

    /// The writer schema `id`, from the cache or fetched from `registry` once for every lookup
    /// waiting for it. Needs a tokio runtime (the fetch is a task).
    pub async fn get(
        &self,
        id: u32,
        registry: &RegistryClient,
    ) -> Result<Arc<WriterSchema>, DecodeError> {
        if let Some(found) = self.cached.read().expect("cache lock").get(&id) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(found.clone());
        }
        let fetch = {
            let mut fetching = self.fetching.lock().expect("fetching lock");
            // Looked at again under the lock: a fetch caches before it takes itself out.
            if let Some(found) = self.cached.read().expect("cache lock").get(&id) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(found.clone());
            }
            match fetching.get(&id) {
                Some(fetch) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    fetch.clone()
                }
                None => {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    let fetch = self.start_fetch(id, registry.clone());
                    fetching.insert(id, fetch.clone());
                    fetch
                }
            }
        };
        fetch.await
    }

    /// Starts fetching `id` as a task that caches the schema, then takes itself out of
    /// `fetching` (also when it fails or panics), so a later miss after an error fetches again.
    fn start_fetch(&self, id: u32, registry: RegistryClient) -> Fetch {
        let (cached, fetching) = (self.cached.clone(), self.fetching.clone());
        let task = tokio::spawn(async move {
            let _out = TakenOut { fetching, id };
            let schema = fetch(id, &registry).await?;
            Ok(cache(&cached, id, schema))
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(DecodeError::RegistryUnavailable {
                    id,
                    detail: format!("the fetch of the schema stopped: {e}"),
                })
            })
        }
        .boxed()
        .shared()
    }
}

/// Takes a fetch out of the fetches under way when its task ends, however it ends.
struct TakenOut {
    fetching: Arc<Mutex<HashMap<u32, Fetch>>>,
    id: u32,
}

impl Drop for TakenOut {
    fn drop(&mut self) {
        // A poisoned lock (a panic elsewhere while holding it) still holds a usable map.
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        fetching.remove(&self.id);
    }
}

fn cache(cached: &Cache, id: u32, schema: Schema) -> Arc<WriterSchema> {
    let writer = Arc::new(WriterSchema::new(id, schema));
    cached
        .write()
        .expect("cache lock")
        .insert(id, writer.clone());
    writer
}

/// Fetches and parses the writer schema `id`.
async fn fetch(id: u32, registry: &RegistryClient) -> Result<Schema, DecodeError> {
    let text = match registry.schema_by_id(id).await {
        Ok(Some(text)) => text,
        Ok(None) => return Err(DecodeError::UnknownSchemaId { id }),
        Err(e @ RegistryError::Refused { status: 404, .. }) => {
            tracing::debug!("schema {id}: {e}");
            return Err(DecodeError::UnknownSchemaId { id });
        }
        Err(e) if e.is_retryable() => {
            return Err(DecodeError::RegistryUnavailable {
                id,
                detail: e.to_string(),
            })
        }
        Err(e) => {
            return Err(DecodeError::UnusableSchema {
                id,
                detail: e.to_string(),
            })
        }
    };
    let schema = Schema::parse_str(&text).map_err(|e| DecodeError::UnusableSchema {
        id,
        detail: e.to_string(),
    })?;
    Ok(schema)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::Catalog;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A registry whose `GET /schemas/ids/{id}` counts its requests and answers after 300 ms,
    /// with order.created's schema while `known` is true, else 404.
    async fn slow_registry(
        known: Arc<std::sync::atomic::AtomicBool>,
    ) -> (String, Arc<AtomicUsize>) {
        use axum::{extract::Path, routing::get, Router};
        let requests = Arc::new(AtomicUsize::new(0));
        let avro = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/avro"));
        let schema = Catalog::load(avro)
            .unwrap()
            .event("order.created")
            .unwrap()
            .schema
            .canonical_form();
        let counted = requests.clone();
        let app = Router::new().route(
            "/schemas/ids/{id}",
            get(move |Path(_id): Path<u32>| {
                counted.fetch_add(1, Ordering::SeqCst);
                let (schema, known) = (schema.clone(), known.load(Ordering::SeqCst));
                async move {
                    // Long enough for every lookup below to miss the cache while it runs.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if known {
                        (
                            axum::http::StatusCode::OK,
                            serde_json::json!({ "schema": schema }).to_string(),
                        )
                    } else {
                        (
                            axum::http::StatusCode::NOT_FOUND,
                            r#"{"error_code":40403}"#.to_string(),
                        )
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, requests)
    }

    /// The cache and the registry it fetches from, shared by the lookups of a test.
    type Shared = Arc<(WriterSchemas, RegistryClient)>;

    fn schemas(url: &str) -> Shared {
        Arc::new((WriterSchemas::default(), RegistryClient::new(url)))
    }

    /// Looks schema 7 up from `n` tasks at once.
    async fn look_up_together(shared: &Shared, n: usize) -> Vec<Result<String, DecodeError>> {
        let lookups: Vec<_> = (0..n)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let (schemas, registry) = &*shared;
                    schemas.get(7, registry).await.map(|w| w.name.clone())
                })
            })
            .collect();
        futures::future::join_all(lookups)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_missing_one_writer_schema_together_fetch_it_once() {
        let (url, requests) = slow_registry(Arc::new(true.into())).await;
        let shared = schemas(&url);
        let names = look_up_together(&shared, 200).await;
        assert!(
            names
                .iter()
                .all(|n| n.as_ref().is_ok_and(|n| n.ends_with("OrderCreated"))),
            "{names:?}"
        );
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "one request for 200 lookups"
        );
        let (schemas, registry) = &*shared;
        assert_eq!(schemas.lookups(), (199, 1));
        schemas.get(7, registry).await.unwrap();
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "then served from the cache"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lookup_cancelled_mid_fetch_leaves_the_fetch_to_the_others() {
        let (url, requests) = slow_registry(Arc::new(true.into())).await;
        let shared = schemas(&url);
        let lookup = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let (schemas, registry) = &*shared;
                schemas.get(7, registry).await.map(|_| ())
            })
        };
        // Cancelled once the registry has the request (it answers 300 ms later).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while requests.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the fetch never started"
            );
            tokio::task::yield_now().await;
        }
        lookup.abort();
        assert!(lookup.await.unwrap_err().is_cancelled());
        let (schemas, registry) = &*shared;
        schemas
            .get(7, registry)
            .await
            .expect("answered by the same fetch");
        assert_eq!(requests.load(Ordering::SeqCst), 1, "one request in all");
        assert_eq!(schemas.lookups(), (1, 1));
        assert!(
            schemas.fetching.lock().unwrap().is_empty(),
            "no id left behind"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fetch_answers_its_waiters_and_is_not_kept() {
        let known = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (url, requests) = slow_registry(known.clone()).await;
        let shared = schemas(&url);
        let answers = look_up_together(&shared, 50).await;
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(DecodeError::UnknownSchemaId { id: 7 }))),
            "{answers:?}"
        );
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "one request for 50 lookups"
        );
        known.store(true, Ordering::SeqCst);
        let (schemas, registry) = &*shared;
        schemas
            .get(7, registry)
            .await
            .expect("fetched again once the registry knows it");
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }
}
