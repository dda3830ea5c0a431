//! A `peregrine` process for tests: started on a free port with a temp data dir, stopped by pid.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peregrine_proto::ProtoHeader;
use peregrine_proto::consts::msg_type;

/// A running server.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    /// Starts `peregrine` with a config file written into `data_dir`.
    ///
    /// The ports come from [`free_port`], so another test's client socket can take one before
    /// the server binds it; a server that exits because it cannot listen is started again on
    /// fresh ports.
    pub fn start(data_dir: &Path, extra_config: &str) -> Server {
        const START_ATTEMPTS: usize = 5;
        for _ in 0..START_ATTEMPTS {
            let mut s = Server::spawn(data_dir, extra_config);
            match s.wait_ready() {
                Ok(()) => return s,
                Err(log) if log.contains("cannot listen") => continue,
                Err(log) => panic!("server did not start: {log}"),
            }
        }
        panic!("server could not find free ports in {START_ATTEMPTS} attempts");
    }

    fn spawn(data_dir: &Path, extra_config: &str) -> Server {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = data_dir.join("peregrine.toml");
        let text = format!(
            "[server]\nlisten = \"{addr}\"\ndata_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n{extra_config}\n\
             [[namespace]]\nname = \"test\"\n[[namespace.devices]]\npath = \"test.dat\"\nsize_bytes = 268435456\n",
            data_dir.display(),
            free_port()
        );
        std::fs::write(&config, text).unwrap();
        let log = data_dir.join(format!("server-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_peregrine"))
            .arg("--config")
            .arg(&config)
            // `wait_ready` looks for an INFO line, whatever RUST_LOG the tests run with.
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Server { child, addr, data_dir: data_dir.to_path_buf(), log }
    }

    /// Waits until the server accepts connections and has logged that it serves; its log if it
    /// exited first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if self.child.try_wait().unwrap().is_some() {
                let log = self.log_text();
                // The next attempt writes the same file name only if it draws the same port.
                let _ = std::fs::remove_file(&self.log);
                return Err(log);
            }
            // The log line tells this server from another process that took the port.
            if self.log_text().contains("peregrine node serving") && TcpStream::connect(self.addr).is_ok() {
                return Ok(());
            }
            assert!(started.elapsed() < Duration::from_secs(60), "server did not start: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log file a server started in `dir` wrote (readable after it stopped).
    pub fn log_file_in(dir: &std::path::Path) -> std::path::PathBuf {
        dir.read_dir().unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|x| x == "log")).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The metrics address from the config.
    pub fn metrics_addr(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("peregrine.toml")).unwrap();
        let line = text.lines().find(|l| l.starts_with("metrics_listen")).unwrap();
        line.split('"').nth(1).unwrap().to_string()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: sending a signal to our own child by pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends an info request and returns the answer text.
pub fn info(addr: SocketAddr, commands: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = format!("{commands}\n");
    s.write_all(&ProtoHeader::encode(msg_type::INFO, body.len() as u64)).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let size = u64::from_be_bytes(h) & 0xFFFF_FFFF_FFFF;
    let mut out = vec![0u8; size as usize];
    s.read_exact(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}
pub mod cluster;
