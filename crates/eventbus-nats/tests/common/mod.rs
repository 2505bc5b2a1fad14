//! Shared by the NATS integration tests: the server address comes from the environment
//! (`scripts/test.sh` starts nats-server and sets it). A missing or unreachable server fails
//! the test; nothing is skipped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventbus_core::testkit::{Backend, StoredMessage};
use eventbus_core::{Bus, BusConfig, BusError};
use eventbus_nats::{NatsConfig, NatsTransport};

pub fn nats_url() -> String {
    std::env::var("EVENTBUS_NATS_URL").unwrap_or_else(|_| {
        panic!(
            "EVENTBUS_NATS_URL is not set. Run scripts/test.sh (it starts nats-server), or \
             `scripts/nats.sh start` and export the variables `scripts/nats.sh env` prints."
        )
    })
}

/// A TCP proxy in front of the test's nats-server (`EVENTBUS_NATS_URL`), to cut or stall one
/// client's link.
pub async fn proxy() -> eventbus_core::testkit::TcpProxy {
    let upstream: std::net::SocketAddr = nats_url()
        .trim_start_matches("nats://")
        .parse()
        .expect("EVENTBUS_NATS_URL as nats://host:port");
    eventbus_core::testkit::TcpProxy::start(upstream).await
}

pub struct Nats {
    pub config: NatsConfig,
}

impl Nats {
    pub fn new() -> Self {
        Self {
            config: NatsConfig::new(nats_url()),
        }
    }
}

impl Backend for Nats {
    type Transport = NatsTransport;
    async fn connect(&self, config: BusConfig) -> Result<Bus<NatsTransport>, BusError> {
        let t = NatsTransport::connect(self.config.clone()).await?;
        Bus::new(t, config)
    }

    async fn read_stored(&self, topic: &str, count: usize) -> Option<Vec<StoredMessage>> {
        Some(read_stream(&self.config, topic, count).await)
    }
}

/// The first `count` messages of `topic`'s stream, read with a plain async-nats client.
pub async fn read_stream(config: &NatsConfig, topic: &str, count: usize) -> Vec<StoredMessage> {
    let client = async_nats::connect(nats_url()).await.expect("raw client");
    let js = async_nats::jetstream::new(client);
    let name = format!("{}{}", config.stream.name_prefix, topic.replace('.', "_"));
    let stream = js.get_stream(&name).await.expect("the topic's stream");
    let mut out = Vec::with_capacity(count);
    for seq in 1..=count as u64 {
        let m = stream.get_raw_message(seq).await.expect("stored message");
        out.push(StoredMessage {
            payload: m.payload,
            headers: m
                .headers
                .iter()
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect(),
            batch_compression: None,
        });
    }
    out
}

pub async fn backend() -> Nats {
    Nats::new()
}

/// A nats-server of the test's own, for restarts (binary from `EVENTBUS_NATS_SERVER_BIN`).
pub struct OwnServer {
    pub port: u16,
    store: PathBuf,
    /// Extra command-line options (TLS, auth).
    args: Vec<String>,
    child: Option<Child>,
}

impl OwnServer {
    pub fn start(store: &Path) -> Self {
        Self::start_with(store, &[])
    }

    /// Started with extra nats-server options (`--tls …`, `--user … --pass …`, `--auth …`).
    pub fn start_with(store: &Path, args: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut s = Self {
            port,
            store: store.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let bin = std::env::var("EVENTBUS_NATS_SERVER_BIN").unwrap_or_else(|_| {
            panic!("EVENTBUS_NATS_SERVER_BIN is not set (scripts/test.sh sets it)")
        });
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("own nats-server did not listen on {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Records the children's reports in `ledger`; `forget` tells it an instance was killed,
/// in the order of the reports.
pub async fn audit_loop(
    mut reports: async_nats::Subscriber,
    client: async_nats::Client,
    ledger: std::sync::Arc<eventbus_core::testkit::GroupLedger>,
    mut forget: tokio::sync::mpsc::Receiver<u8>,
) {
    loop {
        tokio::select! {
            Some(i) = forget.recv() => ledger.forget(i),
            m = futures_util::StreamExt::next(&mut reports) => {
                let Some(m) = m else { return };
                let text = String::from_utf8_lossy(&m.payload).to_string();
                let f: Vec<&str> = text.split(' ').collect();
                if let [what, instance, event_id, aggregate, version] = f.as_slice() {
                    let instance: u8 = instance.parse().expect("instance");
                    let version: i64 = version.parse().expect("version");
                    if *what == "begin" {
                        ledger.begin(instance, aggregate);
                    } else {
                        ledger.end(instance, event_id, aggregate, version);
                    }
                }
                if let Some(reply) = m.reply {
                    let _ = client.publish(reply, bytes::Bytes::new()).await;
                }
            }
        }
    }
}
