//! Explains why a schema change breaks a compatibility rule. The registry decides (it is the
//! gate); this names the field and the rule so a person can act on it. The registry's own
//! answer to a compatibility check carries no detail.

use apache_avro::error::CompatibilityError;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

/// What a compatibility level checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// New readers must read data written with older schemas.
    pub backward: bool,
    /// Older readers must read data written with the new schema.
    pub forward: bool,
    /// Against every earlier version, not just the latest.
    pub transitive: bool,
}

impl Level {
    pub fn parse(level: &str) -> Option<Level> {
        let (backward, forward) = match level.trim_end_matches("_TRANSITIVE") {
            "BACKWARD" => (true, false),
            "FORWARD" => (false, true),
            "FULL" => (true, true),
            "NONE" => (false, false),
            _ => return None,
        };
        Some(Level {
            backward,
            forward,
            transitive: level.ends_with("_TRANSITIVE"),
        })
    }
}

/// One way a new schema breaks the rule against one registered version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    /// The subject's compatibility level, e.g. BACKWARD_TRANSITIVE.
    pub rule: String,
    pub version: u32,
    /// "new readers cannot read data written with version 2" or the forward counterpart.
    pub direction: &'static str,
    /// Dotted path of the offending field (`data.total.amount_minor`), or `(record)`.
    pub field: String,
    pub problem: String,
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "breaks {} against version {}: field {}: {} ({})",
            self.rule, self.version, self.field, self.problem, self.direction
        )
    }
}

/// Every breach of `rule` by `new` against the registered `versions` (oldest first).
pub fn explain(rule: &str, new: &Schema, versions: &[(u32, Schema)]) -> Vec<Breach> {
    let Some(level) = Level::parse(rule) else {
        return Vec::new();
    };
    let against: &[(u32, Schema)] = if level.transitive || versions.is_empty() {
        versions
    } else {
        &versions[versions.len() - 1..]
    };
    let mut breaches = Vec::new();
    for (version, old) in against {
        if level.backward {
            if let Err(e) = SchemaCompatibility::can_read(old, new) {
                breaches.push(breach(
                    rule,
                    *version,
                    "new readers could not read data written with the registered version",
                    &e,
                ));
            }
        }
        if level.forward {
            if let Err(e) = SchemaCompatibility::can_read(new, old) {
                breaches.push(breach(
                    rule,
                    *version,
                    "readers on the registered version could not read new data",
                    &e,
                ));
            }
        }
    }
    breaches
}

fn breach(rule: &str, version: u32, direction: &'static str, error: &CompatibilityError) -> Breach {
    let mut path = Vec::new();
    let mut error = error;
    let problem = loop {
        match error {
            CompatibilityError::FieldTypeMismatch(field, inner) => {
                path.push(field.clone());
                error = inner;
            }
            CompatibilityError::MissingDefaultValue(field) => {
                path.push(field.clone());
                break "has no default, so data without it cannot be read; give it a default \
                       (e.g. a union with null and \"default\": null) or keep the field"
                    .to_string();
            }
            CompatibilityError::WrongType {
                writer_schema_type,
                reader_schema_type,
            } => {
                break format!(
                    "type changed: written as {writer_schema_type}, read as {reader_schema_type}"
                )
            }
            other => break other.to_string(),
        }
    };
    Breach {
        rule: rule.to_string(),
        version,
        direction,
        field: if path.is_empty() {
            "(record)".into()
        } else {
            path.join(".")
        },
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"E","fields":[{{"name":"data","type":{{"type":"record","name":"D","fields":[{fields}]}}}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn added_field_without_default_breaks_backward_and_names_the_field() {
        let v1 = schema(r#"{"name":"a","type":"string"}"#);
        let v2 = schema(r#"{"name":"a","type":"string"},{"name":"b","type":"int"}"#);
        let breaches = explain("BACKWARD_TRANSITIVE", &v2, &[(1, v1.clone())]);
        assert_eq!(breaches.len(), 1, "{breaches:?}");
        assert_eq!(breaches[0].field, "data.b");
        assert_eq!(breaches[0].version, 1);
        assert!(breaches[0].to_string().starts_with(
            "breaks BACKWARD_TRANSITIVE against version 1: field data.b: has no default"
        ));
        // With a default it is fine.
        let v2 = schema(
            r#"{"name":"a","type":"string"},{"name":"b","type":["null","int"],"default":null}"#,
        );
        assert!(explain("BACKWARD_TRANSITIVE", &v2, &[(1, v1)]).is_empty());
    }

    #[test]
    fn removed_field_breaks_forward_only() {
        let v1 = schema(r#"{"name":"a","type":"string"},{"name":"b","type":"int"}"#);
        let v2 = schema(r#"{"name":"a","type":"string"}"#);
        assert!(explain("BACKWARD", &v2, &[(1, v1.clone())]).is_empty());
        let breaches = explain("FULL_TRANSITIVE", &v2, &[(1, v1)]);
        assert_eq!(breaches.len(), 1, "{breaches:?}");
        assert_eq!(breaches[0].field, "data.b");
    }

    #[test]
    fn type_change_names_the_field_and_both_types() {
        let v1 = schema(r#"{"name":"a","type":"string"}"#);
        let v2 = schema(r#"{"name":"a","type":"long"}"#);
        let breaches = explain("BACKWARD", &v2, &[(1, v1)]);
        assert_eq!(breaches[0].field, "data.a");
        assert!(
            breaches[0].problem.contains("type changed"),
            "{}",
            breaches[0]
        );
    }

    #[test]
    fn non_transitive_levels_check_the_latest_version_only() {
        let v1 = schema(r#"{"name":"a","type":"string"}"#);
        let v2 = schema(r#"{"name":"a","type":"string"},{"name":"b","type":"int","default":0}"#);
        let v3 = schema(r#"{"name":"b","type":"int","default":0}"#);
        // v3 reads v2 and v1 data (a is dropped, b defaults): fine both ways backward.
        assert!(explain(
            "BACKWARD_TRANSITIVE",
            &v3,
            &[(1, v1.clone()), (2, v2.clone())]
        )
        .is_empty());
        // Forward: v1 readers need a, which v3 lacks; the latest-only check sees v2, which also needs a.
        assert_eq!(
            explain("FORWARD", &v3, &[(1, v1.clone()), (2, v2.clone())]).len(),
            1
        );
        assert_eq!(
            explain("FORWARD_TRANSITIVE", &v3, &[(1, v1), (2, v2)]).len(),
            2
        );
    }
}
