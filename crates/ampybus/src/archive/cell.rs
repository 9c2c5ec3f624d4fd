//! Column values of archive rows and their binary encoding (PostgreSQL `numeric` from a
//! scaled integer, timestamps, text without NUL bytes).

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// The SQL type of an archive column.
///
/// ```
/// use ampybus::archive::ColType;
/// assert_eq!(ColType::Numeric.sql(), "numeric");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    /// `text`
    Text,
    /// `bigint`
    Int8,
    /// `integer`
    Int4,
    /// `smallint`
    Int2,
    /// `boolean`
    Bool,
    /// `numeric` (exact decimal)
    Numeric,
    /// `timestamptz`
    Timestamptz,
    /// `bytea`
    Bytea,
}

impl ColType {
    /// The type's name in SQL.
    pub fn sql(self) -> &'static str {
        match self {
            ColType::Text => "text",
            ColType::Int8 => "bigint",
            ColType::Int4 => "integer",
            ColType::Int2 => "smallint",
            ColType::Bool => "boolean",
            ColType::Numeric => "numeric",
            ColType::Timestamptz => "timestamptz",
            ColType::Bytea => "bytea",
        }
    }

    /// The type as tokio-postgres names it.
    ///
    /// ```
    /// assert_eq!(ampybus::archive::ColType::Bytea.pg(), tokio_postgres::types::Type::BYTEA);
    /// ```
    pub fn pg(self) -> Type {
        match self {
            ColType::Text => Type::TEXT,
            ColType::Int8 => Type::INT8,
            ColType::Int4 => Type::INT4,
            ColType::Int2 => Type::INT2,
            ColType::Bool => Type::BOOL,
            ColType::Numeric => Type::NUMERIC,
            ColType::Timestamptz => Type::TIMESTAMPTZ,
            ColType::Bytea => Type::BYTEA,
        }
    }
}

/// An exact decimal `scaled × 10^-scale` (the `ampy.common.v1.Decimal` form), written as
/// PostgreSQL `numeric`.
///
/// ```
/// use ampybus::archive::Numeric;
/// assert_eq!(Numeric::new(1923450, 4).to_string(), "192.3450");
/// assert_eq!(Numeric::new(-5, 0).to_string(), "-5");
/// assert_eq!(Numeric::new(12, -3).to_string(), "12000");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numeric {
    /// The digits, as an integer.
    pub scaled: i64,
    /// Digits after the decimal point (negative: zeros appended).
    pub scale: i32,
}

/// Largest scale PostgreSQL keeps in a `numeric` display scale.
const MAX_SCALE: i32 = 0x3FFF;
/// Most zeros a negative scale appends.
const MIN_SCALE: i32 = -1000;

impl Numeric {
    /// `scaled × 10^-scale`.
    pub fn new(scaled: i64, scale: i32) -> Numeric {
        Numeric { scaled, scale }
    }

    /// Whether PostgreSQL's `numeric` can hold the value exactly: a scale from -1,000 to
    /// 16,383.
    ///
    /// ```
    /// use ampybus::archive::Numeric;
    /// assert!(Numeric::new(1, 4).is_representable());
    /// assert!(!Numeric::new(1, i32::MAX).is_representable());
    /// ```
    pub fn is_representable(&self) -> bool {
        (MIN_SCALE..=MAX_SCALE).contains(&self.scale)
    }

    /// The absolute value's digits and the number of them after the point, or `None` when
    /// the value cannot be a `numeric` (scale beyond 16,383 or a huge negative scale).
    fn digits(&self) -> Option<(String, usize)> {
        let mut digits = self.scaled.unsigned_abs().to_string();
        if self.scale < 0 {
            if self.scale < MIN_SCALE {
                return None;
            }
            digits.push_str(&"0".repeat(self.scale.unsigned_abs() as usize));
            return Some((digits, 0));
        }
        if self.scale > MAX_SCALE {
            return None;
        }
        let scale = self.scale as usize;
        if digits.len() <= scale {
            digits = format!("{}{digits}", "0".repeat(scale + 1 - digits.len()));
        }
        Some((digits, scale))
    }

    /// The PostgreSQL binary form: ndigits, weight, sign, dscale, base-10,000 digits
    /// (computed from the integer, nothing allocated).
    fn encode(&self, out: &mut BytesMut) -> Result<(), String> {
        if !self.is_representable() {
            return Err(format!(
                "decimal scale {} is outside numeric's range",
                self.scale
            ));
        }
        // Align the digits on a group boundary: a positive scale is padded to a multiple of
        // four fractional digits; a negative one appends its zeros (whole groups of them
        // only move the weight).
        let (v, shift) = if self.scale >= 0 {
            let pad = (4 - self.scale % 4) % 4;
            (
                u128::from(self.scaled.unsigned_abs()) * 10u128.pow(pad as u32),
                -((self.scale + pad) / 4),
            )
        } else {
            let zeros = -self.scale;
            (
                u128::from(self.scaled.unsigned_abs()) * 10u128.pow((zeros % 4) as u32),
                zeros / 4,
            )
        };
        // Groups, least significant first; a u64 times 1,000 has at most 7 of them.
        let mut groups = [0i16; 8];
        let mut k = 0;
        let mut rest = v;
        while rest > 0 {
            groups[k] = (rest % 10_000) as i16;
            rest /= 10_000;
            k += 1;
        }
        // Trailing zero groups are dropped (they only lower the first group's weight).
        let low = groups[..k].iter().position(|&g| g != 0).unwrap_or(k);
        let n = k - low;
        let weight = if n == 0 { 0 } else { k as i32 - 1 + shift };
        let sign: u16 = if self.scaled < 0 && n > 0 { 0x4000 } else { 0 };
        out.reserve(8 + 2 * n);
        out.put_i16(n as i16);
        out.put_i16(weight as i16);
        out.put_u16(sign);
        out.put_u16(self.scale.max(0) as u16);
        for &g in groups[low..k].iter().rev() {
            out.put_i16(g);
        }
        Ok(())
    }
}

impl std::fmt::Display for Numeric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some((digits, scale)) = self.digits() else {
            return write!(f, "{}e{}", self.scaled, -self.scale);
        };
        let sign = if self.scaled < 0 { "-" } else { "" };
        let (int, frac) = digits.split_at(digits.len() - scale);
        if frac.is_empty() {
            write!(f, "{sign}{int}")
        } else {
            write!(f, "{sign}{int}.{frac}")
        }
    }
}

/// One value of an archive row. Text never holds a NUL byte (PostgreSQL refuses it in
/// `text`): [`Cell::text`] replaces each with U+FFFD.
///
/// ```
/// use ampybus::archive::Cell;
/// assert_eq!(Cell::text("a\0b"), Cell::Text("a\u{fffd}b".into()));
/// assert_eq!(Cell::opt_text(""), Cell::Null);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// `text`
    Text(String),
    /// `bigint`
    Int8(i64),
    /// `integer`
    Int4(i32),
    /// `smallint`
    Int2(i16),
    /// `boolean`
    Bool(bool),
    /// `numeric`
    Numeric(Numeric),
    /// `timestamptz`
    Time(DateTime<Utc>),
    /// `bytea`
    Bytes(Bytes),
}

impl Cell {
    /// Text, NUL bytes replaced.
    pub fn text(s: &str) -> Cell {
        if s.contains('\0') {
            Cell::Text(s.replace('\0', "\u{fffd}"))
        } else {
            Cell::Text(s.to_owned())
        }
    }

    /// Text, or NULL for an empty string (proto3's "unset").
    pub fn opt_text(s: &str) -> Cell {
        if s.is_empty() {
            Cell::Null
        } else {
            Cell::text(s)
        }
    }

    /// A numeric, or NULL.
    pub fn numeric(v: Option<Numeric>) -> Cell {
        v.map_or(Cell::Null, Cell::Numeric)
    }

    /// A timestamp, or NULL.
    pub fn time(v: Option<DateTime<Utc>>) -> Cell {
        v.map_or(Cell::Null, Cell::Time)
    }

    /// Whether the value can go into a column of type `t` (NULL goes anywhere; the table
    /// decides whether it accepts NULL).
    pub fn fits(&self, t: ColType) -> bool {
        matches!(
            (self, t),
            (Cell::Null, _)
                | (Cell::Text(_), ColType::Text)
                | (Cell::Int8(_), ColType::Int8)
                | (Cell::Int4(_), ColType::Int4)
                | (Cell::Int2(_), ColType::Int2)
                | (Cell::Bool(_), ColType::Bool)
                | (Cell::Numeric(_), ColType::Numeric)
                | (Cell::Time(_), ColType::Timestamptz)
                | (Cell::Bytes(_), ColType::Bytea)
        )
    }
}

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Text(s) => s.to_sql(ty, out),
            Cell::Int8(v) => v.to_sql(ty, out),
            Cell::Int4(v) => v.to_sql(ty, out),
            Cell::Int2(v) => v.to_sql(ty, out),
            Cell::Bool(v) => v.to_sql(ty, out),
            Cell::Numeric(n) => {
                n.encode(out)?;
                Ok(IsNull::No)
            }
            Cell::Time(t) => t.to_sql(ty, out),
            Cell::Bytes(b) => b.as_ref().to_sql(ty, out),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(n: Numeric) -> Vec<i16> {
        let mut b = BytesMut::new();
        n.encode(&mut b).unwrap();
        b.chunks(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    fn group(c: &[u8]) -> i16 {
        c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(d - b'0'))
    }

    /// The encoding as it was first written (through the decimal text): the reference.
    fn encode_by_text(n: &Numeric, out: &mut BytesMut) -> Result<(), String> {
        let (digits, scale) = n
            .digits()
            .ok_or_else(|| format!("decimal scale {} is outside numeric's range", n.scale))?;
        let (int, frac) = digits.split_at(digits.len() - scale);
        // Groups of four digits, aligned on the decimal point.
        let mut groups: Vec<i16> = Vec::with_capacity(digits.len() / 4 + 2);
        let lead = int.len() % 4;
        let mut weight = (int.len().div_ceil(4)) as i32 - 1;
        if lead > 0 {
            groups.push(int[..lead].parse().unwrap_or(0));
        }
        for c in int.as_bytes()[lead..].chunks(4) {
            groups.push(group(c));
        }
        for c in frac.as_bytes().chunks(4) {
            let mut g = group(c);
            for _ in c.len()..4 {
                g *= 10;
            }
            groups.push(g);
        }
        // Strip leading zero groups (each lowers the weight) and trailing zero groups.
        let first = groups.iter().position(|&g| g != 0);
        let (start, end) = match first {
            None => (0, 0),
            Some(f) => (f, groups.iter().rposition(|&g| g != 0).unwrap_or(f) + 1),
        };
        if first.is_none() {
            weight = 0;
        } else {
            weight -= start as i32;
        }
        let sign: u16 = if n.scaled < 0 && first.is_some() {
            0x4000
        } else {
            0
        };
        let n = end - start;
        out.reserve(8 + 2 * n);
        out.put_i16(n as i16);
        out.put_i16(weight as i16);
        out.put_u16(sign);
        out.put_u16(scale as u16);
        for &g in &groups[start..end] {
            out.put_i16(g);
        }
        Ok(())
    }

    #[test]
    fn numeric_binary_form() {
        // 192.3450: groups 192 | 3450, weight 0, dscale 4
        assert_eq!(enc(Numeric::new(1923450, 4)), [2, 0, 0, 4, 192, 3450]);
        // 0.0001: one group 1 at weight -1
        assert_eq!(enc(Numeric::new(1, 4)), [1, -1, 0, 4, 1]);
        // -12345.6: 1 | 2345 . 6000
        assert_eq!(
            enc(Numeric::new(-123456, 1)),
            [3, 1, 0x4000, 1, 1, 2345, 6000]
        );
        // zero keeps its scale
        assert_eq!(enc(Numeric::new(0, 2)), [0, 0, 0, 2]);
        // 10000: one group 1 at weight 1
        assert_eq!(enc(Numeric::new(10000, 0)), [1, 1, 0, 0, 1]);
        assert_eq!(enc(Numeric::new(12, -3)), [2, 1, 0, 0, 1, 2000]);
        assert!(
            Numeric::new(1, 20_000)
                .encode(&mut BytesMut::new())
                .is_err()
        );
    }

    /// The arithmetic encoding equals the one through the text, for every kind of value.
    #[test]
    fn numeric_arithmetic_equals_text() {
        let mut values = vec![
            0i64,
            1,
            -1,
            9,
            10,
            9999,
            10_000,
            123_456_789,
            i64::MAX,
            i64::MIN,
        ];
        for p in 0..19 {
            let t = 10i64.pow(p);
            values.extend([t, t - 1, t + 1, -t, 7 * t / 3 + 5]);
        }
        for v in values {
            for scale in (-1000..=-990)
                .chain(-9..=40)
                .chain([100, 1001, 16_380, 16_383])
            {
                let n = Numeric::new(v, scale);
                let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
                n.encode(&mut a).unwrap();
                encode_by_text(&n, &mut b).unwrap();
                assert_eq!(a, b, "{v} scale {scale}");
            }
        }
        for scale in [-1001, 16_384, i32::MIN, i32::MAX] {
            let e = Numeric::new(1, scale)
                .encode(&mut BytesMut::new())
                .unwrap_err();
            assert!(e.contains(&format!("decimal scale {scale}")), "{e}");
        }
    }

    #[test]
    fn numeric_text() {
        assert_eq!(Numeric::new(5, 3).to_string(), "0.005");
        assert_eq!(Numeric::new(-5, 3).to_string(), "-0.005");
        assert_eq!(
            Numeric::new(i64::MIN, 2).to_string(),
            "-92233720368547758.08"
        );
    }
}
