//! Cutting a batch into consecutive parts of bounded size, so no single Redis call carries so
//! many bytes that it outlasts the connection's response timeout and fails on every retry.

use std::ops::Range;

/// Consecutive ranges of `items` of at most `max` bytes each by `size`; an item larger than
/// `max` gets a range of its own. Order is kept.
pub fn by_size<T>(items: &[T], size: impl Fn(&T) -> usize, max: usize) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && bytes + n > max {
            chunks.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < items.len() {
        chunks.push(start..items.len());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_cut_by_size_and_keep_the_order() {
        let sizes = [407, 407, 307, 2007, 17, 17];
        assert_eq!(by_size(&sizes, |n| *n, 1000), vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(by_size(&sizes, |n| *n, 1 << 20), vec![0..6]);
        assert!(by_size(&[] as &[usize], |n| *n, 1000).is_empty());
    }
}
