//! The local contract: the `.avsc` files of `avro/`.
//!
//! Layout of the folder:
//! - `avro/common/*.avsc`: shared named types (envelope, money, address, order item), each
//!   defined once.
//! - `avro/<domain>/<event-type>.avsc`: one event each, e.g. `avro/order/order.created.avsc`.
//!   The file stem is the event type; it must start with the folder's domain.
//!
//! Every file holds exactly one named type with an explicit namespace. A file refers to a type
//! of another file by its full name (`"orderflow.common.Money"`). Before an event is registered
//! its references are expanded in place, so the registry stores a self-contained schema: any
//! Confluent-compatible client (kcat, Java, Python) can decode it by id alone, and the
//! registry's compatibility check sees the whole shape. A change to a shared type therefore
//! creates a new version of every event that uses it, which is exactly what it is on the wire.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use serde_json::{Map, Value};

/// One event contract, ready to register.
#[derive(Debug, Clone)]
pub struct EventSchema {
    /// Past-tense event type, e.g. `order.created` (the file stem).
    pub event_type: String,
    /// Avro full name of the event record, e.g. `orderflow.order.OrderCreated`.
    pub fullname: String,
    /// The file that declares it.
    pub file: PathBuf,
    /// The schema with every reference expanded, as JSON text (what the registry stores).
    pub expanded: String,
    /// The parsed form of `expanded`.
    pub schema: Schema,
    /// Avro's Parsing Canonical Form of `schema` (no docs, defaults or logical types).
    pub canonical: String,
}

/// Every type and event found under one folder.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub dir: PathBuf,
    /// Events in event-type order.
    pub events: Vec<EventSchema>,
}

/// A problem with one schema file; the catalog reports all of them at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogProblem {
    pub file: PathBuf,
    pub message: String,
}

impl fmt::Display for CatalogProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in the schemas of {}:\n  {}", .problems.len(), .dir.display(),
    .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct CatalogError {
    pub dir: PathBuf,
    pub problems: Vec<CatalogProblem>,
}

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

struct NamedType {
    file: PathBuf,
    json: Value,
}

impl Catalog {
    /// Loads every `.avsc` file below `dir`, resolves references between them and parses each
    /// event. Returns every problem found, not just the first.
    pub fn load(dir: impl AsRef<Path>) -> Result<Catalog, CatalogError> {
        let dir = dir.as_ref().to_path_buf();
        let mut problems = Vec::new();
        let mut files = Vec::new();
        if let Err(e) = collect_avsc(&dir, &mut files) {
            problems.push(CatalogProblem {
                file: dir.clone(),
                message: format!("cannot read the folder: {e}"),
            });
        }
        files.sort();

        let mut types: BTreeMap<String, NamedType> = BTreeMap::new();
        let mut event_files = Vec::new();
        for file in &files {
            let problem = |message: String| CatalogProblem {
                file: file.clone(),
                message,
            };
            let json = match std::fs::read_to_string(file)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()))
            {
                Ok(json) => json,
                Err(e) => {
                    problems.push(problem(format!("not valid JSON: {e}")));
                    continue;
                }
            };
            let fullname = match declared_fullname(&json) {
                Ok(name) => name,
                Err(message) => {
                    problems.push(problem(message));
                    continue;
                }
            };
            if let Some(previous) = types.get(&fullname) {
                problems.push(problem(format!(
                    "type {fullname} is already defined in {}",
                    previous.file.display()
                )));
                continue;
            }
            let in_common = file
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|d| d == "common");
            if !in_common {
                match event_type_of(file) {
                    Ok(event_type) => event_files.push((event_type, fullname.clone())),
                    Err(message) => problems.push(problem(message)),
                }
            }
            types.insert(
                fullname,
                NamedType {
                    file: file.clone(),
                    json,
                },
            );
        }

        let mut events = Vec::new();
        for (event_type, fullname) in event_files {
            let named = &types[&fullname];
            let mut defined = HashSet::new();
            let expanded = match expand(&named.json, "", &types, &mut defined) {
                Ok(v) => v,
                Err(message) => {
                    problems.push(CatalogProblem {
                        file: named.file.clone(),
                        message,
                    });
                    continue;
                }
            };
            let expanded = expanded.to_string();
            match Schema::parse_str(&expanded) {
                Ok(schema) => events.push(EventSchema {
                    event_type,
                    fullname,
                    file: named.file.clone(),
                    expanded,
                    canonical: schema.canonical_form(),
                    schema,
                }),
                Err(e) => problems.push(CatalogProblem {
                    file: named.file.clone(),
                    message: format!("not a valid Avro schema: {e}"),
                }),
            }
        }
        events.sort_by(|a, b| a.event_type.cmp(&b.event_type));

        if events.is_empty() && problems.is_empty() {
            problems.push(CatalogProblem {
                file: dir.clone(),
                message: "no event schemas (<domain>/<event-type>.avsc) found".into(),
            });
        }
        if problems.is_empty() {
            Ok(Catalog { dir, events })
        } else {
            Err(CatalogError { dir, problems })
        }
    }

    /// The event with this type, if the catalog has it.
    pub fn event(&self, event_type: &str) -> Option<&EventSchema> {
        self.events.iter().find(|e| e.event_type == event_type)
    }
}

fn collect_avsc(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_avsc(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "avsc") {
            out.push(path);
        }
    }
    Ok(())
}

fn declared_fullname(json: &Value) -> Result<String, String> {
    let obj = json
        .as_object()
        .ok_or("the file must hold one named type (a JSON object)")?;
    match obj.get("type").and_then(Value::as_str) {
        Some("record" | "enum" | "fixed") => {}
        _ => return Err("the top-level type must be a record, enum or fixed".into()),
    }
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or("the type has no \"name\"")?;
    if name.contains('.') {
        return Ok(name.to_string());
    }
    let namespace = obj
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .ok_or("the type has no \"namespace\"; every file needs one so others can refer to it")?;
    Ok(format!("{namespace}.{name}"))
}

fn event_type_of(file: &Path) -> Result<String, String> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or("file name is not UTF-8")?;
    let domain = file
        .parent()
        .and_then(Path::file_name)
        .and_then(|d| d.to_str())
        .unwrap_or_default();
    let valid = stem.split_once('.').is_some_and(|(d, event)| {
        d == domain
            && !event.is_empty()
            && event
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    });
    if valid {
        Ok(stem.to_string())
    } else {
        Err(format!(
            "event files are named <domain>/<domain>.<past-tense-event>.avsc in lower case \
             (e.g. order/order.created.avsc); '{stem}' in folder '{domain}' is not"
        ))
    }
}

/// Replaces each reference to a type of another file by that type's definition, the first time
/// it appears; later uses stay names, as Avro requires.
fn expand(
    json: &Value,
    namespace: &str,
    types: &BTreeMap<String, NamedType>,
    defined: &mut HashSet<String>,
) -> Result<Value, String> {
    match json {
        Value::String(name) => {
            if PRIMITIVES.contains(&name.as_str()) {
                return Ok(json.clone());
            }
            let fullname = if name.contains('.') || namespace.is_empty() {
                name.clone()
            } else {
                format!("{namespace}.{name}")
            };
            if defined.contains(&fullname) {
                return Ok(Value::String(fullname));
            }
            match types.get(&fullname).or_else(|| types.get(name)) {
                Some(named) => expand(&named.json, "", types, defined),
                None => Err(format!(
                    "unknown type '{name}': no .avsc file defines it (refer to shared types by full name, e.g. orderflow.common.Money)"
                )),
            }
        }
        Value::Array(branches) => branches
            .iter()
            .map(|b| expand(b, namespace, types, defined))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(obj) => {
            let mut out: Map<String, Value> = obj.clone();
            let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
            match kind {
                "record" | "error" | "enum" | "fixed" => {
                    let name = obj.get("name").and_then(Value::as_str).unwrap_or_default();
                    let ns = match obj.get("namespace").and_then(Value::as_str) {
                        Some(ns) => ns.to_string(),
                        None if name.contains('.') => {
                            name.rsplit_once('.').map(|(ns, _)| ns.to_string()).unwrap()
                        }
                        None => namespace.to_string(),
                    };
                    let fullname = if name.contains('.') || ns.is_empty() {
                        name.to_string()
                    } else {
                        format!("{ns}.{name}")
                    };
                    if !defined.insert(fullname.clone()) {
                        return Err(format!("type {fullname} is defined twice"));
                    }
                    // Inlined types keep their namespace so the names inside them still resolve.
                    if !ns.is_empty() && !name.contains('.') {
                        out.insert("namespace".into(), Value::String(ns.clone()));
                    }
                    if let Some(Value::Array(fields)) = obj.get("fields") {
                        let mut expanded_fields = Vec::with_capacity(fields.len());
                        for field in fields {
                            let mut field = field.clone();
                            if let Some(t) = field.get("type") {
                                let t = expand(t, &ns, types, defined).map_err(|e| {
                                    format!(
                                        "field '{}' of {fullname}: {e}",
                                        field.get("name").and_then(Value::as_str).unwrap_or("?")
                                    )
                                })?;
                                field["type"] = t;
                            }
                            expanded_fields.push(field);
                        }
                        out.insert("fields".into(), Value::Array(expanded_fields));
                    }
                }
                "array" => {
                    if let Some(items) = obj.get("items") {
                        out.insert("items".into(), expand(items, namespace, types, defined)?);
                    }
                }
                "map" => {
                    if let Some(values) = obj.get("values") {
                        out.insert("values".into(), expand(values, namespace, types, defined)?);
                    }
                }
                _ => {
                    // {"type": <primitive or reference>, "logicalType": ...}
                    if let Some(t) = obj.get("type") {
                        out.insert("type".into(), expand(t, namespace, types, defined)?);
                    }
                }
            }
            Ok(Value::Object(out))
        }
        _ => Err(format!("unexpected schema element {json}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("orderflow-catalog-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn repository_schemas_load_and_expand() {
        let catalog = Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/avro")).unwrap();
        let created = catalog
            .event("order.created")
            .expect("order.created is in avro/");
        assert_eq!(created.fullname, "orderflow.order.OrderCreated");
        // Money is used twice (unit price, total): defined at first use, named after that.
        assert_eq!(created.expanded.matches("\"name\":\"Money\"").count(), 1);
        assert!(created.expanded.contains("\"orderflow.common.Money\""));
        assert!(created.expanded.contains("\"name\":\"Envelope\""));
    }

    #[test]
    fn all_problems_are_reported_with_their_file() {
        let dir = temp_dir();
        write(
            &dir,
            "common/money.avsc",
            r#"{"type":"record","name":"Money","fields":[]}"#,
        );
        write(
            &dir,
            "order/order.created.avsc",
            r#"{"type":"record","name":"OrderCreated","namespace":"x","fields":[{"name":"m","type":"x.Nope"}]}"#,
        );
        write(
            &dir,
            "order/OrderShipped.avsc",
            r#"{"type":"record","name":"S","namespace":"x","fields":[]}"#,
        );
        write(&dir, "order/broken.avsc", "{not json");
        let err = Catalog::load(&dir).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 4, "{text}");
        assert!(
            text.contains("money.avsc: the type has no \"namespace\""),
            "{text}"
        );
        assert!(
            text.contains("order.created.avsc: field 'm' of x.OrderCreated: unknown type 'x.Nope'"),
            "{text}"
        );
        assert!(
            text.contains("OrderShipped.avsc: event files are named"),
            "{text}"
        );
        assert!(text.contains("broken.avsc: not valid JSON"), "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
