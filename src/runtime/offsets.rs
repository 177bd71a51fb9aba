//! The offset window of one partition: the records taken from it and not yet finished, in
//! offset order, and the contiguous finished watermark.
//!
//! Invariant: [`OffsetWindow::take_finished`] hands out a record only when every record taken
//! before it is finished too, so an offset stored from it never passes unfinished work. It
//! owns no Kafka client and never stores an offset itself: the engine does, with what it
//! returns.

use std::collections::VecDeque;

/// Records of one partition in flight; `T` is what a finished record leaves behind (nothing
/// at least once; its staged outputs exactly once).
#[derive(Debug)]
pub struct OffsetWindow<T> {
    entries: VecDeque<Entry<T>>,
}

#[derive(Debug)]
struct Entry<T> {
    offset: i64,
    finished: Option<T>,
}

/// Why a record could not enter or leave the window.
#[derive(Debug, PartialEq, Eq)]
pub enum WindowError {
    /// Offsets enter in increasing order; this one does not.
    OutOfOrder { offset: i64, last: i64 },
    /// No such record in flight (finished twice, or never taken).
    Unknown { offset: i64 },
}

impl<T> Default for OffsetWindow<T> {
    fn default() -> Self {
        OffsetWindow {
            entries: VecDeque::new(),
        }
    }
}

impl<T> OffsetWindow<T> {
    /// Takes a record into the window; offsets must increase.
    pub fn push(&mut self, offset: i64) -> Result<(), WindowError> {
        if let Some(last) = self.entries.back() {
            if offset <= last.offset {
                return Err(WindowError::OutOfOrder {
                    offset,
                    last: last.offset,
                });
            }
        }
        self.entries.push_back(Entry {
            offset,
            finished: None,
        });
        Ok(())
    }

    /// Marks a record finished, with what it leaves behind.
    pub fn finish(&mut self, offset: i64, value: T) -> Result<(), WindowError> {
        let index = self
            .entries
            .binary_search_by_key(&offset, |e| e.offset)
            .map_err(|_| WindowError::Unknown { offset })?;
        let entry = &mut self.entries[index];
        if entry.finished.is_some() {
            return Err(WindowError::Unknown { offset });
        }
        entry.finished = Some(value);
        Ok(())
    }

    /// Removes and returns the finished records that no unfinished record precedes, in order.
    /// The last one's offset is the partition's new watermark.
    pub fn take_finished(&mut self) -> Vec<(i64, T)> {
        let mut out = Vec::new();
        while self.entries.front().is_some_and(|e| e.finished.is_some()) {
            let entry = self.entries.pop_front().expect("front exists");
            out.push((entry.offset, entry.finished.expect("checked finished")));
        }
        out
    }

    /// Records in flight, finished or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The oldest record not yet handed out (where a new owner would start reading).
    pub fn first_offset(&self) -> Option<i64> {
        self.entries.front().map(|e| e.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_waits_for_the_slowest_earlier_record() {
        let mut w = OffsetWindow::default();
        for offset in [10, 11, 12, 13] {
            w.push(offset).unwrap();
        }
        w.finish(12, "c").unwrap();
        w.finish(13, "d").unwrap();
        assert!(w.take_finished().is_empty(), "10 and 11 are unfinished");
        w.finish(10, "a").unwrap();
        assert_eq!(w.take_finished(), vec![(10, "a")]);
        w.finish(11, "b").unwrap();
        assert_eq!(w.take_finished(), vec![(11, "b"), (12, "c"), (13, "d")]);
        assert!(w.is_empty());
    }

    #[test]
    fn gaps_in_offsets_are_fine_but_order_is_required() {
        let mut w: OffsetWindow<()> = OffsetWindow::default();
        w.push(5).unwrap();
        w.push(9).unwrap(); // compaction or transaction markers leave gaps
        assert_eq!(
            w.push(9),
            Err(WindowError::OutOfOrder { offset: 9, last: 9 })
        );
        assert_eq!(w.finish(7, ()), Err(WindowError::Unknown { offset: 7 }));
        w.finish(9, ()).unwrap();
        assert_eq!(w.finish(9, ()), Err(WindowError::Unknown { offset: 9 }));
        assert_eq!(w.first_offset(), Some(5));
    }

    #[test]
    fn any_finishing_order_hands_out_every_offset_once_in_order() {
        for seed in 0..200u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut w = OffsetWindow::default();
            let offsets: Vec<i64> = (0..50).map(|i| i * 2).collect();
            for o in &offsets {
                w.push(*o).unwrap();
            }
            let mut order = offsets.clone();
            rng.shuffle(&mut order);
            let mut handed = Vec::new();
            for o in order {
                w.finish(o, o).unwrap();
                for (offset, value) in w.take_finished() {
                    assert_eq!(offset, value);
                    // Never past an unfinished record: everything before it was handed out.
                    assert_eq!(
                        handed.len(),
                        offsets.iter().position(|x| *x == offset).unwrap()
                    );
                    handed.push(offset);
                }
            }
            assert_eq!(handed, offsets);
        }
    }
}
