//! A TCP proxy in front of etcd that can lose one answer: the request goes through and etcd
//! acts on it, but the connection is closed before the reply reaches the client, as when a
//! network path fails mid-call. The client sees a transport error and cannot tell whether
//! its request was applied.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify};

/// How long etcd gets to act on the request before the connection is cut.
const APPLY_TIME: Duration = Duration::from_millis(200);

/// How long the proxy refuses new connections after a cut, so that a client's retry cannot
/// reach etcd before the test has looked at what the lost request did.
const PAUSE_AFTER_CUT: Duration = Duration::from_millis(500);

pub struct AnswerLosingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    /// Set: the next bytes any client sends are forwarded and their answer lost.
    armed: AtomicBool,
    /// Held while new connections wait (after a cut).
    accepting: Mutex<()>,
    /// Notified once the armed cut happened.
    cut: Notify,
}

impl AnswerLosingProxy {
    /// A proxy on a free loopback port forwarding to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<AnswerLosingProxy> {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| anyhow::anyhow!("proxy upstream {upstream}: {e}"))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            armed: AtomicBool::new(false),
            accepting: Mutex::new(()),
            cut: Notify::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(AnswerLosingProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The endpoint to give clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Loses the answer to whatever a client sends next.
    pub fn arm(&self) {
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until the armed cut happened; then, for [`PAUSE_AFTER_CUT`], no client reaches
    /// etcd through the proxy. Panics if no client sent anything within `timeout`.
    pub async fn wait_cut(&self, timeout: Duration) {
        tokio::time::timeout(timeout, self.shared.cut.notified())
            .await
            .expect("no client sent anything through the armed proxy");
    }
}

impl Drop for AnswerLosingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        drop(shared.accepting.lock().await);
        let Ok(server) = TcpStream::connect(shared.upstream).await else {
            continue;
        };
        tokio::spawn(relay(client, server, shared.clone()));
    }
}

/// Forwards both ways until either side closes, or until an armed cut closes both.
async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let losing = Arc::new(AtomicBool::new(false));
    let answers = {
        let losing = losing.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if losing.load(Ordering::SeqCst) {
                    continue; // the answer is lost
                }
                if client_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let cut = shared.armed.swap(false, Ordering::SeqCst);
        if cut {
            losing.store(true, Ordering::SeqCst);
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if cut {
            let _paused = shared.accepting.lock().await;
            tokio::time::sleep(APPLY_TIME).await;
            answers.abort();
            drop(server_write);
            drop(client_read);
            shared.cut.notify_one();
            tokio::time::sleep(PAUSE_AFTER_CUT).await;
            return;
        }
    }
    answers.abort();
}
