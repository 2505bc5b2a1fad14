//! A TCP proxy between one client and its broker that a test can cut, stall and restore:
//! cut, the client's connection drops and new ones are refused, as when a network link or a
//! firewall separates one instance from the broker while the others still reach it; stalled,
//! the connection stays open but nothing gets through until it is restored (then what was
//! held is delivered, in order), as with a broker too busy to answer in time.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Open,
    Stalled,
    Cut,
}

/// See the module docs. Dropping it ends every connection through it.
pub struct TcpProxy {
    addr: SocketAddr,
    link: watch::Sender<Link>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (link, link_rx) = watch::channel(Link::Open);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *link_rx.borrow() == Link::Cut {
                    // Cut: the connection is refused (closed at once).
                    drop(inbound);
                    continue;
                }
                tokio::spawn(forward(inbound, upstream, link_rx.clone()));
            }
        });
        Self { addr, link, accept }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection through the proxy and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.link.send_replace(Link::Cut);
    }

    /// Holds all traffic, both ways, on open connections until [`Self::restore`].
    pub fn stall(&self) {
        self.link.send_replace(Link::Stalled);
    }

    /// Accepts and forwards connections again (delivering what a stall held).
    pub fn restore(&self) {
        self.link.send_replace(Link::Open);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // The connections end with the sender: their `wait_for` fails.
        self.link.send_replace(Link::Cut);
    }
}

/// Copies both ways until either side closes or the proxy is cut.
async fn forward(inbound: TcpStream, upstream: SocketAddr, mut link: watch::Receiver<Link>) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::select! {
        _ = pipe(in_read, out_write, link.clone()) => {}
        _ = pipe(out_read, in_write, link.clone()) => {}
        _ = link.wait_for(|l| *l == Link::Cut) => {}
    }
}

/// Copies one way; while stalled, what was read waits (in order) until the link opens again.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut link: watch::Receiver<Link>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match link.wait_for(|l| *l != Link::Stalled).await {
            Ok(l) if *l == Link::Open => {}
            _ => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_then_cuts_then_forwards_again() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = TcpProxy::start(upstream).await;
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        c.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"ping");
        proxy.cut();
        let mut rest = Vec::new();
        // The connection ends (EOF or reset): nothing more comes through.
        let _ = c.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
        proxy.restore();
        let mut c = TcpStream::connect(proxy.addr())
            .await
            .expect("connect again");
        c.write_all(b"pong").await.expect("write");
        c.read_exact(&mut buf).await.expect("echo again");
        assert_eq!(&buf, b"pong");
    }
}
