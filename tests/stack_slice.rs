//! The first vertical slice against the real stack (`scripts/stack up`): schemas registered in
//! Apicurio, an `order.created` event published in Confluent wire format and decoded by id.
//! Each test uses its own random topic and subject names.

mod common;

use common::{bootstrap, registry_url};

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use orderflow::contracts::{Catalog, EventCodec, OrderCreated, RegistryClient};
use orderflow::kafka::{self, Publisher};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};

fn unique(prefix: &str) -> String {
    format!("it-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

fn catalog() -> Arc<Catalog> {
    Arc::new(Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/avro")).unwrap())
}

#[tokio::test]
async fn registering_twice_keeps_id_and_version() {
    let registry = RegistryClient::new(&registry_url());
    let catalog = catalog();
    let schema = &catalog.event("order.created").unwrap().expanded;
    let subject = value_subject(&unique("register"));

    assert_eq!(registry.lookup(&subject, schema).await.unwrap(), None);
    let first = registry.register(&subject, schema).await.unwrap();
    let second = registry.register(&subject, schema).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first.version, 1);
    assert!(registry.subjects().await.unwrap().contains(&subject));
    let stored = registry.schema_by_id(first.id).await.unwrap().unwrap();
    let stored = apache_avro::Schema::parse_str(&stored).unwrap();
    assert_eq!(
        stored.canonical_form(),
        catalog
            .event("order.created")
            .unwrap()
            .schema
            .canonical_form()
    );
}

#[tokio::test]
async fn order_created_round_trips_in_confluent_wire_format() {
    let topic = unique("orders");
    kafka::ensure_topics(&bootstrap(), &[(&topic, 3)], 1)
        .await
        .unwrap();
    let codec = Arc::new(EventCodec::new(&registry_url(), catalog()).unwrap());
    let publisher = Publisher::new(&bootstrap(), codec.clone()).unwrap();
    let order = OrderCreated::sample("orderflow/test");
    publisher.publish(&topic, &order).await.unwrap();

    let consumer = kafka::consumer(&bootstrap(), &unique("group")).unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("the published record arrives within 30 s")
        .unwrap();

    // Key: the order id. Value: magic byte 0, the registered schema id, the Avro body.
    assert_eq!(
        message.key(),
        Some(order.data.order_id.to_string().as_bytes())
    );
    let payload = message.payload().unwrap();
    let registered = RegistryClient::new(&registry_url())
        .latest(&value_subject(&topic))
        .await
        .unwrap()
        .expect("publishing registered the topic's value subject");
    assert_eq!(payload[0], 0);
    assert_eq!(
        u32::from_be_bytes(payload[1..5].try_into().unwrap()),
        registered.id
    );

    let decoded: OrderCreated = codec.decode(Some(payload)).await.unwrap();
    assert_eq!(decoded, order);

    // The envelope is readable without Avro, as CloudEvents binary-mode headers.
    let headers = message.headers().unwrap();
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
    };
    assert_eq!(header("ce_id"), Some(order.envelope.event_id.to_string()));
    assert_eq!(header("ce_type").as_deref(), Some("order.created"));
    assert_eq!(header("ce_specversion").as_deref(), Some("1.0"));
    assert_eq!(
        header("ce_correlationid"),
        Some(order.envelope.correlation_id.to_string())
    );
}

#[tokio::test]
async fn kcat_reads_what_orderflow_published() {
    let topic = unique("kcat");
    kafka::ensure_topics(&bootstrap(), &[(&topic, 1)], 1)
        .await
        .unwrap();
    let codec = Arc::new(EventCodec::new(&registry_url(), catalog()).unwrap());
    let publisher = Publisher::new(&bootstrap(), codec).unwrap();
    let order = OrderCreated::sample("orderflow/test");
    let delivered = publisher.publish(&topic, &order).await.unwrap();

    let output = Command::new("kcat")
        .args([
            "-b",
            &bootstrap(),
            "-C",
            "-t",
            &topic,
            "-e",
            "-c",
            "1",
            "-f",
            "%k %p %o %h",
        ])
        .output()
        .expect("kcat is installed by scripts/stack");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8(output.stdout).unwrap();
    let expected = format!(
        "{} {} {} ",
        order.data.order_id, delivered.partition, delivered.offset
    );
    assert!(
        line.starts_with(&expected),
        "kcat printed {line:?}, expected {expected:?}..."
    );
    assert!(
        line.contains(&format!("ce_id={}", order.envelope.event_id)),
        "{line}"
    );
}

#[test]
fn cli_register_is_idempotent_and_lists_subjects() {
    let prefix = format!("{}.", unique("cli"));
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .args(args)
            .env("ORDERFLOW_TOPIC_PREFIX", &prefix)
            .env(
                "ORDERFLOW_SCHEMAS_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/avro"),
            )
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let subject = format!("{prefix}order.created-value");
    let dry = run(&["schemas", "register", "--dry-run"]);
    assert!(
        dry.lines()
            .any(|l| l.starts_with(&subject) && l.ends_with("would register")),
        "{dry}"
    );
    let first = run(&["schemas", "register"]);
    assert!(
        first
            .lines()
            .any(|l| l.starts_with(&subject) && l.ends_with("registered")),
        "{first}"
    );
    let second = run(&["schemas", "register"]);
    assert!(
        second
            .lines()
            .any(|l| l.starts_with(&subject) && l.ends_with("unchanged")),
        "{second}"
    );
    let id = |out: &str| {
        out.lines()
            .find(|l| l.starts_with(&subject))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    };
    assert_eq!(id(&first), id(&second));
    let list = run(&["schemas", "list"]);
    assert!(list.lines().any(|l| l.starts_with(&subject)), "{list}");
}
