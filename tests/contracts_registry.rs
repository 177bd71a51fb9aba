//! Event contracts against the real registry (`scripts/stack up`): schema evolution in both
//! directions, breaking changes refused by the registry and by `orderflow schemas check`, one
//! classified error for every kind of bad input, and decoding through a registry outage.
//! Subjects and topics are random per test.

mod common;

use common::{
    bootstrap, edited_avro, raw_payload, registry_url, with_gift_message, OrderCreatedV2,
    SwitchProxy,
};

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use orderflow::contracts::*;
use orderflow::kafka::{self, PublishError, Publisher};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{json, Value};

fn unique(prefix: &str) -> String {
    format!("it-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

const AVRO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/avro");

fn catalog_at(dir: &Path) -> Arc<Catalog> {
    Arc::new(Catalog::load(dir).unwrap())
}

fn orderflow(schemas_dir: &Path, prefix: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env("ORDERFLOW_SCHEMAS_DIR", schemas_dir)
        .env("ORDERFLOW_TOPIC_PREFIX", prefix)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn compatible_evolution_is_accepted_and_both_readers_decode_both_versions() {
    let topic = unique("evolve");
    let naming = Naming {
        topic_prefix: String::new(),
        strategy: SubjectStrategy::Topic,
    };
    let v1 = EventCodec::with_naming(&registry_url(), catalog_at(Path::new(AVRO)), naming.clone())
        .unwrap();
    let v2_dir = edited_avro(with_gift_message);
    let v2 = EventCodec::with_naming(&registry_url(), catalog_at(&v2_dir), naming).unwrap();
    let registry = RegistryClient::new(&registry_url());
    let subject = format!("{topic}-value");

    let order = OrderCreated::sample("orderflow/test");
    let v1_payload = v1.encode(&topic, &order).await.unwrap();
    registry
        .set_compatibility(&subject, "BACKWARD_TRANSITIVE")
        .await
        .unwrap();
    let order_v2 = OrderCreatedV2::from_v1(
        &OrderCreated::sample("orderflow/test"),
        Some("happy birthday"),
    );
    let v2_payload = v2.encode(&topic, &order_v2).await.unwrap();
    assert_eq!(
        registry.versions(&subject).await.unwrap(),
        vec![1, 2],
        "v2 was registered as a new version"
    );

    // Old reader, new data: the unknown field is dropped.
    let old_reads_new: OrderCreated = v1.decode(Some(&v2_payload)).await.unwrap();
    assert_eq!(old_reads_new.envelope, order_v2.envelope);
    assert_eq!(
        old_reads_new.data.order_id.to_string(),
        order_v2.data.order_id
    );
    assert_eq!(old_reads_new.data.items, order_v2.data.items);
    // New reader, old data: the missing field takes its default.
    let new_reads_old: OrderCreatedV2 = v2.decode(Some(&v1_payload)).await.unwrap();
    assert_eq!(
        new_reads_old,
        OrderCreatedV2 {
            envelope: order.envelope.clone(),
            ..OrderCreatedV2::from_v1(&order, None)
        }
    );
    // And each reader on its own data.
    let new_reads_new: OrderCreatedV2 = v2.decode(Some(&v2_payload)).await.unwrap();
    assert_eq!(
        new_reads_new.data.gift_message.as_deref(),
        Some("happy birthday")
    );
    assert_eq!(
        v1.decode::<OrderCreated>(Some(&v1_payload)).await.unwrap(),
        order
    );
    std::fs::remove_dir_all(v2_dir).unwrap();
}

#[tokio::test]
async fn cli_registers_every_event_idempotently_and_check_passes() {
    let prefix = format!("{}.", unique("all"));
    let avro = Path::new(AVRO);
    let first = orderflow(avro, &prefix, &["schemas", "register"]);
    assert!(first.status.success(), "{}", text(&first));
    let first_out = String::from_utf8_lossy(&first.stdout).to_string();
    let catalog = catalog_at(avro);
    assert_eq!(
        catalog.events.len(),
        orderflow::contracts::EVENT_TYPES.len()
    );
    for event in &catalog.events {
        let subject = format!("{prefix}{}-value", event.event_type);
        let line = first_out
            .lines()
            .find(|l| l.starts_with(&subject))
            .unwrap_or_else(|| panic!("{subject} missing:\n{first_out}"));
        assert!(line.ends_with("registered"), "{line}");
        let level = RegistryClient::new(&registry_url())
            .compatibility(&subject)
            .await
            .unwrap();
        assert_eq!(level, "BACKWARD_TRANSITIVE", "{subject}");
    }
    let again = orderflow(avro, &prefix, &["schemas", "register"]);
    assert!(again.status.success(), "{}", text(&again));
    let again_out = String::from_utf8_lossy(&again.stdout).to_string();
    assert_eq!(
        again_out
            .lines()
            .filter(|l| l.ends_with("unchanged"))
            .count(),
        orderflow::contracts::EVENT_TYPES.len(),
        "{again_out}"
    );
    // Same ids and versions the second time.
    let ids = |out: &str| -> Vec<String> {
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(ids(&first_out), ids(&again_out));

    let check = orderflow(avro, &prefix, &["schemas", "check"]);
    assert!(check.status.success(), "{}", text(&check));
    let dry = orderflow(
        avro,
        &format!("{}.", unique("dry")),
        &["schemas", "register", "--dry-run"],
    );
    assert!(dry.status.success(), "{}", text(&dry));
    assert_eq!(
        String::from_utf8_lossy(&dry.stdout)
            .lines()
            .filter(|l| l.ends_with("would register"))
            .count(),
        orderflow::contracts::EVENT_TYPES.len()
    );
}

/// Registers the repository's schemas under a fresh prefix, then runs `check` and `register`
/// against an edited copy. Returns (check output, register output).
fn breaking_change(level: &str, edit: impl FnOnce(&mut Vec<Value>)) -> (Output, Output) {
    let prefix = format!("{}.", unique("break"));
    let register = orderflow(
        Path::new(AVRO),
        &prefix,
        &["schemas", "register", "--compatibility", level],
    );
    assert!(register.status.success(), "{}", text(&register));
    let edited = edited_avro(edit);
    let check = orderflow(&edited, &prefix, &["schemas", "check"]);
    let register = orderflow(
        &edited,
        &prefix,
        &["schemas", "register", "--compatibility", level],
    );
    std::fs::remove_dir_all(edited).unwrap();
    (check, register)
}

#[test]
fn a_required_field_added_without_default_is_refused_with_its_name() {
    let (check, register) = breaking_change("BACKWARD_TRANSITIVE", |fields| {
        fields.push(json!({"name": "loyalty_tier", "type": "string"}));
    });
    assert!(!check.status.success(), "{}", text(&check));
    let out = text(&check);
    assert!(
        out.lines().any(|l| l.contains("order.created-value ")
            && l.contains("INCOMPATIBLE under BACKWARD_TRANSITIVE")),
        "{out}"
    );
    assert!(
        out.contains(
            "breaks BACKWARD_TRANSITIVE against version 1: field data.loyalty_tier: has no default"
        ),
        "{out}"
    );
    assert!(
        out.contains("would break their subject's compatibility rule"),
        "{out}"
    );
    // Every other subject is unchanged and said so.
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("unchanged (version 1)"))
            .count(),
        orderflow::contracts::EVENT_TYPES.len() - 1,
        "{out}"
    );
    // The registry itself refuses it, and says which field.
    assert!(!register.status.success(), "{}", text(&register));
    let out = text(&register);
    assert!(out.contains("REFUSED"), "{out}");
    assert!(out.contains("loyalty_tier"), "{out}");
}

#[test]
fn a_changed_field_type_is_refused_with_its_name() {
    let (check, register) = breaking_change("BACKWARD_TRANSITIVE", |fields| {
        let customer = fields
            .iter_mut()
            .find(|f| f["name"] == "customer_id")
            .unwrap();
        customer["type"] = json!("long");
    });
    assert!(!check.status.success(), "{}", text(&check));
    let out = text(&check);
    assert!(
        out.contains("field data.customer_id: type changed"),
        "{out}"
    );
    assert!(!register.status.success(), "{}", text(&register));
}

#[test]
fn a_removed_required_field_is_refused_where_old_readers_must_keep_working() {
    let remove_customer = |fields: &mut Vec<Value>| fields.retain(|f| f["name"] != "customer_id");
    // BACKWARD: the new reader simply ignores the old field, so removal is allowed.
    let (check, register) = breaking_change("BACKWARD_TRANSITIVE", remove_customer);
    assert!(check.status.success(), "{}", text(&check));
    assert!(register.status.success(), "{}", text(&register));
    // FULL: readers of version 1 still need the field, so removal breaks them.
    let (check, register) = breaking_change("FULL_TRANSITIVE", remove_customer);
    assert!(!check.status.success(), "{}", text(&check));
    let out = text(&check);
    assert!(out.contains("INCOMPATIBLE under FULL_TRANSITIVE"), "{out}");
    assert!(out.contains("field data.customer_id"), "{out}");
    assert!(!register.status.success(), "{}", text(&register));
}

#[tokio::test]
async fn every_bad_input_gets_its_own_classified_error() {
    let topic = unique("bad");
    let codec = EventCodec::new(&registry_url(), catalog_at(Path::new(AVRO))).unwrap();
    let good = codec
        .encode(&topic, &OrderCreated::sample("orderflow/test"))
        .await
        .unwrap();

    let mut truncated = good.clone();
    truncated.truncate(good.len() - 12);
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"\x02\x04junk");
    let mut unknown_id = good.clone();
    unknown_id[1..5].copy_from_slice(&2_000_000_000u32.to_be_bytes());
    let payment = payment_charged(100);
    let other_type = raw_payload(&unique("payments"), &payment, "payment.charged").await;
    let mut invalid = OrderCreated::sample("orderflow/test");
    invalid.data.items.clear();
    invalid.data.total.amount_minor = -1;
    let invalid = raw_payload(&unique("invalid"), &invalid, "order.created").await;

    let cases: Vec<(&str, Option<&[u8]>, &str)> = vec![
        ("tombstone", None, "empty_payload"),
        ("empty", Some(b""), "empty_payload"),
        ("short", Some(b"\x00\x00\x01"), "short_payload"),
        ("wrong magic", Some(b"{\"order\":1}"), "wrong_magic_byte"),
        ("unknown schema id", Some(&unknown_id), "unknown_schema_id"),
        ("truncated body", Some(&truncated), "corrupt_body"),
        ("trailing bytes", Some(&trailing), "corrupt_body"),
        (
            "another event type",
            Some(&other_type),
            "incompatible_writer",
        ),
        ("semantically invalid", Some(&invalid), "validation_failed"),
    ];
    for (name, payload, kind) in cases {
        let err = codec.decode::<OrderCreated>(payload).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{name}: {err}");
        assert!(!err.is_retryable(), "{name} must be permanent: {err}");
    }
    let err = codec
        .decode::<OrderCreated>(Some(&invalid))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("data.items: must hold at least one item"),
        "{text}"
    );
    assert!(
        text.contains("data.total.amount_minor: must be between 0"),
        "{text}"
    );
    let err = codec
        .decode::<OrderCreated>(Some(&other_type))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "(orderflow.payment.PaymentCharged) cannot be read as orderflow.order.OrderCreated"
        ),
        "{err}"
    );

    // The registry unreachable is the one retryable case.
    let offline = EventCodec::new(
        "http://127.0.0.1:9/apis/ccompat/v7",
        catalog_at(Path::new(AVRO)),
    )
    .unwrap();
    let err = offline
        .decode::<OrderCreated>(Some(&good))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "registry_unavailable", "{err}");
    assert!(err.is_retryable(), "{err}");
}

/// A valid payment.charged event of `amount_minor` euro cents.
fn payment_charged(amount_minor: i64) -> PaymentCharged {
    PaymentCharged {
        envelope: Envelope::new::<PaymentCharged>("orderflow/test", uuid::Uuid::now_v7(), None),
        data: PaymentChargedData {
            order_id: uuid::Uuid::now_v7(),
            payment_id: uuid::Uuid::now_v7(),
            amount: Money {
                amount_minor,
                currency: "EUR".into(),
            },
        },
    }
}

#[tokio::test]
async fn decoding_goes_on_from_the_cache_when_the_registry_goes_away() {
    let topic = unique("outage");
    let catalog = catalog_at(Path::new(AVRO));
    let direct = EventCodec::new(&registry_url(), catalog.clone()).unwrap();
    let order = OrderCreated::sample("orderflow/test");
    let payload = direct.encode(&topic, &order).await.unwrap();
    let payment = payment_charged(2500);
    let never_seen = direct
        .encode(&unique("outage-payments"), &payment)
        .await
        .unwrap();

    let proxy = SwitchProxy::start(&registry_url()).await;
    let through_proxy = EventCodec::new(&proxy.url, catalog).unwrap();
    assert_eq!(
        through_proxy
            .decode::<OrderCreated>(Some(&payload))
            .await
            .unwrap(),
        order
    );
    proxy.down();

    // Warm: the writer schema is cached by id.
    for _ in 0..3 {
        assert_eq!(
            through_proxy
                .decode::<OrderCreated>(Some(&payload))
                .await
                .unwrap(),
            order
        );
    }
    // Cold: a schema id never seen before cannot be fetched, and that is retryable.
    let err = through_proxy
        .decode::<PaymentCharged>(Some(&never_seen))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "registry_unavailable", "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn an_invalid_event_is_refused_before_anything_is_sent() {
    let topic = unique("refused");
    kafka::ensure_topics(&bootstrap(), &[(&topic, 1)], 1)
        .await
        .unwrap();
    let codec = Arc::new(EventCodec::new(&registry_url(), catalog_at(Path::new(AVRO))).unwrap());
    let publisher = Publisher::new(&bootstrap(), codec).unwrap();
    let mut order = OrderCreated::sample("orderflow/test");
    order.data.items[0].quantity = -3;
    order.envelope.event_type = "order.placed".into();

    let err = publisher.publish(&topic, &order).await.unwrap_err();
    let PublishError::Encode(EncodeError::Invalid(invalid)) = &err else {
        panic!("expected a validation error, got {err}");
    };
    let fields: Vec<&str> = invalid
        .violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert!(fields.contains(&"envelope.event_type"), "{err}");
    assert!(fields.contains(&"data.items[0].quantity"), "{err}");

    let consumer: BaseConsumer = kafka::consumer_config(&bootstrap(), &unique("g"))
        .create()
        .unwrap();
    let (low, high) = consumer
        .fetch_watermarks(&topic, 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!((low, high), (0, 0), "nothing was written to {topic}");
    // No subject was registered either: the event never reached the encoder.
    let subjects = RegistryClient::new(&registry_url())
        .subjects()
        .await
        .unwrap();
    assert!(!subjects.contains(&format!("{topic}-value")));
}

#[test]
fn expanded_schemas_are_self_contained_for_other_clients() {
    // Any Confluent client must be able to parse what we register without our .avsc files.
    for event in &catalog_at(Path::new(AVRO)).events {
        Schema::parse_str(&event.expanded).unwrap_or_else(|e| panic!("{}: {e}", event.event_type));
        assert!(
            event.expanded.contains("\"name\":\"Envelope\""),
            "{}",
            event.event_type
        );
    }
}
