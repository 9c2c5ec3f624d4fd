//! The registry and manifest files as written (TOML, every table `deny_unknown_fields`), and
//! the mapping of a parse error to the file, line and field it names.

use super::{RegistryError, RegistryErrorKind};
use serde::Deserialize;
use std::path::Path;
use toml::Spanned;

/// A registry file: `[[topic]]` entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRegistry {
    #[serde(default)]
    pub(crate) topic: Vec<Spanned<RawEntry>>,
}

/// One `[[topic]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEntry {
    pub(crate) pattern: Spanned<String>,
    pub(crate) owner: Spanned<String>,
    pub(crate) schemas: Spanned<Vec<String>>,
    pub(crate) tier: Spanned<String>,
    pub(crate) retention_days: Spanned<i64>,
    pub(crate) max_rate: Option<Spanned<f64>>,
    pub(crate) consumers: Option<Spanned<Vec<String>>>,
    pub(crate) description: Option<String>,
}

/// A service manifest (seed 003): what one service publishes and consumes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawManifest {
    pub(crate) service: Spanned<String>,
    #[serde(default)]
    pub(crate) publishes: Vec<Spanned<RawClaim>>,
    #[serde(default)]
    pub(crate) consumes: Vec<Spanned<RawClaim>>,
}

/// A `[[publishes]]` or `[[consumes]]` entry of a manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClaim {
    pub(crate) pattern: Spanned<String>,
    pub(crate) schema: Option<Spanned<String>>,
}

/// The 1-based line of a byte offset in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Reads a file, naming it in the error.
pub(crate) fn read(path: &Path) -> Result<String, RegistryError> {
    std::fs::read_to_string(path).map_err(|e| {
        RegistryError::new(
            RegistryErrorKind::Read,
            path.display().to_string(),
            None,
            format!("cannot read the file: {e}"),
        )
    })
}

/// Parses TOML text into `T`; a syntax error, an unknown field, a missing field or a wrong
/// type is a `Parse` error naming `origin`, the line and (from the parser) the field.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, RegistryError> {
    toml::from_str::<T>(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        RegistryError::new(
            RegistryErrorKind::Parse,
            origin.to_owned(),
            line,
            e.message().trim().to_owned(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let text = "[[topic]]\npattern = \"ampy.*.orders.v1.>\"\nownr = \"oms\"\n";
        let e = parse::<RawRegistry>(text, "r.toml").unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::Parse);
        assert_eq!(e.line(), Some(3));
        assert!(e.to_string().starts_with("r.toml:3: "), "{e}");
        assert!(e.to_string().contains("unknown field `ownr`"), "{e}");
    }
}
