//! The offset window of one partition: the records taken from it and not yet finished, in
//! offset order, and the contiguous finished watermark.
//!
//! Invariant: [`OffsetWindow::take_finished`] hands out a record only when every record taken
//! before it is finished too, so an offset stored from it never passes unfinished work. It
//! owns no Kafka client and never stores an offset itself: the engine does, with what it
//! returns, gathered per turn in [`Unstored`] (one store for many finished records).

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
            .index_of(offset)
            .ok_or(WindowError::Unknown { offset })?;
        let entry = &mut self.entries[index];
        if entry.finished.is_some() {
            return Err(WindowError::Unknown { offset });
        }
        entry.finished = Some(value);
        Ok(())
    }

    /// Where `offset` is. Offsets usually follow one another, so its distance from the first
    /// is its place; a gap (compaction, transaction markers) puts it earlier: then a search.
    fn index_of(&self, offset: i64) -> Option<usize> {
        let first = self.entries.front()?.offset;
        let guess = usize::try_from(offset.checked_sub(first)?).ok()?;
        if self.entries.get(guess).is_some_and(|e| e.offset == offset) {
            return Some(guess);
        }
        self.entries
            .binary_search_by_key(&offset, |e| e.offset)
            .ok()
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

/// Watermarks reached and not stored yet, the newest per partition: the engine stores them
/// together once per turn (a call per finished record cost more than the rest of its
/// bookkeeping), and forgets a partition's when it loses the partition.
#[derive(Debug)]
pub struct Unstored<P> {
    watermarks: Vec<(P, i64)>,
}

impl<P> Default for Unstored<P> {
    fn default() -> Self {
        Unstored {
            watermarks: Vec::new(),
        }
    }
}

impl<P: PartialEq> Unstored<P> {
    /// `partition`'s records up to `offset` are finished.
    pub fn note(&mut self, partition: P, offset: i64) {
        // A turn touches few partitions: a scan beats a hash.
        match self.watermarks.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, last)) => *last = (*last).max(offset),
            None => self.watermarks.push((partition, offset)),
        }
    }

    /// `partition` is no longer this consumer's: its watermark must not be stored.
    pub fn forget(&mut self, partition: &P) {
        self.watermarks.retain(|(p, _)| p != partition);
    }

    pub fn is_empty(&self) -> bool {
        self.watermarks.is_empty()
    }

    /// The watermarks to store, each partition's once; none are left.
    pub fn take(&mut self) -> Vec<(P, i64)> {
        std::mem::take(&mut self.watermarks)
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
    fn a_record_after_a_gap_is_found() {
        let mut w = OffsetWindow::default();
        for offset in [3, 4, 7, 8, 20] {
            w.push(offset).unwrap();
        }
        // 7 is not at 7 - 3 = 4 (20 is): the gap sends it to the search.
        for (offset, value) in [(20, 'e'), (7, 'c'), (8, 'd'), (3, 'a'), (4, 'b')] {
            w.finish(offset, value).unwrap();
        }
        assert_eq!(w.finish(5, 'x'), Err(WindowError::Unknown { offset: 5 }));
        assert_eq!(w.finish(2, 'x'), Err(WindowError::Unknown { offset: 2 }));
        assert_eq!(w.finish(99, 'x'), Err(WindowError::Unknown { offset: 99 }));
        let taken: Vec<char> = w.take_finished().into_iter().map(|(_, v)| v).collect();
        assert_eq!(taken, vec!['a', 'b', 'c', 'd', 'e']);
    }

    #[test]
    fn unstored_keeps_the_newest_watermark_per_partition_and_forgets_lost_ones() {
        let mut u = Unstored::default();
        u.note("a", 5);
        u.note("b", 2);
        u.note("a", 9);
        u.note("a", 7); // never backwards
        u.note("c", 1);
        u.forget(&"c");
        assert_eq!(u.take(), vec![("a", 9), ("b", 2)]);
        assert!(u.is_empty(), "taken once");
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
