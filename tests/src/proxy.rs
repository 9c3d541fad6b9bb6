//! A TCP proxy in front of etcd that can lose one answer: the request goes through and etcd
//! acts on it, but the connection is closed before the reply reaches the client, as when a
//! network path fails mid-call. The client sees a transport error and cannot tell whether
//! its request was applied. It can also lose one request on its way to etcd.
//!
//! Armed, it acts on the next write of at least [`MIN_AIMED_BYTES`] a client sends: smaller
//! ones (HTTP/2 pings and window updates, lease keep-alives on their open stream) pass.
//! After a cut it keeps clients away from etcd for a while, or until the test lets them
//! through ([`AnswerLosingProxy::hold_after_cut`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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

/// The smallest client write an armed proxy acts on: a new unary call (its headers and
/// message) is larger.
const MIN_AIMED_BYTES: usize = 100;

/// What an armed proxy loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Nothing: not armed.
    None = 0,
    /// The answer: the request reaches etcd.
    Answer = 1,
    /// The request: etcd never sees it.
    Request = 2,
}

pub struct AnswerLosingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    /// A [`Loss`]: what to lose of the next request any client sends.
    armed: AtomicU8,
    /// Held while new connections wait (after a cut).
    accepting: Mutex<()>,
    /// Notified once the armed cut happened.
    cut: Notify,
    /// Whether the next cut keeps new connections waiting until `release` is notified.
    hold: AtomicBool,
    release: Notify,
    /// When set, an armed proxy acts only on a client write that contains these bytes.
    aim: std::sync::Mutex<Option<Vec<u8>>>,
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
            armed: AtomicU8::new(Loss::None as u8),
            accepting: Mutex::new(()),
            cut: Notify::new(),
            hold: AtomicBool::new(false),
            release: Notify::new(),
            aim: std::sync::Mutex::new(None),
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

    /// Loses the answer to the request a client sends next.
    pub fn arm(&self) {
        self.arm_at(None, Loss::Answer);
    }

    /// Loses the answer to the next request a client sends that contains `text` (a key it
    /// names, say): requests that do not pass, however large.
    pub fn arm_for(&self, text: &str) {
        self.arm_at(Some(text.as_bytes().to_vec()), Loss::Answer);
    }

    /// Loses the request a client sends next, before it reaches etcd.
    pub fn arm_to_lose_request(&self) {
        self.arm_at(None, Loss::Request);
    }

    fn arm_at(&self, aim: Option<Vec<u8>>, loss: Loss) {
        *self.shared.aim.lock().unwrap() = aim;
        self.shared.armed.store(loss as u8, Ordering::SeqCst);
    }

    /// Makes the next cut keep clients away from etcd until [`AnswerLosingProxy::release`],
    /// instead of for [`PAUSE_AFTER_CUT`].
    pub fn hold_after_cut(&self) {
        self.shared.hold.store(true, Ordering::SeqCst);
    }

    /// Lets clients reach etcd again after a cut made with [`AnswerLosingProxy::hold_after_cut`].
    /// Only for a held cut that happened: a release with no hold to end would end the next
    /// one at once.
    pub fn release(&self) {
        self.shared.release.notify_one();
    }

    /// Waits until the armed cut happened; then, for [`PAUSE_AFTER_CUT`] (or until released),
    /// no client reaches etcd through the proxy. Panics if no client sent anything within
    /// `timeout`.
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
        let loss = if n >= MIN_AIMED_BYTES && aimed_at(&shared, &buf[..n]) {
            match shared.armed.swap(Loss::None as u8, Ordering::SeqCst) {
                1 => Loss::Answer,
                2 => Loss::Request,
                _ => Loss::None,
            }
        } else {
            Loss::None
        };
        if loss != Loss::None {
            losing.store(true, Ordering::SeqCst);
        }
        if loss != Loss::Request && server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if loss != Loss::None {
            let _paused = shared.accepting.lock().await;
            tokio::time::sleep(APPLY_TIME).await;
            answers.abort();
            drop(server_write);
            drop(client_read);
            shared.cut.notify_one();
            if shared.hold.swap(false, Ordering::SeqCst) {
                shared.release.notified().await;
            } else {
                tokio::time::sleep(PAUSE_AFTER_CUT).await;
            }
            return;
        }
    }
    answers.abort();
}

/// Whether `write` is what an armed proxy aims at: any write, or one containing the bytes
/// of [`AnswerLosingProxy::arm_for`].
fn aimed_at(shared: &Shared, write: &[u8]) -> bool {
    match &*shared.aim.lock().unwrap() {
        None => true,
        Some(text) => write
            .windows(text.len())
            .any(|window| window == text.as_slice()),
    }
}
