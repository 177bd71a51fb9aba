//! Room: what a processor holds in flight, and when a partition must pause or may resume.
//!
//! Invariant: records and input bytes in flight stay bounded: a partition is paused once its
//! own window, the process's record budget or its byte budget is full, and resumed only when
//! all three are back under their low-water marks (half the window, three quarters of each
//! budget), so a partition does not flap on every record. Pure: it pauses nothing itself; the
//! engine does, with what it says.

use rdkafka::message::{Headers, Message};

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

    /// Whether the partition just read from, holding `window` records, must pause.
    pub fn is_full(&self, budget: &Budget, window: usize) -> bool {
        window >= budget.partition_window
            || self.records >= budget.records
            || self.bytes >= budget.bytes
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
        assert!(room.is_full(&BUDGET, 100));
        assert!(!room.is_full(&BUDGET, 99));
    }

    #[test]
    fn either_budget_pauses_the_partition_read_from() {
        let by_records = Room {
            records: 400,
            bytes: 0,
        };
        let by_bytes = Room {
            records: 1,
            bytes: 4000,
        };
        assert!(by_records.is_full(&BUDGET, 1));
        assert!(by_bytes.is_full(&BUDGET, 1));
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
