//! PostgreSQL for the archive tests: a database of its own on the shared server
//! (127.0.0.1:5432, `scripts/brokers.sh start postgres`), or a server of its own (`initdb` +
//! `pg_ctl` on a free port in a temporary directory) for the tests that stop it.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;

/// The shared server's admin URL.
pub const SHARED: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Runs one async block on a fresh runtime (the tests are synchronous: they run the binary);
/// called from inside a runtime (an async test), on a thread of its own.
pub fn block<F: std::future::Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    let run = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(run).join().unwrap())
    } else {
        run()
    }
}

/// Connects and runs `sql`, returning the rows (panics on failure: test setup).
pub fn query(url: &str, sql: &str) -> Vec<tokio_postgres::Row> {
    block(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        tokio::spawn(conn);
        client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    })
}

/// `SELECT count(*)` of something as a number.
pub fn count(url: &str, from_where: &str) -> i64 {
    query(url, &format!("SELECT count(*) FROM {from_where}"))[0].get(0)
}

/// `SELECT count(*)`, or `None` while the table does not exist yet (or the server is away).
pub fn try_count(url: &str, from_where: &str) -> Option<i64> {
    block(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        let rows = client
            .query(&format!("SELECT count(*) FROM {from_where}"), &[])
            .await
            .ok()?;
        rows.first().map(|r| r.get(0))
    })
}

/// A database of its own, dropped at the end.
pub struct Db {
    admin: String,
    pub name: String,
    pub url: String,
}

impl Db {
    /// A new database on the shared server.
    pub fn shared() -> Db {
        start_shared();
        Db::on(SHARED, "127.0.0.1:5432")
    }

    /// A new database on the server whose admin URL is `admin`.
    pub fn on(admin: &str, host_port: &str) -> Db {
        let name = format!("ampybus_test_{}", unique());
        query(admin, &format!("CREATE DATABASE {name}"));
        Db {
            admin: admin.to_owned(),
            url: format!("postgres://postgres@{host_port}/{name}"),
            name,
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = std::panic::catch_unwind(move || query(&admin, &sql));
    }
}

fn unique() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// `scripts/brokers.sh start postgres`, once per test process.
pub fn start_shared() {
    crate::common::start_broker("postgres");
}

fn bin_dir() -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/brokers.sh start postgres installs it)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .find(|p| p.join("initdb").exists())
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

/// A PostgreSQL server of its own on a free port (`initdb` + `pg_ctl` in a temporary
/// directory; as the `postgres` system user when the tests run as root, since initdb refuses
/// root). Stopped and removed on drop.
pub struct OwnServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl OwnServer {
    /// `initdb` with trust authentication (or, with `password`, scram for TCP logins with
    /// that password for `postgres`), then started.
    pub fn start(password: Option<&str>) -> OwnServer {
        let dir = tempfile::Builder::new()
            .prefix("ampybus-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if is_root() {
            chown_postgres(dir.path());
        }
        let data = dir.path().join("data");
        let mut init = vec![
            "-U".to_owned(),
            "postgres".into(),
            "-E".into(),
            "UTF8".into(),
            "-D".into(),
            data.display().to_string(),
        ];
        match password {
            None => init.push("--auth=trust".into()),
            Some(p) => {
                let pw = dir.path().join("pw");
                std::fs::write(&pw, p).unwrap();
                if is_root() {
                    chown_postgres(&pw);
                }
                init.extend([
                    "--auth-local=trust".into(),
                    "--auth-host=scram-sha-256".into(),
                    format!("--pwfile={}", pw.display()),
                ]);
            }
        }
        run_pg("initdb", &init);
        let s = OwnServer { dir, port };
        s.pg_ctl_start();
        s
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn pg_ctl_start(&self) {
        let data = self.dir.path().join("data");
        run_pg(
            "pg_ctl",
            &[
                "-D".into(),
                data.display().to_string(),
                "-l".into(),
                self.dir.path().join("log").display().to_string(),
                "-w".into(),
                "-t".into(),
                "60".into(),
                "-o".into(),
                format!(
                    "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={}",
                    self.port,
                    self.dir.path().display()
                ),
                "start".into(),
            ],
        );
    }

    /// `pg_ctl stop -m immediate` (no shutdown checkpoint: as after a crash).
    pub fn pg_ctl_stop(&self) {
        let data = self.dir.path().join("data");
        run_pg(
            "pg_ctl",
            &[
                "-D".into(),
                data.display().to_string(),
                "-m".into(),
                "immediate".into(),
                "-w".into(),
                "stop".into(),
            ],
        );
    }

    /// The admin URL (trust servers only).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = pg_command("pg_ctl")
            .args(["-D", &data.display().to_string(), "-m", "immediate", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn chown_postgres(p: &Path) {
    let st = Command::new("chown")
        .args(["-R", "postgres"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "chown postgres {}", p.display());
}

fn pg_command(tool: &str) -> Command {
    let exe = bin_dir().join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

fn run_pg(tool: &str, args: &[String]) {
    let out = pg_command(tool).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
