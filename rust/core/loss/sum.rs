//! Batch sums: compensated f64 sums, per-task partial results, and the rayon chunk size.

use crate::core::fastmath::Real;

/// Pairs per rayon task: large enough to amortise scheduling, small enough to balance 2+ cores.
pub(super) const CHUNK: usize = 1 << 15;

/// A compensated (Neumaier) f64 sum: `hi + lo` carries the rounding error of each addition, so
/// batch means stay within about one ulp however many pairs are summed.
#[derive(Default, Clone, Copy, Debug)]
pub(super) struct Sum {
    hi: f64,
    lo: f64,
}

impl Sum {
    #[inline(always)]
    pub(super) fn add(&mut self, x: f64) {
        let t = self.hi + x;
        self.lo += if self.hi.abs() >= x.abs() {
            (self.hi - t) + x
        } else {
            (x - t) + self.hi
        };
        self.hi = t;
    }

    pub(super) fn merge(mut self, o: Self) -> Self {
        self.add(o.hi);
        self.lo += o.lo;
        self
    }

    pub(super) fn minus(mut self, o: Self) -> Self {
        self.add(-o.hi);
        self.lo -= o.lo;
        self
    }

    pub(super) fn value(self) -> f64 {
        self.hi + self.lo
    }
}

/// One task's share of the batch sums.
#[derive(Default, Clone)]
pub(super) struct Partial {
    pub(super) loss: Sum,
    pub(super) correct: u64,
    pub(super) chosen_reward: Sum,
    pub(super) rejected_reward: Sum,
    pub(super) components: Vec<Sum>,
    pub(super) non_finite: bool,
}

impl Partial {
    pub(super) fn new(components: usize) -> Self {
        Self {
            components: vec![Sum::default(); components],
            ..Self::default()
        }
    }

    pub(super) fn merge(self, o: Self) -> Self {
        Self {
            loss: self.loss.merge(o.loss),
            correct: self.correct + o.correct,
            chosen_reward: self.chosen_reward.merge(o.chosen_reward),
            rejected_reward: self.rejected_reward.merge(o.rejected_reward),
            components: self
                .components
                .iter()
                .zip(&o.components)
                .map(|(a, b)| a.merge(*b))
                .collect(),
            non_finite: self.non_finite | o.non_finite,
        }
    }
}

/// Kahan-compensated sum of `x` in f64 over independent lanes, so the loop vectorises.
#[inline(always)]
pub(super) fn lane_sum<T: Real>(x: &[T]) -> Sum {
    if std::mem::size_of::<T>() == 4 {
        // float32 values summed in f64 over one block lose nothing float32 could show; the
        // blocks are then combined with compensation.
        let mut sum = [0.0f64; 8];
        let mut it = x.chunks_exact(8);
        for c in &mut it {
            for k in 0..8 {
                sum[k] += c[k].to_f64();
            }
        }
        let mut total = Sum::default();
        for v in sum {
            total.add(v);
        }
        for v in it.remainder() {
            total.add(v.to_f64());
        }
        return total;
    }
    let mut sum = [0.0f64; 8];
    let mut comp = [0.0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            let y = c[k].to_f64() - comp[k];
            let t = sum[k] + y;
            comp[k] = (t - sum[k]) - y;
            sum[k] = t;
        }
    }
    let mut total = Sum::default();
    for k in 0..8 {
        total.add(sum[k]);
        total.add(-comp[k]);
    }
    for v in it.remainder() {
        total.add(v.to_f64());
    }
    total
}
