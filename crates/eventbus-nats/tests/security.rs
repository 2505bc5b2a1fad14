//! TLS and authentication against nats-servers of the test's own that require them: TLS with
//! certificates this test generates (openssl), user/password, token. Wrong credentials and an
//! untrusted certificate are a clear `Unavailable` error at connect, never a hang, and no
//! secret reaches a log line, an error or `Debug` output: every log event of this test binary
//! (ours and async-nats', every level) is recorded and searched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::OwnServer;
use eventbus_core::testkit::{captured_log, kit_config, unique, Recorder};
use eventbus_core::{Bus, Envelope, TransportError};
use eventbus_nats::{Auth, NatsConfig, NatsTransport, Secret, Tls};
use serde_json::json;

const PASSWORD: &str = "pw-7f3a-never-logged";
const TOKEN: &str = "tok-91c2-never-logged";
const WRONG: &str = "wrong-5d0e-never-logged";

fn assert_no_secret(what: &str, text: &str) {
    for secret in [PASSWORD, TOKEN, WRONG] {
        assert!(!text.contains(secret), "{what} carries a secret: {text}");
    }
}

fn assert_log_clean() {
    let text = captured_log().snapshot().join("\n");
    assert!(!text.is_empty(), "the log capture recorded nothing");
    assert_no_secret("the log", &text);
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and a second CA that signed nothing.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn generate(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-certs", unique(name)));
        std::fs::create_dir_all(&dir).expect("cert dir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl (Debian's openssl package) must be installed");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=eventbus test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ]);
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn server_args(&self) -> Vec<String> {
        vec![
            "--tls".into(),
            "--tlscert".into(),
            self.path("server.pem").display().to_string(),
            "--tlskey".into(),
            self.path("server.key").display().to_string(),
        ]
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server(name: &str, args: &[String]) -> (OwnServer, PathBuf) {
    let store = std::env::temp_dir().join(unique(name));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (OwnServer::start_with(&store, &args), store)
}

fn tls(ca: &Path) -> Tls {
    Tls {
        required: true,
        root_certificates: Some(ca.to_path_buf()),
        client_certificate: None,
    }
}

/// Connects, bounded: a connect that neither succeeds nor fails within 30 s is a hang.
async fn connect(config: NatsConfig) -> Result<NatsTransport, TransportError> {
    let printed = format!("{config:?}");
    assert_no_secret("the configuration's Debug output", &printed);
    tokio::time::timeout(Duration::from_secs(30), NatsTransport::connect(config))
        .await
        .expect("connect must answer, not hang")
}

/// One envelope through the stream and back, then a clean close.
async fn round_trip(t: NatsTransport) {
    let bus = Bus::new(t, kit_config()).expect("bus");
    let topic = unique("secure");
    let got: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, "svc", got.envelope_handler())
        .await
        .expect("subscribe");
    let sent = Envelope::new("a-1", "secured", 1, json!({"n": 1}));
    let ack = bus
        .publish_envelope_and_wait(&topic, &sent)
        .await
        .expect("publish");
    assert!(ack.is_ok(), "{ack:?}");
    assert_eq!(got.wait_for(1, "the envelope over TLS").await[0], sent);
    bus.close().await.expect("close");
}

fn expect_unavailable(result: Result<NatsTransport, TransportError>, port: u16) -> String {
    let err = result.err().expect("connect must fail");
    let text = err.to_string();
    assert!(matches!(err, TransportError::Unavailable(_)), "{err:?}");
    assert!(text.contains(&port.to_string()), "names the server: {text}");
    eprintln!("connect refused as expected: {text}");
    assert_no_secret("the error", &text);
    assert_no_secret("the error's Debug output", &format!("{err:?}"));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_user_and_password() {
    captured_log();
    let certs = Certs::generate("tls-user");
    let mut args = certs.server_args();
    args.extend([
        "--user".into(),
        "alice".into(),
        "--pass".into(),
        PASSWORD.into(),
    ]);
    let (server, store) = server("tls-user", &args);
    let user = |password: &str| Auth::UserPassword {
        user: "alice".into(),
        password: Secret::new(password),
    };
    let good = NatsConfig {
        tls: tls(&certs.path("ca.pem")),
        ..NatsConfig::new(server.url()).with_auth(user(PASSWORD))
    };
    round_trip(connect(good.clone()).await.expect("TLS + user/password")).await;

    // The right password over an untrusted certificate: refused by the client.
    let untrusted = NatsConfig {
        tls: tls(&certs.path("other-ca.pem")),
        ..good.clone()
    };
    let text = expect_unavailable(connect(untrusted).await, server.port);
    assert!(
        text.to_lowercase().contains("certificate") || text.to_lowercase().contains("tls"),
        "says it is the certificate: {text}"
    );
    // No extra root at all: the system roots do not know the test CA either.
    let system_roots = NatsConfig {
        tls: Tls {
            required: true,
            ..Tls::default()
        },
        ..good.clone()
    };
    expect_unavailable(connect(system_roots).await, server.port);
    // A trusted certificate with a wrong password: refused by the server.
    let wrong = NatsConfig {
        auth: user(WRONG),
        ..good.clone()
    };
    let text = expect_unavailable(connect(wrong).await, server.port);
    assert!(
        text.to_lowercase().contains("authorization"),
        "says it is the credentials: {text}"
    );
    // No credentials at all.
    let none = NatsConfig {
        auth: Auth::None,
        ..good
    };
    expect_unavailable(connect(none).await, server.port);
    assert_log_clean();
    drop(server);
    let _ = std::fs::remove_dir_all(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_required_by_the_server() {
    captured_log();
    let args = vec!["--auth".to_string(), TOKEN.to_string()];
    let (server, store) = server("token", &args);
    let with = |auth: Auth| NatsConfig::new(server.url()).with_auth(auth);
    round_trip(
        connect(with(Auth::Token(Secret::new(TOKEN))))
            .await
            .expect("the right token"),
    )
    .await;
    let text = expect_unavailable(
        connect(with(Auth::Token(Secret::new(WRONG)))).await,
        server.port,
    );
    assert!(
        text.to_lowercase().contains("authorization"),
        "says it is the credentials: {text}"
    );
    expect_unavailable(connect(with(Auth::None)).await, server.port);
    // A token in the URL is as secret as one in the options.
    let url = format!("nats://{WRONG}@127.0.0.1:{}", server.port);
    expect_unavailable(connect(NatsConfig::new(url)).await, server.port);
    assert_log_clean();
    drop(server);
    let _ = std::fs::remove_dir_all(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_against_a_tls_server_is_refused_clearly() {
    captured_log();
    let certs = Certs::generate("tls-plain");
    let (server, store) = server("tls-plain", &certs.server_args());
    // TLS not asked for by the client: the server requires it, the client follows (async-nats
    // upgrades when the server's INFO says tls_required) — and then refuses the unknown CA.
    let text = expect_unavailable(connect(NatsConfig::new(server.url())).await, server.port);
    assert!(!text.is_empty());
    // With the CA it works without `required` being set.
    let trusted = NatsConfig {
        tls: Tls {
            required: false,
            root_certificates: Some(certs.path("ca.pem")),
            client_certificate: None,
        },
        ..NatsConfig::new(server.url())
    };
    round_trip(connect(trusted).await.expect("TLS on the server's request")).await;
    assert_log_clean();
    drop(server);
    let _ = std::fs::remove_dir_all(&store);
}
