//! One source of truth: the `.avsc` files are the contract, and each Rust event type must have
//! exactly their shape. The Avro schema implied by a type's serde form is compared, in Avro's
//! Parsing Canonical Form (names, field order, types), with the schema of its file.

use std::collections::{BTreeMap, HashSet};

use apache_avro::Schema;
use orderflow::contracts::*;
use serde_json::{json, Value};
use serde_reflection::{ContainerFormat, Format, Registry, Tracer, TracerConfig};

fn catalog() -> Catalog {
    Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/avro")).unwrap()
}

/// Simple record name -> full name, for every record inside an event schema.
fn record_names(schema: &Schema, out: &mut BTreeMap<String, String>) {
    match schema {
        Schema::Record(record) => {
            out.insert(record.name.name().to_string(), record.name.fullname(None));
            for field in &record.fields {
                record_names(&field.schema, out);
            }
        }
        Schema::Array(array) => record_names(&array.items, out),
        Schema::Map(map) => record_names(&map.types, out),
        Schema::Union(union) => union.variants().iter().for_each(|v| record_names(v, out)),
        _ => {}
    }
}

fn to_avro(
    format: &Format,
    registry: &Registry,
    names: &BTreeMap<String, String>,
    defined: &mut HashSet<String>,
) -> Value {
    match format {
        Format::Str => json!("string"),
        Format::I32 => json!("int"),
        Format::I64 => json!("long"),
        Format::Bool => json!("boolean"),
        Format::F32 => json!("float"),
        Format::F64 => json!("double"),
        Format::Bytes => json!("bytes"),
        Format::Option(inner) => json!(["null", to_avro(inner, registry, names, defined)]),
        Format::Seq(inner) => {
            json!({"type": "array", "items": to_avro(inner, registry, names, defined)})
        }
        Format::Map { key, value } if **key == Format::Str => {
            json!({"type": "map", "values": to_avro(value, registry, names, defined)})
        }
        Format::TypeName(name) => {
            let fullname = names.get(name).unwrap_or_else(|| {
                panic!("Rust struct {name} has no record of that name in the event's .avsc")
            });
            if !defined.insert(fullname.clone()) {
                return json!(fullname);
            }
            let Some(ContainerFormat::Struct(fields)) = registry.get(name) else {
                panic!("{name} is not a plain struct; events use structs only")
            };
            let fields: Vec<Value> = fields
                .iter()
                .map(|f| json!({"name": f.name, "type": to_avro(&f.value, registry, names, defined)}))
                .collect();
            json!({"type": "record", "name": fullname, "fields": fields})
        }
        other => panic!("no Avro counterpart for serde format {other:?}"),
    }
}

/// The spec's canonical form reduces a logical type to its primitive name; apache-avro leaves
/// `{"type":"string"}` for `{"type":"string","logicalType":"uuid"}`. Both mean the same shape.
fn canonical(schema: &Schema) -> String {
    let mut text = schema.canonical_form();
    for primitive in ["string", "long", "int", "bytes"] {
        text = text.replace(
            &format!(r#"{{"type":"{primitive}"}}"#),
            &format!(r#""{primitive}""#),
        );
    }
    text
}

fn assert_matches_file<E: Event>(catalog: &Catalog) {
    let file = catalog
        .event(E::EVENT_TYPE)
        .unwrap_or_else(|| panic!("no .avsc for {}", E::EVENT_TYPE));
    let mut names = BTreeMap::new();
    record_names(&file.schema, &mut names);
    // Ids are parsed as UUIDs while tracing, so the sample string must be one.
    let config = TracerConfig::default()
        .default_string_value("01890000-0000-7000-8000-000000000000".to_string());
    let mut tracer = Tracer::new(config);
    let (format, _) = tracer.trace_simple_type::<E>().unwrap();
    let registry = tracer.registry().unwrap();
    let derived = to_avro(&format, &registry, &names, &mut HashSet::new());
    let derived = Schema::parse_str(&derived.to_string()).unwrap();
    assert_eq!(
        canonical(&derived),
        canonical(&file.schema),
        "the Rust type of {} has drifted from {}",
        E::EVENT_TYPE,
        file.file.display()
    );
}

#[test]
fn every_rust_event_type_matches_its_avsc() {
    let catalog = catalog();
    assert_matches_file::<OrderCreated>(&catalog);
    assert_matches_file::<OrderConfirmed>(&catalog);
    assert_matches_file::<OrderCancelled>(&catalog);
    assert_matches_file::<PaymentCharged>(&catalog);
    assert_matches_file::<PaymentFailed>(&catalog);
    assert_matches_file::<PaymentRefunded>(&catalog);
    assert_matches_file::<InventoryReserved>(&catalog);
    assert_matches_file::<InventoryReservationFailed>(&catalog);
    assert_matches_file::<InventoryReleased>(&catalog);
    assert_matches_file::<NotificationSent>(&catalog);
    assert_matches_file::<InventoryReservationRequested>(&catalog);
    assert_matches_file::<InventoryReleaseRequested>(&catalog);
    assert_matches_file::<PaymentChargeRequested>(&catalog);
    assert_matches_file::<PaymentRefundRequested>(&catalog);
    assert_matches_file::<ShipmentSchedulingRequested>(&catalog);
    assert_matches_file::<ShipmentScheduled>(&catalog);
    assert_matches_file::<ShipmentSchedulingFailed>(&catalog);
}

#[test]
fn every_avsc_event_has_a_rust_type() {
    let types = [
        OrderCreated::EVENT_TYPE,
        OrderConfirmed::EVENT_TYPE,
        OrderCancelled::EVENT_TYPE,
        PaymentCharged::EVENT_TYPE,
        PaymentFailed::EVENT_TYPE,
        PaymentRefunded::EVENT_TYPE,
        InventoryReserved::EVENT_TYPE,
        InventoryReservationFailed::EVENT_TYPE,
        InventoryReleased::EVENT_TYPE,
        NotificationSent::EVENT_TYPE,
        InventoryReservationRequested::EVENT_TYPE,
        InventoryReleaseRequested::EVENT_TYPE,
        PaymentChargeRequested::EVENT_TYPE,
        PaymentRefundRequested::EVENT_TYPE,
        ShipmentSchedulingRequested::EVENT_TYPE,
        ShipmentScheduled::EVENT_TYPE,
        ShipmentSchedulingFailed::EVENT_TYPE,
    ];
    let catalog = catalog();
    let files: Vec<&str> = catalog
        .events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    let mut expected = types.to_vec();
    expected.sort_unstable();
    assert_eq!(files, expected);
}

/// The check itself must be able to fail: a Rust type with one field more than its file.
#[test]
fn a_drifted_type_is_caught() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct OrderCancelled {
        envelope: Envelope,
        data: OrderCancelledData,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    struct OrderCancelledData {
        #[serde(with = "uuid_text")]
        order_id: uuid::Uuid,
        reason: String,
        refund_due: bool,
    }
    mod uuid_text {
        pub fn serialize<S: serde::Serializer>(id: &uuid::Uuid, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&id.to_string())
        }
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<uuid::Uuid, D::Error> {
            let text = <String as serde::Deserialize>::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        }
    }
    impl Event for OrderCancelled {
        const EVENT_TYPE: &'static str = "order.cancelled";
        const SCHEMA_VERSION: i32 = 1;
        fn envelope(&self) -> &Envelope {
            &self.envelope
        }
        fn key(&self) -> String {
            self.data.order_id.to_string()
        }
        fn check_data(&self, _: &mut orderflow::contracts::validate::Violations) {}
    }
    let drifted = std::panic::catch_unwind(|| assert_matches_file::<OrderCancelled>(&catalog()));
    let message = *drifted.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("has drifted from"), "{message}");
    assert!(message.contains("refund_due"), "{message}");
}
