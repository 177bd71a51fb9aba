//! Fuzzing (proptest) of what reads untrusted bytes: the Confluent wire-format split, the Avro
//! decoder behind a cached writer schema, and the failure headers of retry records. No input may
//! panic; each must give a value or a classified error. proptest keeps any failing input in
//! `proptest-regressions/fuzz.txt`, which is committed and replayed first on every run, so a
//! crash found once stays a regression test. Runs offline (no registry): the writer schema is
//! preloaded. ORDERFLOW_FUZZ_CASES sets the cases per target (default 10000, about 2 s).

use std::path::Path;
use std::sync::Arc;

use orderflow::contracts::codec::split_wire_format;
use orderflow::contracts::{Catalog, DecodeError, EventCodec, OrderCreated};
use orderflow::kafka::headers::FailureContext;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use rdkafka::message::{Header, Headers, OwnedHeaders};

const ID: u32 = 7;

fn cases() -> u32 {
    std::env::var("ORDERFLOW_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// A codec whose registry is never reached: order.created's schema is cached under `ID`.
/// Built once: loading the catalog costs more than a decode.
fn offline_codec() -> &'static EventCodec {
    static CODEC: std::sync::OnceLock<EventCodec> = std::sync::OnceLock::new();
    CODEC.get_or_init(build_offline_codec)
}

fn build_offline_codec() -> EventCodec {
    let catalog =
        Arc::new(Catalog::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/avro"))).unwrap());
    let schema = catalog.event("order.created").unwrap().expanded.clone();
    // Port 9 (discard): any registry call would fail fast rather than hang.
    let codec = EventCodec::new("http://127.0.0.1:9/apis/ccompat/v7", catalog).unwrap();
    codec.preload_writer_schema(ID, &schema).unwrap();
    codec
}

/// A valid framed order.created, encoded without a registry (built once).
fn valid_payload() -> Vec<u8> {
    static PAYLOAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PAYLOAD.get_or_init(build_valid_payload).clone()
}

fn build_valid_payload() -> Vec<u8> {
    let catalog = Catalog::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/avro"))).unwrap();
    let schema = &catalog.event("order.created").unwrap().schema;
    let value = apache_avro::to_value(OrderCreated::sample("fuzz"))
        .unwrap()
        .resolve(schema)
        .unwrap();
    let mut payload = vec![0];
    payload.extend_from_slice(&ID.to_be_bytes());
    payload.extend(
        apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap(),
    );
    payload
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn classified(result: Result<OrderCreated, DecodeError>) {
    if let Err(e) = result {
        assert!(
            matches!(
                e.kind(),
                "empty_payload"
                    | "short_payload"
                    | "wrong_magic_byte"
                    | "unknown_schema_id"
                    | "registry_unavailable"
                    | "corrupt_body"
                    | "incompatible_writer"
                    | "validation_failed"
            ),
            "unexpected kind {}: {e}",
            e.kind()
        );
        assert!(!e.to_string().is_empty());
    }
}

/// 10,000 cases per target (or ORDERFLOW_FUZZ_CASES); failures persist in the named file.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Integration tests have no lib.rs beside them: name the file.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/fuzz.txt"
        )))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_wire_header_split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let result = split_wire_format(Some(&bytes));
        // A header with an empty body is refused too (found by this target: [0, 0, 0, 0, 0]).
        prop_assert_eq!(result.is_ok(), bytes.len() > 5 && bytes[0] == 0);
        if let Ok((id, body)) = result {
            prop_assert_eq!(id, u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]));
            prop_assert_eq!(body, &bytes[5..]);
        }
    }

    #[test]
    fn arbitrary_bodies_behind_a_known_schema_id_decode_or_fail_classified(
        body in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let codec = offline_codec();
        let mut payload = vec![0];
        payload.extend_from_slice(&ID.to_be_bytes());
        payload.extend(body);
        classified(runtime().block_on(codec.decode::<OrderCreated>(Some(&payload))));
    }

    #[test]
    fn mutated_valid_payloads_decode_or_fail_classified(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let codec = offline_codec();
        let mut payload = valid_payload();
        for (at, byte) in flips {
            let i = 5 + at.index(payload.len() - 5);
            payload[i] = byte;
        }
        if truncate {
            payload.truncate(5 + cut.index(payload.len() - 5));
        }
        classified(runtime().block_on(codec.decode::<OrderCreated>(Some(&payload))));
    }

    #[test]
    fn failure_headers_are_read_or_refused_never_panicking(
        pairs in proptest::collection::vec(
            (
                prop::sample::select(vec![
                    "orderflow.attempt", "orderflow.original.topic", "orderflow.original.partition",
                    "orderflow.original.offset", "orderflow.original.timestamp",
                    "orderflow.first-failure.time", "orderflow.retry.tier", "orderflow.due.time",
                    "ce_id", "other",
                ]),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24)),
            ),
            0..12,
        )
    ) {
        let headers = pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header { key: k, value: v.as_deref() })
        });
        let read = FailureContext::read(Some(headers.as_borrowed()));
        if let Some(context) = read {
            // Only what was really there, parsed.
            let text = |name: &str| headers.iter().find(|h| h.key == name).and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok()).map(str::to_string);
            prop_assert_eq!(Some(context.original_topic.clone()), text("orderflow.original.topic"));
            prop_assert_eq!(Some(context.attempt.to_string()), text("orderflow.attempt"));
        }
    }
}

/// A header value as a writer (or an attacker) might set it: in range, at the edges, huge,
/// negative, or not a number.
fn header_number() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        (0i64..5).prop_map(|n| Some(n.to_string())),
        any::<i64>().prop_map(|n| Some(n.to_string())),
        Just(Some("4000000000".to_string())),
        Just(Some("-1".to_string())),
        "[a-z0-9 ]{0,6}".prop_map(Some),
        Just(None),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// From headers to the action taken: whatever a retry record carries, the gate either
    /// rejects it or acts within the pipeline's bounds (a wait no longer than its tier plus the
    /// margin, a tier it has, a partition the input has), and the record it routes on goes to a
    /// tier or DLQ the pipeline has, addressed to a partition that exists.
    #[test]
    fn any_failure_headers_lead_to_a_bounded_action(
        attempt in header_number(),
        partition in header_number(),
        offset in header_number(),
        tier in header_number(),
        due_in in prop_oneof![(-5_000i64..120_000).prop_map(Some), any::<i64>().prop_map(Some), Just(None)],
        topic_is_input in any::<bool>(),
        source_tier in 1usize..=2,
    ) {
        use orderflow::runtime::gate::{self, Admission, GateRules, Source};
        let now = 1_700_000_000_000i64;
        let due = due_in.map(|d| now.saturating_add(d).to_string());
        let mut pairs: Vec<(&str, Option<String>)> = vec![
            ("orderflow.attempt", attempt),
            ("orderflow.original.partition", partition),
            ("orderflow.original.offset", offset),
            ("orderflow.retry.tier", tier),
            ("orderflow.due.time", due),
            ("orderflow.first-failure.time", Some(now.to_string())),
        ];
        pairs.push(("orderflow.original.topic", Some(if topic_is_input { "in" } else { "other" }.into())));
        let headers = pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header { key: k, value: v.as_deref() })
        });
        let tiers = vec![std::time::Duration::from_secs(1), std::time::Duration::from_secs(16)];
        let rules = GateRules { tiers: tiers.clone() };
        let source = Source::Retry { tier: source_tier, input_topic: "in", input_partitions: 3 };
        let context = FailureContext::read(Some(&headers));
        match gate::admit(source, context, now, &rules) {
            Admission::Reject { reason } => prop_assert!(!reason.is_empty()),
            Admission::Pause { resume_in } => {
                prop_assert!(resume_in <= tiers[source_tier - 1] + gate::DUE_MARGIN);
            }
            Admission::Hold { context, wait } => {
                prop_assert!(wait <= gate::HOLD_WITHIN);
                prop_assert!(context.tier == source_tier && (0..3).contains(&context.original_partition));
            }
            Admission::Run { context, late_ms } => {
                let c = context.expect("a retry record runs with its context");
                prop_assert!(c.tier == source_tier && (0..3).contains(&c.original_partition));
                prop_assert!(c.attempt >= 1 && c.attempt <= gate::MAX_ATTEMPTS);
                prop_assert!(late_ms.is_none_or(|l| l >= 0));
            }
        }
    }
}

#[test]
fn the_valid_payload_decodes() {
    let codec = offline_codec();
    let payload = valid_payload();
    runtime()
        .block_on(codec.decode::<OrderCreated>(Some(&payload)))
        .unwrap();
}

/// A length prefix claiming gigabytes must be refused, not allocated.
#[test]
fn a_huge_length_prefix_is_refused_quickly() {
    let codec = offline_codec();
    let mut payload = vec![0];
    payload.extend_from_slice(&ID.to_be_bytes());
    // envelope.event_id: a string whose zig-zag length says ~1 GB.
    payload.extend([0xfe, 0xff, 0xff, 0xff, 0x0f]);
    let started = std::time::Instant::now();
    let result = runtime().block_on(codec.decode::<OrderCreated>(Some(&payload)));
    assert_eq!(result.unwrap_err().kind(), "corrupt_body");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}
