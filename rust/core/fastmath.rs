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
    fn from_i32(x: i32) -> Self;
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
    /// `exp(x)` over the whole range (overflows to `inf`, underflows to 0), branch-free.
    fn exp_any(self) -> Self;
    /// `exp(x) - 1`, accurate near 0, branch-free.
    fn expm1_fast(self) -> Self;
    /// `exp(x) - 1` for `|x| <= ln 2` only (its Taylor series).
    fn expm1_small(self) -> Self;
    /// `ln(x)` for finite `x > 0` (subnormals included), branch-free.
    fn ln_pos(self) -> Self;
}

/// Taylor coefficients 1/k! for k = 0..=18.
const INV_FACT: [f64; 19] = {
    let mut c = [1.0f64; 19];
    let mut k = 1;
    while k < 19 {
        c[k] = c[k - 1] / k as f64;
        k += 1;
    }
    c
};

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
    fn from_i32(x: i32) -> Self {
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
    fn exp_any(self) -> f64 {
        // Inputs are finite; beyond these bounds the result is 0 or inf anyway.
        let x = if self > -746.0 { self } else { -746.0 };
        let x = if x < 710.0 { x } else { 710.0 };
        const SHIFT: f64 = 6_755_399_441_055_744.0;
        let t = x * std::f64::consts::LOG2_E + SHIFT;
        let n = t - SHIFT;
        let r = x - n * LN2_HI_F64 - n * LN2_LO_F64;
        let mut p = INV_FACT[13];
        for c in INV_FACT[..13].iter().rev() {
            p = p * r + c;
        }
        // 2^n as two factors, so that neither overflows nor underflows on its own.
        let ni = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i64;
        let h = ni >> 1;
        let s1 = f64::from_bits(((h + 1023) as u64) << 52);
        let s2 = f64::from_bits(((ni - h + 1023) as u64) << 52);
        p * s1 * s2
    }

    #[inline(always)]
    fn expm1_small(self) -> f64 {
        let x = self;
        let mut q = INV_FACT[18];
        for c in INV_FACT[1..18].iter().rev() {
            q = q * x + c;
        }
        x * q
    }

    #[inline(always)]
    fn expm1_fast(self) -> f64 {
        let x = self;
        // Both branches are computed and one is selected, so loops stay vectorised.
        let small = x.expm1_small();
        let large = x.exp_any() - 1.0;
        if x.abs() <= std::f64::consts::LN_2 {
            small
        } else {
            large
        }
    }

    #[inline(always)]
    fn ln_pos(self) -> f64 {
        let sub = self < f64::MIN_POSITIVE;
        let x = if sub {
            self * 18_014_398_509_481_984.0
        } else {
            self
        }; // 2^54
        let bits = x.to_bits();
        let e = ((bits >> 52) & 0x7ff) as i32 - 1023 - if sub { 54 } else { 0 };
        let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
        let big = m > std::f64::consts::SQRT_2;
        let m = if big { m * 0.5 } else { m };
        let e = f64::from(e + i32::from(big));
        // ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716.
        let f = m - 1.0;
        let s = f / (2.0 + f);
        let s2 = s * s;
        let mut p = 1.0 / 23.0;
        for k in (0..11).rev() {
            p = p * s2 + 1.0 / (2 * k + 1) as f64;
        }
        e * LN2_HI_F64 + (2.0 * s * p + e * LN2_LO_F64)
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
    fn from_i32(x: i32) -> Self {
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
    fn exp_any(self) -> f32 {
        let x = if self > -104.0 { self } else { -104.0 };
        let x = if x < 89.0 { x } else { 89.0 };
        const SHIFT: f32 = 12_582_912.0;
        let t = x * std::f32::consts::LOG2_E + SHIFT;
        let n = t - SHIFT;
        let r = x - n * LN2_HI_F32 - n * LN2_LO_F32;
        let mut p = INV_FACT[7] as f32;
        for c in INV_FACT[..7].iter().rev() {
            p = p * r + *c as f32;
        }
        let ni = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32;
        let h = ni >> 1;
        let s1 = f32::from_bits(((h + 127) as u32) << 23);
        let s2 = f32::from_bits(((ni - h + 127) as u32) << 23);
        p * s1 * s2
    }

    #[inline(always)]
    fn expm1_small(self) -> f32 {
        let x = self;
        let mut q = INV_FACT[10] as f32;
        for c in INV_FACT[1..10].iter().rev() {
            q = q * x + *c as f32;
        }
        x * q
    }

    #[inline(always)]
    fn expm1_fast(self) -> f32 {
        let x = self;
        // Both branches are computed and one is selected, so loops stay vectorised.
        let small = x.expm1_small();
        let large = x.exp_any() - 1.0;
        if x.abs() <= std::f32::consts::LN_2 {
            small
        } else {
            large
        }
    }

    #[inline(always)]
    fn ln_pos(self) -> f32 {
        let sub = self < f32::MIN_POSITIVE;
        let x = if sub { self * 16_777_216.0 } else { self }; // 2^24
        let bits = x.to_bits();
        let e = ((bits >> 23) & 0xff) as i32 - 127 - if sub { 24 } else { 0 };
        let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
        let big = m > std::f32::consts::SQRT_2;
        let m = if big { m * 0.5 } else { m };
        let e = (e + i32::from(big)) as f32;
        let f = m - 1.0;
        let s = f / (2.0 + f);
        let s2 = s * s;
        let mut p = 1.0 / 13.0;
        for k in (0..6).rev() {
            p = p * s2 + 1.0 / (2 * k + 1) as f32;
        }
        e * LN2_HI_F32 + (2.0 * s * p + e * LN2_LO_F32)
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

    #[test]
    fn exp_any_matches_std() {
        let mut x = -745.0f64;
        while x <= 709.7 {
            let want = x.exp();
            let got = x.exp_any();
            let tol = if want < f64::MIN_POSITIVE {
                2e-323
            } else {
                4e-16 * want
            };
            assert!((got - want).abs() <= tol, "x={x} got={got} want={want}");
            x += 0.0731;
        }
        assert_eq!(710.0f64.exp_any(), f64::INFINITY);
        let mut y = -103.0f32;
        while y <= 88.7 {
            let want = (y as f64).exp();
            let got = y.exp_any() as f64;
            let tol = if want < f32::MIN_POSITIVE as f64 {
                3e-45
            } else {
                3e-7 * want
            };
            assert!((got - want).abs() <= tol, "y={y} got={got} want={want}");
            y += 0.0173;
        }
        assert_eq!(89.0f32.exp_any(), f32::INFINITY);
    }

    #[test]
    fn expm1_and_ln_match_std() {
        for k in -4000..=4000 {
            let x = k as f64 * 1e-3 * (1.0 + (k as f64).abs() * 1e-3);
            for x in [x, x * 1e-9] {
                // Beyond ln 2 it is exp(x) - 1: one more rounding of a value up to 2x larger.
                assert!(rel(x.expm1_fast(), x.exp_m1()) < 6e-16, "x={x}");
                let x32 = x as f32;
                let want = (x32 as f64).exp_m1();
                assert!(rel(x32.expm1_fast() as f64, want) < 3e-7, "x32={x32}");
            }
        }
        let mut x = 1e-310f64;
        while x < 1e300 {
            assert!(
                (x.ln_pos() - x.ln()).abs() <= 3e-16 * x.ln().abs().max(1.0),
                "x={x}"
            );
            let x32 = x as f32;
            if x32 > 0.0 && x32.is_finite() {
                let want = (x32 as f64).ln();
                assert!(
                    (x32.ln_pos() as f64 - want).abs() <= 2e-7 * want.abs().max(1.0),
                    "{x32}"
                );
            }
            x *= 1.37;
        }
        for x in [0.5f64, 0.70712, 0.99999999, 1.0, 1.0000001, 1.41418, 2.0] {
            assert!((x.ln_pos() - x.ln()).abs() <= 2e-16, "x={x}");
        }
    }
}
