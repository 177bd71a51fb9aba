//! Topic administration: creating missing topics with their partition counts and settings
//! (waiting until they are visible), growing a topic's partitions, and reading partition counts.
//! Never deletes or shrinks a topic, nor changes an existing topic's settings.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

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
    create_missing(bootstrap_servers, topics, replication, &[]).await
}

/// Creates `topic` with `settings` (e.g. compaction) when missing, and waits until it is
/// visible; an existing topic is left as it is, settings included.
pub async fn create_with_settings(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
    settings: &[(&str, &str)],
) -> anyhow::Result<()> {
    create_missing(
        bootstrap_servers,
        &[(topic, partitions)],
        replication,
        settings,
    )
    .await
}

/// Creates the missing ones of `topics`, each with `settings`, then waits until every one is
/// visible.
async fn create_missing(
    bootstrap_servers: &str,
    topics: &[(&str, i32)],
    replication: i32,
    settings: &[(&str, &str)],
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;

    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap_servers).create()?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| {
            settings.iter().fold(
                NewTopic::new(name, *partitions, TopicReplication::Fixed(replication)),
                |topic, (key, value)| topic.set(key, value),
            )
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

/// Partition count of each topic (0 for a topic that does not exist), from one metadata
/// request on the blocking pool. A count above [`MAX_PARTITIONS`] is refused as broken.
pub async fn partition_counts(
    bootstrap_servers: &str,
    topics: &[String],
) -> anyhow::Result<BTreeMap<String, i32>> {
    let bootstrap = bootstrap_servers.to_string();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = client_config(&bootstrap).create()?;
        let metadata = client.fetch_metadata(None, Duration::from_secs(10))?;
        let known: BTreeMap<&str, usize> = metadata
            .topics()
            .iter()
            .map(|t| (t.name(), t.partitions().len()))
            .collect();
        topics
            .into_iter()
            .map(|topic| {
                let count = known.get(topic.as_str()).copied().unwrap_or(0);
                anyhow::ensure!(
                    count <= MAX_PARTITIONS as usize,
                    "the broker reports {count} partitions for {topic}, over {MAX_PARTITIONS}"
                );
                Ok((topic, count as i32))
            })
            .collect()
    })
    .await?
}
