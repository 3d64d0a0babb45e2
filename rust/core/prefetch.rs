//! Read-ahead hints for memory-mapped stores: before a scan of every pair's lengths, the kernel
//! is asked for exactly the offsets pages (`MADV_WILLNEED`), in large requests, where page faults
//! in a file mapped for random access would read one page at a time. A hint only: results never
//! depend on it.

use super::parts::Parts;
use super::store::Ints;

/// `(start, end)` byte addresses of a run, widened to whole pages.
fn page_span(run: &Ints<'_>, page: usize) -> Option<(usize, usize)> {
    let (ptr, bytes) = match run {
        Ints::I32(v) => (v.as_ptr() as usize, std::mem::size_of_val(*v)),
        Ints::I64(v) => (v.as_ptr() as usize, std::mem::size_of_val(*v)),
    };
    (bytes > 0).then(|| (ptr & !(page - 1), (ptr + bytes).div_ceil(page) * page))
}

/// The page ranges `runs` cover, sorted and merged.
pub fn page_ranges<'a>(
    runs: impl IntoIterator<Item = Ints<'a>>,
    page: usize,
) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = runs
        .into_iter()
        .filter_map(|r| page_span(&r, page))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn advise<'a>(runs: impl IntoIterator<Item = Ints<'a>>) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        for (s, e) in page_ranges(runs, page.max(1)) {
            // SAFETY: the range lies within pages of live borrowed slices (widened to page
            // bounds, which madvise requires); MADV_WILLNEED never changes memory contents.
            unsafe { libc::madvise(s as *mut libc::c_void, e - s, libc::MADV_WILLNEED) };
        }
    }
    #[cfg(not(unix))]
    let _ = runs.into_iter();
}

/// Ask the kernel to read every offsets section (before a scan of all lengths): exactly those
/// pages, where a page fault's read-around would also pull in the neighbouring token sections.
pub fn will_need_offsets(parts: &Parts<'_>) {
    advise(
        parts
            .parts()
            .iter()
            .flat_map(|p| p.columns().map(|c| c.offsets)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::PairRef;

    #[test]
    fn ranges_cover_whole_pages_and_merge() {
        let v = vec![7i32; 3000];
        let pair = |a: usize, b: usize, c: usize| PairRef {
            index: 0,
            prompt: Ints::I32(&v[a..a + 1]),
            chosen: Ints::I32(&v[b..b + 1]),
            rejected: Ints::I32(&v[c..c + 1]),
        };
        let base = v.as_ptr() as usize;
        let pairs = [pair(0, 1, 2999), pair(2000, 2, 3)];
        let ranges = page_ranges(
            pairs.iter().flat_map(|p| [p.prompt, p.chosen, p.rejected]),
            4096,
        );
        assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
        assert!(ranges
            .iter()
            .all(|(s, e)| s % 4096 == 0 && e % 4096 == 0 && s < e));
        for addr in [base, base + 4 * 2000, base + 4 * 2999] {
            assert!(ranges.iter().any(|&(s, e)| s <= addr && addr < e));
        }
    }
}
