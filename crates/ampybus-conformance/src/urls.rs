//! Bad URLs and unreachable brokers: the same checks for every broker binding.

use ampybus::{Bus, ErrorKind};
use std::time::{Duration, Instant};

/// What [`bad_urls_fail_fast_and_clearly`] tries for one broker binding.
///
/// ```
/// let probe = ampybus_conformance::BadUrls {
///     scheme: "redis",
///     unreachable_query: "?connect_timeout_ms=1000",
///     missing_ca: Some(("rediss://127.0.0.1:1?tls_ca=/nonexistent/ca.pem", "tls_ca")),
///     unreachable_kinds: &[ampybus::ErrorKind::Transport, ampybus::ErrorKind::Timeout],
///     unreachable_text: "",
///     limit: std::time::Duration::from_secs(30),
/// };
/// assert_eq!(probe.scheme, "redis");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BadUrls<'a> {
    /// The URL scheme (`nats`, `redis`, `kafka`).
    pub scheme: &'a str,
    /// Appended to the URL of the unreachable server (e.g. a short connect timeout).
    pub unreachable_query: &'a str,
    /// A URL naming a CA file that does not exist, and the option that names it: refused
    /// as `Config` naming the option. `None` where the binding has no such option.
    pub missing_ca: Option<(&'a str, &'a str)>,
    /// The error kinds an unreachable server may give (`Transport`, `Timeout`, or one).
    pub unreachable_kinds: &'a [ErrorKind],
    /// Text the error of an unreachable server must hold besides its address (`""`: none).
    pub unreachable_text: &'a str,
    /// Every attempt must end within this time.
    pub limit: Duration,
}

async fn within<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let r = tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for more than {limit:?}"));
    eprintln!("{what}: {:.2?}", start.elapsed());
    r
}

/// Bad URLs and an unreachable server fail fast and clearly on a broker binding: a garbage
/// port (`Config`, naming it), an unknown option (`Config`, naming it), a misspelt scheme
/// (`Config`, naming it), a server that is not there (one of `unreachable_kinds`, naming the
/// address and holding `unreachable_text`, never showing the password of the URL) and a missing CA file (`Config`, naming
/// the option) — each within `probe.limit`. Panics on the first that does not.
///
/// ```no_run
/// # async fn f() {
/// ampybus_conformance::bad_urls_fail_fast_and_clearly(ampybus_conformance::BadUrls {
///     scheme: "nats",
///     unreachable_query: "",
///     missing_ca: Some(("tls://127.0.0.1:1?tls_ca=/nonexistent/ca.pem", "tls_ca")),
///     unreachable_kinds: &[ampybus::ErrorKind::Transport, ampybus::ErrorKind::Timeout],
///     unreachable_text: "",
///     limit: std::time::Duration::from_secs(15),
/// })
/// .await;
/// # }
/// ```
pub async fn bad_urls_fail_fast_and_clearly(probe: BadUrls<'_>) {
    let BadUrls {
        scheme,
        unreachable_query,
        missing_ca,
        unreachable_kinds,
        unreachable_text,
        limit,
    } = probe;
    let e = within(
        "garbage port",
        limit,
        Bus::connect(&format!("{scheme}://127.0.0.1:notaport")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("notaport"), "{e}");

    let e = within(
        "unknown option",
        limit,
        Bus::connect(&format!("{scheme}://127.0.0.1:1?colour=red")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("colour"), "{e}");

    let e = within(
        "wrong scheme",
        limit,
        Bus::connect(&format!("{scheme}z://127.0.0.1:1")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains(&format!("{scheme}z")), "{e}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let e = within(
        "unreachable port",
        limit,
        Bus::connect(&format!(
            "{scheme}://bob:s3cret@127.0.0.1:{port}{unreachable_query}"
        )),
    )
    .await
    .unwrap_err();
    let shown = format!("{e} {e:?}");
    assert!(unreachable_kinds.contains(&e.kind()), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(e.to_string().contains(unreachable_text), "{e}");
    assert!(!shown.contains("s3cret"), "credentials leaked: {shown}");

    if let Some((url, option)) = missing_ca {
        let e = within("missing CA file", limit, Bus::connect(url))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.to_string().contains(option), "{e}");
    }
}
