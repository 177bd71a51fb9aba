//! Topic administration: creating missing topics with their partition counts (waiting until
//! they are visible) and growing a topic's partitions. Never deletes or shrinks a topic.

use std::time::Duration;

use super::client::client_config;

/// More partitions than this in one topic is taken as a broken answer, not a size to follow.
pub const MAX_PARTITIONS: i32 = 10_000;

/// Grows `topic` to `partitions` partitions.
pub async fn grow_partitions(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;

    anyhow::ensure!(
        (1..=MAX_PARTITIONS).contains(&partitions),
        "{partitions} partitions for {topic} is out of range"
    );
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap_servers).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let grow = NewPartitions::new(topic, partitions as usize);
    for result in admin.create_partitions(&[grow], &options).await? {
        if let Err((topic, code)) = result {
            anyhow::bail!("growing {topic} to {partitions} partitions failed: {code}");
        }
    }
    Ok(())
}

/// Creates each topic that does not exist yet (an existing one is left as it is).
pub async fn ensure_topics(
    bootstrap_servers: &str,
    topics: &[(&str, i32)],
    replication: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;

    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap_servers).create()?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| {
            NewTopic::new(name, *partitions, TopicReplication::Fixed(replication))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic} failed: {code}"),
        }
    }
    // A consumer that subscribes before a new topic shows in the metadata would not see it
    // until its next metadata refresh: wait until every topic is visible.
    let names: Vec<String> = topics.iter().map(|(t, _)| t.to_string()).collect();
    let bootstrap = bootstrap_servers.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let client: BaseConsumer = client_config(&bootstrap).create()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for name in &names {
            loop {
                let visible = client
                    .fetch_metadata(Some(name), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .first()
                            .map(|t| t.error().is_none() && !t.partitions().is_empty())
                    })
                    .unwrap_or(false);
                if visible {
                    break;
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "topic {name} was created but is not visible after 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    })
    .await??;
    Ok(())
}
