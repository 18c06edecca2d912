//! Comparing Kubernetes resource quantities by value.
//!
//! The API server stores quantities in canonical form (`1000m` becomes `1`, `0.5` becomes
//! `500m`, `1024Mi` becomes `1Gi`), so the `resources` a user wrote in the pipeline rarely equal,
//! as strings, what a live Deployment shows. Comparing them as strings would re-apply every
//! Deployment on every refresh. Parsing is small enough to keep here rather than add a crate.

/// The quantity's value, or `None` when `text` is not a quantity.
pub fn value(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        // Decimal exponent: `1e3`, `5E-3`.
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    Some(number * scale)
}

/// Whether two strings are the same quantity (written alike or not).
pub fn same(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (value(a), value(b)) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_are_the_same_quantity() {
        for (a, b) in [
            ("1000m", "1"),
            ("0.5", "500m"),
            ("1024Mi", "1Gi"),
            ("1e3", "1k"),
            ("129e6", "129M"),
            ("100m", "0.1"),
        ] {
            assert!(same(a, b), "{a} = {b}");
        }
        for (a, b) in [("1", "2"), ("1Gi", "1G"), ("500m", "5"), ("1", "one")] {
            assert!(!same(a, b), "{a} != {b}");
        }
        assert_eq!(value("2Ki"), Some(2048.0));
        assert_eq!(value("abc"), None);
        assert_eq!(value("1Zi"), None);
    }
}
