//! Room: what a processor holds in flight, when it reads, and when a partition must pause or
//! may resume.
//!
//! Invariant: records and input bytes in flight stay bounded. While the process holds its whole
//! record or byte budget it reads nothing ([`Reading`]); librdkafka keeps what it has fetched, so
//! reading goes on, record by record, as soon as records finish. Only if the budget stays full
//! for longer than [`UNREAD_AT_MOST`] (reading serves rebalances too) does it read again and
//! pause each partition it reads from. A partition whose own window is full is paused at once.
//! A paused partition resumes only when all three are back under their low-water marks (half
//! the window, three quarters of each budget), so it does not flap on every record. Pure: it
//! pauses nothing itself; the engine does, with what it says.

use std::time::{Duration, Instant};

use rdkafka::message::{Headers, Message};

/// Longest the engine stops reading while the process holds its whole budget: long enough for
/// records in flight to finish and make room (pausing instead would drop what librdkafka has
/// fetched, to be fetched again, and admit the next records in one burst), short enough that a
/// rebalance waits for it no longer than this.
pub const UNREAD_AT_MOST: Duration = Duration::from_millis(500);

/// The setting (environment variable) of the record budget.
pub const RECORDS_SETTING: &str = "ORDERFLOW_IN_FLIGHT_RECORDS";
/// The setting (environment variable) of the byte budget.
pub const BYTES_SETTING: &str = "ORDERFLOW_IN_FLIGHT_BYTES";
/// 10,000 records lifted the fan-out benchmark from 19,056 events/s with 2,000 to 29,054
/// (BENCHMARKS.md), at about 10 KiB a record (four outputs queued): some 100 MiB when full.
pub const DEFAULT_RECORDS: usize = 10_000;
/// Input bytes; librdkafka holds a copy per output too, so a fan-out to four holds about five
/// times this: it fits the manifests' 256 MiB processor limit with the records' own cost.
pub const DEFAULT_BYTES: usize = 16 * 1024 * 1024;
const RECORDS_BOUNDS: std::ops::RangeInclusive<usize> = 100..=1_000_000;
const BYTES_BOUNDS: std::ops::RangeInclusive<usize> = 1024 * 1024..=4 * 1024 * 1024 * 1024;

/// How much a processor may hold.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Records of one partition in flight (read, not yet behind its watermark).
    pub partition_window: usize,
    /// Records in flight across all partitions.
    pub records: usize,
    /// Bytes (key, payload and headers) of input records whose tasks have not ended. Records
    /// alone would let large payloads take gigabytes.
    pub bytes: usize,
}

impl Budget {
    /// A budget of `records` and `bytes`; one partition may hold half the records, so two
    /// partitions can share the whole budget.
    pub fn with(records: usize, bytes: usize) -> Budget {
        Budget {
            partition_window: (records / 2).max(1),
            records,
            bytes,
        }
    }

    /// The budget [`RECORDS_SETTING`] and [`BYTES_SETTING`] declare (unset: the defaults).
    /// Every refusal names its setting, its value and the bounds, all of them at once.
    pub fn from_settings(records: Option<&str>, bytes: Option<&str>) -> Result<Budget, String> {
        let mut errors = Vec::new();
        let records = match records.map(str::trim) {
            None | Some("") => DEFAULT_RECORDS,
            Some(value) => match value.replace('_', "").parse::<usize>() {
                Ok(n) if RECORDS_BOUNDS.contains(&n) => n,
                _ => {
                    errors.push(format!(
                        "{RECORDS_SETTING}={value:?} is not a record count from {} to {}",
                        RECORDS_BOUNDS.start(),
                        RECORDS_BOUNDS.end()
                    ));
                    DEFAULT_RECORDS
                }
            },
        };
        let bytes = match bytes.map(str::trim) {
            None | Some("") => DEFAULT_BYTES,
            Some(value) => match parse_bytes(value) {
                Some(n) if BYTES_BOUNDS.contains(&n) => n,
                _ => {
                    errors.push(format!(
                        "{BYTES_SETTING}={value:?} is not a size from 1MiB to 4GiB (a byte count, or with KiB, MiB or GiB)"
                    ));
                    DEFAULT_BYTES
                }
            },
        };
        if errors.is_empty() {
            Ok(Budget::with(records, bytes))
        } else {
            Err(errors.join("; "))
        }
    }

    /// The budget this process's environment declares.
    pub fn from_env() -> Result<Budget, String> {
        let var = |name| std::env::var(name).ok();
        Budget::from_settings(
            var(RECORDS_SETTING).as_deref(),
            var(BYTES_SETTING).as_deref(),
        )
    }
}

/// `1048576`, `512KiB`, `64MiB` or `1GiB`; `None` for anything else or an overflow.
fn parse_bytes(value: &str) -> Option<usize> {
    let (digits, unit) = match value.find(|c: char| !c.is_ascii_digit() && c != '_') {
        Some(at) => value.split_at(at),
        None => (value, ""),
    };
    let unit = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        "GiB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    digits
        .replace('_', "")
        .parse::<usize>()
        .ok()?
        .checked_mul(unit)
}

/// What the process holds now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Records read and not yet behind their partition's watermark.
    pub records: usize,
    /// Bytes of records whose tasks have not ended.
    pub bytes: usize,
}

impl Room {
    /// A record read, of `bytes` bytes.
    pub fn take(&mut self, bytes: usize) {
        self.records += 1;
        self.bytes += bytes;
    }

    /// Records that left their windows (finished behind the watermark, or abandoned).
    pub fn release_records(&mut self, records: usize) {
        self.records = self.records.saturating_sub(records);
    }

    /// Bytes of records whose tasks ended (or were abandoned).
    pub fn release_bytes(&mut self, bytes: usize) {
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// The process holds its whole record or byte budget.
    pub fn is_over(&self, budget: &Budget) -> bool {
        self.records >= budget.records || self.bytes >= budget.bytes
    }

    /// Whether the partition just read from, holding `window` records, must pause: its window is
    /// full, or the budget is and reading has stopped for as long as it may (`overdue`).
    pub fn is_full(&self, budget: &Budget, window: usize, overdue: bool) -> bool {
        window >= budget.partition_window || (overdue && self.is_over(budget))
    }

    /// Whether the process is under both budgets' low-water marks (three quarters).
    pub fn has_room(&self, budget: &Budget) -> bool {
        self.records < budget.records * 3 / 4 && self.bytes < budget.bytes * 3 / 4
    }

    /// Whether a paused partition holding `window` records may resume.
    pub fn may_resume(&self, budget: &Budget, window: usize) -> bool {
        self.has_room(budget) && window <= budget.partition_window / 2
    }
}

/// Whether the engine reads now: not while the process holds its whole budget, for at most
/// [`UNREAD_AT_MOST`] at a time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reading {
    /// When the budget was found full, while it still is.
    full_since: Option<Instant>,
}

impl Reading {
    /// None: read now. Some(instant): read nothing until then, unless room comes first. `now`
    /// is asked only while the budget is full (the engine looks before every record).
    pub fn wait(
        &mut self,
        room: &Room,
        budget: &Budget,
        now: impl FnOnce() -> Instant,
    ) -> Option<Instant> {
        if !room.is_over(budget) {
            self.full_since = None;
            return None;
        }
        let now = now();
        let until = *self.full_since.get_or_insert(now) + UNREAD_AT_MOST;
        (now < until).then_some(until)
    }

    /// The budget has been full for as long as reading may stop: records read now pause their
    /// partitions.
    pub fn is_overdue(&self, now: Instant) -> bool {
        self.full_since
            .is_some_and(|since| now >= since + UNREAD_AT_MOST)
    }
}

/// What a record weighs against the byte budget: its key, payload and headers.
pub fn record_bytes(message: &impl Message) -> usize {
    let headers = message.headers().map_or(0, |headers| {
        headers
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum()
    });
    message.key().map_or(0, <[u8]>::len) + message.payload().map_or(0, <[u8]>::len) + headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_settings_give_the_defaults() {
        let budget = Budget::from_settings(None, Some("  ")).unwrap();
        assert_eq!(
            (budget.records, budget.bytes, budget.partition_window),
            (DEFAULT_RECORDS, DEFAULT_BYTES, DEFAULT_RECORDS / 2)
        );
    }

    #[test]
    fn settings_take_counts_and_sizes_with_units() {
        let budget = Budget::from_settings(Some("20_000"), Some("256MiB")).unwrap();
        assert_eq!((budget.records, budget.bytes), (20_000, 256 << 20));
        assert_eq!(budget.partition_window, 10_000);
        for (text, bytes) in [
            ("1048576", 1 << 20),
            ("2048KiB", 2 << 20),
            ("1GiB", 1 << 30),
        ] {
            assert_eq!(
                Budget::from_settings(None, Some(text)).unwrap().bytes,
                bytes
            );
        }
    }

    #[test]
    fn bad_settings_are_all_named_with_their_values() {
        let error = Budget::from_settings(Some("99"), Some("64MB")).unwrap_err();
        assert!(
            error.contains("ORDERFLOW_IN_FLIGHT_RECORDS=\"99\""),
            "{error}"
        );
        assert!(
            error.contains("ORDERFLOW_IN_FLIGHT_BYTES=\"64MB\""),
            "{error}"
        );
        for bytes in ["1KiB", "5GiB", "-1", "99999999999999999999GiB", "MiB"] {
            assert!(Budget::from_settings(None, Some(bytes)).is_err(), "{bytes}");
        }
        for records in ["0", "1000001", "ten", "-5"] {
            assert!(
                Budget::from_settings(Some(records), None).is_err(),
                "{records}"
            );
        }
    }

    const BUDGET: Budget = Budget {
        partition_window: 100,
        records: 400,
        bytes: 4000,
    };

    #[test]
    fn a_full_window_pauses_its_partition_with_the_process_under_budget() {
        let room = Room {
            records: 100,
            bytes: 100,
        };
        assert!(room.is_full(&BUDGET, 100, false));
        assert!(!room.is_full(&BUDGET, 99, false));
    }

    #[test]
    fn either_budget_pauses_the_partition_read_from_only_once_reading_is_overdue() {
        let by_records = Room {
            records: 400,
            bytes: 0,
        };
        let by_bytes = Room {
            records: 1,
            bytes: 4000,
        };
        for room in [by_records, by_bytes] {
            assert!(room.is_over(&BUDGET));
            assert!(!room.is_full(&BUDGET, 1, false), "reading stops first");
            assert!(room.is_full(&BUDGET, 1, true));
        }
    }

    #[test]
    fn reading_stops_while_the_budget_is_full_for_at_most_the_bound() {
        let (full, under) = (
            Room {
                records: 400,
                bytes: 0,
            },
            Room {
                records: 399,
                bytes: 3999,
            },
        );
        let t0 = Instant::now();
        let mut reading = Reading::default();
        assert_eq!(reading.wait(&under, &BUDGET, || t0), None);
        let until = t0 + UNREAD_AT_MOST;
        assert_eq!(reading.wait(&full, &BUDGET, || t0), Some(until));
        // Still full later: the bound counts from when it became full, not from each look.
        let later = t0 + UNREAD_AT_MOST / 2;
        assert_eq!(reading.wait(&full, &BUDGET, || later), Some(until));
        assert!(!reading.is_overdue(later));
        assert_eq!(reading.wait(&full, &BUDGET, || until), None, "reads again");
        assert!(reading.is_overdue(until));
        // Room again: reading goes on and the next full budget starts a new bound.
        assert_eq!(reading.wait(&under, &BUDGET, || until), None);
        assert!(!reading.is_overdue(until));
        let next = until + Duration::from_secs(1);
        assert_eq!(
            reading.wait(&full, &BUDGET, || next),
            Some(next + UNREAD_AT_MOST)
        );
    }

    #[test]
    fn a_paused_partition_resumes_only_under_every_low_water_mark() {
        let under = Room {
            records: 299,
            bytes: 2999,
        };
        assert!(under.may_resume(&BUDGET, 50));
        // Its own window still above half.
        assert!(!under.may_resume(&BUDGET, 51));
        // Between the low-water mark and the budget: still paused (no flapping).
        let records_high = Room {
            records: 300,
            ..under
        };
        let bytes_high = Room {
            bytes: 3000,
            ..under
        };
        assert!(!records_high.may_resume(&BUDGET, 0));
        assert!(!bytes_high.may_resume(&BUDGET, 0));
    }

    #[test]
    fn taking_and_releasing_balance_and_never_underflow() {
        let mut room = Room::default();
        for bytes in [10, 20, 30] {
            room.take(bytes);
        }
        assert_eq!(
            room,
            Room {
                records: 3,
                bytes: 60
            }
        );
        room.release_bytes(20);
        room.release_records(2);
        assert_eq!(
            room,
            Room {
                records: 1,
                bytes: 40
            }
        );
        room.release_bytes(1000);
        room.release_records(1000);
        assert_eq!(room, Room::default());
    }

    #[test]
    fn a_record_weighs_its_key_payload_and_headers() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some("abc"),
            })
            .insert(Header::<&str> {
                key: "empty",
                value: None,
            });
        let message = OwnedMessage::new(
            Some(vec![0; 100]),
            Some(b"key".to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(headers),
        );
        assert_eq!(record_bytes(&message), 100 + 3 + (5 + 3) + 5);
    }
}
