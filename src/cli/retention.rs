//! `orderflow retention run|status`: expires what each table keeps past its window (for a
//! CronJob) and prints what each holds. The expiry itself is [`crate::database::retention`].

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::app::Connect;

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Create the dedup partitions ahead, drop those past the window, delete expired intake keys
    /// and finished orders in bounded batches; print what each table holds after.
    Run(RetentionWindows),
    /// Print what each table holds (rows, oldest age) and its window; changes nothing.
    Status(RetentionWindows),
}

/// The windows (each 1 min to 365 d). Processors and the CronJob must read the same ones.
#[derive(Debug, Clone, Args)]
pub struct RetentionWindows {
    /// How long a dedup mark counts: a duplicate older than this is handled again.
    #[arg(long, env = "ORDERFLOW_DEDUP_RETENTION", default_value = "7d", value_parser = |t: &str| window_setting("--dedup-retention / ORDERFLOW_DEDUP_RETENTION", t))]
    pub dedup_retention: Duration,
    /// How long an idempotency key holds its order (the window a client may retry in).
    #[arg(long, env = "ORDERFLOW_INTAKE_KEY_RETENTION", default_value = "24h", value_parser = |t: &str| window_setting("--intake-key-retention / ORDERFLOW_INTAKE_KEY_RETENTION", t))]
    pub intake_key_retention: Duration,
    /// How long a finished order stays in the read model after it became final.
    #[arg(long, env = "ORDERFLOW_READ_MODEL_RETENTION", default_value = "30d", value_parser = |t: &str| window_setting("--read-model-retention / ORDERFLOW_READ_MODEL_RETENTION", t))]
    pub read_model_retention: Duration,
}

/// A window flag's value, checked by the same rule the processors use.
fn window_setting(setting: &str, text: &str) -> Result<Duration, String> {
    crate::database::retention::parse_window(setting, text).map_err(|e| e.to_string())
}

pub(super) async fn retention_command(
    connect: &Connect,
    cmd: RetentionCommand,
) -> anyhow::Result<()> {
    use crate::database::{retention as r, Database, Timeouts};
    let (run, w) = match cmd {
        RetentionCommand::Run(w) => (true, w),
        RetentionCommand::Status(w) => (false, w),
    };
    // Index builds and drops may take long on a large table: a long statement timeout here only.
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        statement: Duration::from_secs(600),
    };
    let db = Database::with(&connect.database_url, 1, timeouts)?;
    let conn = db.get().await?;
    let c = conn.client();
    if run {
        // Creates the table (the width following the window) only if no processor has yet.
        let bucket = r::bucket_for(w.dedup_retention);
        conn.timed(r::prepare_dedup(c, bucket)).await?;
        let d = conn.timed(r::expire_dedup(c, w.dedup_retention)).await?;
        if d.skipped {
            println!(
                "{}: another process is expiring it now; skipped",
                r::DEDUP_TABLE
            );
        }
        println!(
            "{}: dropped {} partition(s) ({} rows){}, created {} ahead",
            r::DEDUP_TABLE,
            d.dropped.len(),
            d.rows_dropped,
            if d.legacy_dropped {
                " and the legacy table"
            } else {
                ""
            },
            d.created
        );
        let keys = conn
            .timed(r::expire_intake(c, w.intake_key_retention))
            .await?;
        println!("{}: deleted {keys} expired key(s)", r::INTAKE_TABLE);
        let orders = conn
            .timed(r::expire_read_model(c, w.read_model_retention))
            .await?;
        println!(
            "{}: deleted {orders} finished order(s)",
            r::READ_MODEL_TABLE
        );
    }
    let mut held = conn.timed(r::measure_dedup(c, w.dedup_retention)).await?;
    held.push(
        conn.timed(r::measure_intake(c, w.intake_key_retention))
            .await?,
    );
    held.push(
        conn.timed(r::measure_read_model(c, w.read_model_retention))
            .await?,
    );
    println!(
        "{:<28} {:>12} {:>14} {:>10}",
        "TABLE", "ROWS", "OLDEST", "WINDOW"
    );
    for h in held {
        let age = h.oldest_age_seconds.map_or("-".to_string(), |s| {
            humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
        });
        let window = humantime::format_duration(h.window).to_string();
        println!("{:<28} {:>12} {:>14} {:>10}", h.table, h.rows, age, window);
    }
    Ok(())
}
