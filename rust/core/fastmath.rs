//! Branch-free `exp` and `log1p` for the loss kernels.
//!
//! Written with plain arithmetic and bit casts only, so LLVM vectorises the kernel loops (libm
//! calls would not vectorise). Accuracy is within a few ulp of the correctly rounded result on
//! the ranges the kernels use; unit tests check this against `std`.

/// Floating-point element type of a kernel (`f32` or `f64`).
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_i64(x: i64) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;
    /// `exp(x)` for `x <= 0` (any finite or `-inf` input; underflows smoothly to ~0).
    fn exp_nonpos(x: Self) -> Self;
    /// `log(1 + e)` for `e` in `[0, 1]`, accurate in relative terms also for tiny `e`.
    fn log1p_unit(e: Self) -> Self;
    /// `exp(x)` for any `x` (the standard library's; overflows to `inf`).
    fn exp(self) -> Self;
    /// `exp(x) - 1`, accurate near 0.
    fn exp_m1(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// `log(1 + x)`, accurate near 0.
    fn ln_1p(self) -> Self;
    /// A key whose unsigned order is the IEEE total order of the value.
    fn order_key(self) -> u64;
}

// ln 2 split so that n * LN2_HI is exact for the exponents used (Cody-Waite reduction).
const LN2_HI_F64: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO_F64: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_i64(x: i64) -> Self {
        x as f64
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp_m1(self) -> Self {
        f64::exp_m1(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn ln_1p(self) -> Self {
        f64::ln_1p(self)
    }
    #[inline(always)]
    fn order_key(self) -> u64 {
        let b = self.to_bits();
        if b >> 63 == 1 {
            !b
        } else {
            b | 1 << 63
        }
    }

    #[inline(always)]
    fn exp_nonpos(x: f64) -> f64 {
        // Clamp keeps 2^n a normal number; exp(-708) ~ 3e-308 is as good as zero here.
        let x = if x > -708.0 { x } else { -708.0 };
        // Round x/ln2 to the nearest integer by adding 1.5 * 2^52: the integer lands in the low
        // mantissa bits, with no float->int conversion (which would not vectorise well).
        const SHIFT: f64 = 6_755_399_441_055_744.0;
        let t = x * std::f64::consts::LOG2_E + SHIFT;
        let n = t - SHIFT;
        let r = x - n * LN2_HI_F64 - n * LN2_LO_F64;
        // Taylor series of exp(r) on |r| <= ln2/2; truncation error < 2e-17.
        let mut p = 1.0 / 479_001_600.0;
        p = p * r + 1.0 / 39_916_800.0;
        p = p * r + 1.0 / 3_628_800.0;
        p = p * r + 1.0 / 362_880.0;
        p = p * r + 1.0 / 40_320.0;
        p = p * r + 1.0 / 5_040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        let ni = t.to_bits().wrapping_sub(SHIFT.to_bits());
        let scale = f64::from_bits(ni.wrapping_add(1023) << 52);
        p * scale
    }

    #[inline(always)]
    fn log1p_unit(e: f64) -> f64 {
        // log(1+e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3]; odd series in s.
        let s = e / (2.0 + e);
        let s2 = s * s;
        let mut p = 1.0 / 33.0;
        p = p * s2 + 1.0 / 31.0;
        p = p * s2 + 1.0 / 29.0;
        p = p * s2 + 1.0 / 27.0;
        p = p * s2 + 1.0 / 25.0;
        p = p * s2 + 1.0 / 23.0;
        p = p * s2 + 1.0 / 21.0;
        p = p * s2 + 1.0 / 19.0;
        p = p * s2 + 1.0 / 17.0;
        p = p * s2 + 1.0 / 15.0;
        p = p * s2 + 1.0 / 13.0;
        p = p * s2 + 1.0 / 11.0;
        p = p * s2 + 1.0 / 9.0;
        p = p * s2 + 1.0 / 7.0;
        p = p * s2 + 1.0 / 5.0;
        p = p * s2 + 1.0 / 3.0;
        p = p * s2 + 1.0;
        2.0 * s * p
    }
}

const LN2_HI_F32: f32 = f32::from_bits(0x3f31_7200);
const LN2_LO_F32: f32 = f32::from_bits(0x35bf_be8e);

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_i64(x: i64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn exp_m1(self) -> Self {
        f32::exp_m1(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn ln_1p(self) -> Self {
        f32::ln_1p(self)
    }
    #[inline(always)]
    fn order_key(self) -> u64 {
        let b = self.to_bits();
        u64::from(if b >> 31 == 1 { !b } else { b | 1 << 31 })
    }

    #[inline(always)]
    fn exp_nonpos(x: f32) -> f32 {
        let x = if x > -87.0 { x } else { -87.0 };
        const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23, see the f64 version.
        let t = x * std::f32::consts::LOG2_E + SHIFT;
        let n = t - SHIFT;
        let r = x - n * LN2_HI_F32 - n * LN2_LO_F32;
        let mut p = 1.0 / 5_040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        let ni = t.to_bits().wrapping_sub(SHIFT.to_bits());
        let scale = f32::from_bits(ni.wrapping_add(127) << 23);
        p * scale
    }

    #[inline(always)]
    fn log1p_unit(e: f32) -> f32 {
        let s = e / (2.0 + e);
        let s2 = s * s;
        let mut p = 1.0 / 17.0;
        p = p * s2 + 1.0 / 15.0;
        p = p * s2 + 1.0 / 13.0;
        p = p * s2 + 1.0 / 11.0;
        p = p * s2 + 1.0 / 9.0;
        p = p * s2 + 1.0 / 7.0;
        p = p * s2 + 1.0 / 5.0;
        p = p * s2 + 1.0 / 3.0;
        p = p * s2 + 1.0;
        2.0 * s * p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        if b == 0.0 {
            a.abs()
        } else {
            ((a - b) / b).abs()
        }
    }

    #[test]
    fn exp_matches_std_f64() {
        let mut x = -707.0;
        while x <= 0.0 {
            assert!(rel(f64::exp_nonpos(x), x.exp()) < 4e-16, "x={x}");
            x += 0.0137;
        }
        assert!(f64::exp_nonpos(f64::NEG_INFINITY) < 1e-300);
        assert_eq!(f64::exp_nonpos(0.0), 1.0);
    }

    #[test]
    fn exp_matches_std_f32() {
        let mut x = -86.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            assert!(rel(f32::exp_nonpos(x) as f64, want) < 3e-7, "x={x}");
            x += 0.0071;
        }
        assert!(f32::exp_nonpos(-1e4) < 1e-37);
    }

    #[test]
    fn log1p_matches_std() {
        for k in 0..=2000 {
            let e = if k == 0 {
                0.0
            } else {
                (k as f64 / 2000.0).powi(3)
            };
            let r64 = rel(f64::log1p_unit(e), e.ln_1p());
            assert!(r64 < 1e-15, "e={e} rel={r64}");
            let e32 = e as f32;
            let want = (e32 as f64).ln_1p();
            let got = f32::log1p_unit(e32) as f64;
            assert!(rel(got, want) < 3e-7, "e={e32} rel={}", rel(got, want));
        }
        assert!(rel(f64::log1p_unit(1e-300), 1e-300) < 1e-15);
    }
}
