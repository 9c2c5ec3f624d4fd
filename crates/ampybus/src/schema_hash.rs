//! `schema_hash` computed the way the seed package does (off by default).
//!
//! * linked type: `sha256:` + hex(sha256(FileDescriptorProto bytes ‖ fqdn))
//! * otherwise: `nameonly:sha256:` + hex(sha256("fqdn:" + fqdn))
//!
//! Consumers verify a `schema_hash` only when both sides can compute the same form: a
//! `nameonly:` hash is always checkable; a `sha256:` hash only when the consumer links the same
//! file descriptor.

use sha2::{Digest, Sha256};

/// The name-only form.
///
/// ```
/// assert_eq!(
///     ampybus::schema_hash::name_only("ampy.bars.v1.BarBatch"),
///     "nameonly:sha256:3b2d6ec8fee72f3910ca2f7c9b852eb73c8d6be4150bad6e0142478a318031f9"
/// );
/// ```
pub fn name_only(fqdn: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"fqdn:");
    h.update(fqdn.as_bytes());
    format!("nameonly:sha256:{}", hex::encode(h.finalize()))
}

/// The linked-type form from the serialized FileDescriptorProto of the file defining `fqdn`.
///
/// ```
/// let h = ampybus::schema_hash::linked(b"\x0a\x03x.p", "x.M");
/// assert!(h.starts_with("sha256:") && h.len() == 71);
/// ```
pub fn linked(file_descriptor_proto: &[u8], fqdn: &str) -> String {
    let mut h = Sha256::new();
    h.update(file_descriptor_proto);
    h.update(fqdn.as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Outcome of checking a received `schema_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashCheck {
    /// The hash matches.
    Match,
    /// Both sides can compute this form and it differs.
    Mismatch {
        /// What we computed.
        expected: String,
    },
    /// This side cannot compute the received form; not checked.
    Unverifiable,
}

/// Checks a received `schema_hash` for `fqdn`, given our file descriptor bytes when linked.
///
/// ```
/// use ampybus::schema_hash::{check, name_only, HashCheck};
/// let h = name_only("ampy.bars.v1.BarBatch");
/// assert_eq!(check(&h, "ampy.bars.v1.BarBatch", None), HashCheck::Match);
/// assert!(matches!(check(&h, "ampy.bars.v1.Bar", None), HashCheck::Mismatch { .. }));
/// assert_eq!(check("sha256:00", "ampy.bars.v1.BarBatch", None), HashCheck::Unverifiable);
/// ```
pub fn check(received: &str, fqdn: &str, file_descriptor_proto: Option<&[u8]>) -> HashCheck {
    let expected = if received.starts_with("nameonly:") {
        name_only(fqdn)
    } else if let Some(fd) = file_descriptor_proto.filter(|_| received.starts_with("sha256:")) {
        linked(fd, fqdn)
    } else {
        return HashCheck::Unverifiable;
    };
    if expected == received {
        HashCheck::Match
    } else {
        HashCheck::Mismatch { expected }
    }
}
