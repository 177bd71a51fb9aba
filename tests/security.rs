//! Kafka client security against the real broker's SASL/SCRAM-SHA-512 listener (started by
//! scripts/stack): the right credentials connect and carry events end to end, a wrong password
//! fails with an error that says so, and incomplete settings are refused by name.

use std::process::{Command, Output};

fn sasl(password: Option<&str>, prefix: &str, args: &[&str]) -> Output {
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name} is not set: run the tests with scripts/test"))
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    command
        .args(args)
        .env(
            "ORDERFLOW_BOOTSTRAP_SERVERS",
            var("ORDERFLOW_TEST_SASL_BOOTSTRAP"),
        )
        .env("ORDERFLOW_TOPIC_PREFIX", prefix)
        .env(
            "ORDERFLOW_SCHEMAS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/avro"),
        )
        .env(
            "ORDERFLOW_PIPELINES_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"),
        )
        .env("ORDERFLOW_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
        .env(
            "ORDERFLOW_KAFKA_SASL_USERNAME",
            var("ORDERFLOW_TEST_SASL_USERNAME"),
        );
    if let Some(password) = password {
        command.env("ORDERFLOW_KAFKA_SASL_PASSWORD", password);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn prefix() -> String {
    format!(
        "it-sasl-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

#[test]
fn scram_credentials_carry_events_end_to_end() {
    let password = std::env::var("ORDERFLOW_TEST_SASL_PASSWORD").unwrap();
    let prefix = prefix();
    let ensure = sasl(
        Some(&password),
        &prefix,
        &["topics", "ensure", "--pipeline", "analytics"],
    );
    assert!(ensure.status.success(), "{}", text(&ensure));
    assert!(
        text(&ensure).contains(&format!("{prefix}order.created.analytics.dlq ")),
        "{}",
        text(&ensure)
    );
    let publish = sasl(
        Some(&password),
        &prefix,
        &["orders", "publish", "--count", "3"],
    );
    assert!(publish.status.success(), "{}", text(&publish));
    let consume = sasl(
        Some(&password),
        &prefix,
        &[
            "orders",
            "consume",
            "--max",
            "3",
            "--group",
            &format!("{prefix}reader"),
        ],
    );
    assert!(consume.status.success(), "{}", text(&consume));
    assert_eq!(String::from_utf8_lossy(&consume.stdout).lines().count(), 3);
}

#[test]
fn a_wrong_password_fails_with_a_clear_error() {
    let output = sasl(
        Some("not-the-password"),
        &prefix(),
        &["topics", "ensure", "--pipeline", "analytics"],
    );
    assert!(!output.status.success());
    let text = text(&output);
    assert!(text.contains("cannot use Kafka at"), "{text}");
    assert!(text.contains("SASL authentication error"), "{text}");
    assert!(
        text.contains("invalid credentials with SASL mechanism SCRAM-SHA-512"),
        "{text}"
    );
}

#[test]
fn incomplete_security_settings_are_named() {
    let output = sasl(None, &prefix(), &["topics", "ensure"]);
    assert!(!output.status.success());
    let text = text(&output);
    assert!(
        text.contains(
            "ORDERFLOW_KAFKA_SASL_PASSWORD (or ORDERFLOW_KAFKA_SASL_PASSWORD_FILE) is required"
        ),
        "{text}"
    );
}
