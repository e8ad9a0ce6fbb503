//! Values of the per-class capacity settings: resource quantities (`limits`, `warmRequests`) and
//! the idle time after which an empty node goes away (`idleAfter`). Each is parsed once, with a
//! named error, like every identifier in [`crate::names`].

use std::fmt;
use std::str::FromStr;

/// Longest quantity accepted, in characters: the API server's own quantities are far shorter.
const MAX_QUANTITY_LEN_CHARS: usize = 64;
/// Longest idle time accepted, in seconds (30 days): past that, `Never` says what is meant.
pub const MAX_IDLE_AFTER_SECONDS: u64 = 30 * 24 * 3600;

/// Why a capacity value does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResourceError {
    /// Not a non-negative Kubernetes quantity.
    #[error(
        "'{0}' is not a non-negative Kubernetes quantity (a number with an optional suffix: m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei, or an exponent)"
    )]
    Quantity(String),
    /// Not a duration of hours, minutes and seconds, or `Never`.
    #[error(
        "'{0}' is not an idle time: hours, minutes and seconds such as 30s, 5m or 1h30m (at most {MAX_IDLE_AFTER_SECONDS}s), or Never"
    )]
    IdleAfter(String),
}

/// A non-negative Kubernetes resource quantity (`2`, `500m`, `4Gi`, `1e3`), kept as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Quantity {
    text: String,
    /// The value in thousandths of the unit, rounded up (what the scheduler compares).
    milli: u128,
}

impl Quantity {
    /// The quantity as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value in thousandths of its unit (millicores for CPU, millibytes for memory),
    /// rounded up.
    pub fn milli(&self) -> u128 {
        self.milli
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Quantity {
    type Err = ResourceError;
    fn from_str(s: &str) -> Result<Self, ResourceError> {
        let err = || ResourceError::Quantity(s.to_owned());
        if s.len() > MAX_QUANTITY_LEN_CHARS {
            return Err(err());
        }
        let number_len = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(err());
        }
        // value = mantissa / 10^fraction_len * num / den
        let mantissa: u128 = format!("{whole}{fraction}").parse().map_err(|_| err())?;
        let (num, den): (u128, u128) = match suffix {
            "" => (1, 1),
            "m" => (1, 1000),
            "k" => (1000, 1),
            "M" => (1000u128.pow(2), 1),
            "G" => (1000u128.pow(3), 1),
            "T" => (1000u128.pow(4), 1),
            "P" => (1000u128.pow(5), 1),
            "E" => (1000u128.pow(6), 1),
            "Ki" => (1 << 10, 1),
            "Mi" => (1 << 20, 1),
            "Gi" => (1 << 30, 1),
            "Ti" => (1 << 40, 1),
            "Pi" => (1 << 50, 1),
            "Ei" => (1 << 60, 1),
            e => {
                let exponent = e
                    .strip_prefix(['e', 'E'])
                    .ok_or_else(err)?
                    .parse::<i32>()
                    .map_err(|_| err())?;
                if !(-18..=18).contains(&exponent) {
                    return Err(err());
                }
                let scale = 10u128.pow(exponent.unsigned_abs());
                if exponent < 0 { (1, scale) } else { (scale, 1) }
            }
        };
        let den = u32::try_from(fraction.len())
            .ok()
            .and_then(|digits| 10u128.checked_pow(digits))
            .and_then(|scale| scale.checked_mul(den))
            .ok_or_else(err)?;
        let scaled = mantissa
            .checked_mul(num)
            .and_then(|v| v.checked_mul(1000))
            .ok_or_else(err)?;
        Ok(Self {
            text: s.to_owned(),
            milli: scaled.div_ceil(den),
        })
    }
}

/// How long a node of a class may stay empty before the autoscaler removes it: a whole number
/// of seconds, written as hours, minutes and seconds (`90s`, `5m`, `1h30m`), or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdleAfter {
    /// Remove an empty node after this many seconds.
    Seconds(u64),
    /// Never remove a node for being empty.
    Never,
}

impl fmt::Display for IdleAfter {
    /// The form Karpenter's `consolidateAfter` takes: `1h30m`, `45s`, `0s`, `Never`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self::Seconds(total) = *self else {
            return f.write_str("Never");
        };
        let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
        if total == 0 {
            return f.write_str("0s");
        }
        for (value, unit) in [(h, 'h'), (m, 'm'), (s, 's')] {
            if value > 0 {
                write!(f, "{value}{unit}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for IdleAfter {
    type Err = ResourceError;
    fn from_str(s: &str) -> Result<Self, ResourceError> {
        let err = || ResourceError::IdleAfter(s.to_owned());
        if s == "Never" {
            return Ok(Self::Never);
        }
        if s.is_empty() || s.len() > MAX_QUANTITY_LEN_CHARS {
            return Err(err());
        }
        let mut total: u64 = 0;
        let mut rest = s;
        // Units in decreasing order, each at most once: `1h30m`, not `30m1h` or `1m1m`.
        for (unit, seconds) in [('h', 3600), ('m', 60), ('s', 1)] {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(0);
            if digits > 0 && rest[digits..].starts_with(unit) {
                let value: u64 = rest[..digits].parse().map_err(|_| err())?;
                total = value
                    .checked_mul(seconds)
                    .and_then(|v| total.checked_add(v))
                    .ok_or_else(err)?;
                rest = &rest[digits + 1..];
            }
        }
        if !rest.is_empty() || total > MAX_IDLE_AFTER_SECONDS {
            return Err(err());
        }
        Ok(Self::Seconds(total))
    }
}

macro_rules! serde_via_string {
    ($name:ident) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Quantities are often written as YAML numbers (`cpu: 4`).
                let v = serde_yaml_ng::Value::deserialize(d)?;
                let s = match v {
                    serde_yaml_ng::Value::String(s) => s,
                    serde_yaml_ng::Value::Number(n) => n.to_string(),
                    _ => return Err(serde::de::Error::custom("expected a string or a number")),
                };
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_string!(Quantity);
serde_via_string!(IdleAfter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_in_thousandths() {
        let cases: &[(&str, u128)] = &[
            ("0", 0),
            ("2", 2000),
            ("500m", 500),
            ("1.5", 1500),
            (".5", 500),
            ("1k", 1_000_000),
            ("4Gi", 4 * (1 << 30) * 1000),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("0.1m", 1),
        ];
        for (text, milli) in cases {
            let q: Quantity = text.parse().unwrap();
            assert_eq!(q.milli(), *milli, "{text}");
            assert_eq!(q.to_string(), *text);
        }
    }

    #[test]
    fn rejects_what_is_not_a_quantity() {
        for bad in ["", "-1", "1.2.3", "4GB", "Gi", "1 Gi", ".", "1e99", "1x"] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad}");
        }
        // More digits than the arithmetic holds is an error, never an overflow.
        let fraction = format!("0.{}1", "0".repeat(45));
        assert!(fraction.parse::<Quantity>().is_err());
        assert!("1".repeat(40).parse::<Quantity>().is_err());
        // Past the length limit nothing is read at all.
        let long = format!("1{}", "0".repeat(MAX_QUANTITY_LEN_CHARS));
        assert_eq!(
            long.parse::<Quantity>(),
            Err(ResourceError::Quantity(long.clone()))
        );
        assert!(
            "1.000000000000000000000000000000"
                .parse::<Quantity>()
                .is_ok()
        );
    }

    #[test]
    fn idle_after_reads_hours_minutes_seconds_in_order() {
        let cases: &[(&str, Option<u64>, &str)] = &[
            ("30s", Some(30), "30s"),
            ("5m", Some(300), "5m"),
            ("1h30m", Some(5400), "1h30m"),
            ("90s", Some(90), "1m30s"),
            ("0s", Some(0), "0s"),
            ("Never", None, "Never"),
        ];
        for (text, seconds, shown) in cases {
            let v: IdleAfter = text.parse().unwrap();
            assert_eq!(v, seconds.map_or(IdleAfter::Never, IdleAfter::Seconds));
            assert_eq!(v.to_string(), *shown);
            assert_eq!(shown.parse::<IdleAfter>().unwrap(), v, "round trip");
        }
    }

    #[test]
    fn rejects_what_is_not_an_idle_time() {
        for bad in [
            "", "5", "m", "30m1h", "1m1m", "1d", "never", "-5m", "1.5h", "721h",
        ] {
            assert!(bad.parse::<IdleAfter>().is_err(), "{bad}");
        }
    }
}
