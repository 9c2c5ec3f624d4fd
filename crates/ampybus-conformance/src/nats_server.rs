//! A `nats-server` of a test's own, on a free loopback port: fault tests that restart or
//! crash the server, or need permissions or TLS. Its own file so that test binaries outside
//! this crate (the core's exactly-once harness) include it with `#[path]`; it uses only `std`.

use std::path::Path;
use std::time::{Duration, Instant};

/// A `nats-server` child process on a free loopback port, for fault tests that need a server
/// of their own (a restart, a crash, permissions, TLS); killed (and reaped) on drop.
///
/// ```no_run
/// let dir = tempfile::tempdir().unwrap();
/// let store = dir.path().join("js");
/// let mut server = ampybus_conformance::NatsServer::start(
///     dir.path(),
///     &["-js", "-sd", store.to_str().unwrap()],
/// );
/// let url = server.url("nats", "?stream_prefix=FAULT");
/// server.kill(); // a crash: the store directory stays
/// server.restart(); // the same port and arguments
/// # let _ = url;
/// ```
pub struct NatsServer {
    child: Option<std::process::Child>,
    port: u16,
    args: Vec<String>,
    log: std::path::PathBuf,
}

impl NatsServer {
    /// Starts `nats-server -a 127.0.0.1 -p <free port> <args…>`, logging to
    /// `dir/nats-server.log`, and waits until it accepts connections.
    pub fn start(dir: &Path, args: &[&str]) -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind a free port")
            .local_addr()
            .expect("local address")
            .port();
        let mut s = NatsServer {
            child: None,
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            log: dir.join("nats-server.log"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        use std::process::{Command, Stdio};
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn nats-server (apt-get install nats-server)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nats-server did not listen on {}: {}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL, as a crash: the store directory stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the server keeps its connections open but answers nothing (a hung server).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`NatsServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = std::process::Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .expect("run kill");
            assert!(ok.success(), "kill {sig} failed");
        }
    }

    /// Kills (if running) and starts it again on the same port with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `{scheme}://127.0.0.1:{port}{query}`.
    pub fn url(&self, scheme: &str, query: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{query}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
