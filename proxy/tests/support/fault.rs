//! Fault injection between the proxy and a real upstream: a TCP relay that breaks, slows or
//! stalls what passes through on command, and real packet loss on loopback (nftables).
//!
//! The relay runs on a runtime of its own (one thread), so sync and async tests use it
//! alike. Faults are given per connection, in accept order: [`Relay::fault_next`] arms the
//! next connection the proxy opens, [`Relay::set_default`] every later one.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the relay does to one connection.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Close the connection (both sides) once this many bytes came from the upstream and
    /// were passed on: a reply cut at that byte.
    pub cut_after: Option<usize>,
    /// Close with a reset (RST) instead of a FIN, when cut or killed.
    pub reset: bool,
    /// Pass the upstream's bytes on one at a time, this far apart.
    pub trickle: Option<Duration>,
    /// Hold every chunk this long before passing it on, in both directions.
    pub latency: Option<Duration>,
    /// Read nothing the proxy sends: its writes fill the socket buffers and stop.
    pub stop_reading: bool,
}

struct Conn {
    stop: CancellationToken,
    stalled: std::sync::atomic::AtomicBool,
    reset: std::sync::atomic::AtomicBool,
    from_upstream: AtomicUsize,
    to_upstream: AtomicUsize,
}

#[derive(Default)]
struct State {
    default: Faults,
    next: VecDeque<Faults>,
    conns: Vec<Arc<Conn>>,
    down: bool,
}

/// A relay listening on a loopback port, forwarding each connection to `upstream`.
pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Relays one accepted connection with the faults it is due.
fn accept(state: &Mutex<State>, client: TcpStream, upstream: SocketAddr) {
    let _ = client.set_nodelay(true);
    let mut state = state.lock().expect("relay state");
    if state.down {
        // Killed: as a stopped server would, refuse (reset) new connections.
        return reset_now(client);
    }
    let faults = state
        .next
        .pop_front()
        .unwrap_or_else(|| state.default.clone());
    let conn = Arc::new(Conn {
        stop: CancellationToken::new(),
        stalled: faults.stop_reading.into(),
        reset: faults.reset.into(),
        from_upstream: AtomicUsize::new(0),
        to_upstream: AtomicUsize::new(0),
    });
    tokio::spawn(relay(client, upstream, faults, conn.clone()));
    state.conns.push(conn);
}

impl Relay {
    pub fn start(upstream: &str) -> Relay {
        let upstream: SocketAddr = upstream.parse().expect("the upstream is ip:port");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the relay");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the relay's address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        // A thread and runtime of its own: tests start relays from inside their runtimes.
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the relay's runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("the relay's listener");
                loop {
                    let accepted = tokio::select! {
                        accepted = listener.accept() => accepted,
                        _ = accept_stop.cancelled() => return,
                    };
                    let Ok((client, _)) = accepted else {
                        continue;
                    };
                    accept(&accept_state, client, upstream);
                }
            });
        });
        Relay {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `ip:port` of the relay, for a topology's `remote_address`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Faults for the next connection accepted (queued: each call arms one more).
    pub fn fault_next(&self, faults: Faults) {
        self.state
            .lock()
            .expect("relay state")
            .next
            .push_back(faults);
    }

    /// Faults for every later connection not armed with [`Relay::fault_next`].
    pub fn set_default(&self, faults: Faults) {
        self.state.lock().expect("relay state").default = faults;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.lock().expect("relay state").conns.len()
    }

    /// Bytes passed on from the upstream on connection `index` (accept order).
    pub fn bytes_from_upstream(&self, index: usize) -> usize {
        self.state.lock().expect("relay state").conns[index]
            .from_upstream
            .load(Ordering::Relaxed)
    }

    /// Bytes passed on to the upstream on connection `index` (accept order).
    pub fn bytes_to_upstream(&self, index: usize) -> usize {
        self.state.lock().expect("relay state").conns[index]
            .to_upstream
            .load(Ordering::Relaxed)
    }

    /// Connection `index` reads nothing more from the proxy (after the chunk it may be
    /// reading now), as [`Faults::stop_reading`] from the start.
    pub fn stall(&self, index: usize) {
        self.state.lock().expect("relay state").conns[index]
            .stalled
            .store(true, Ordering::Relaxed);
    }

    /// Kills connection `index` now, with a reset.
    pub fn reset(&self, index: usize) {
        let state = self.state.lock().expect("relay state");
        let conn = &state.conns[index];
        conn.reset.store(true, Ordering::Relaxed);
        conn.stop.cancel();
    }

    /// The upstream "dies": every open connection is reset and new ones are refused, until
    /// [`Relay::up`].
    pub fn down(&self) {
        let mut state = self.state.lock().expect("relay state");
        state.down = true;
        for conn in &state.conns {
            conn.reset.store(true, Ordering::Relaxed);
            conn.stop.cancel();
        }
    }

    /// The upstream is back: connections are accepted and relayed again.
    pub fn up(&self) {
        self.state.lock().expect("relay state").down = false;
    }
}

impl Drop for Relay {
    /// Stops accepting and drops every relayed connection.
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn reset_now(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, faults: Faults, conn: Arc<Conn>) {
    let Conn {
        stop,
        stalled,
        reset,
        from_upstream,
        to_upstream,
    } = &*conn;
    let mut server = match TcpStream::connect(upstream).await {
        Ok(server) => server,
        Err(_) => return reset_now(client),
    };
    let _ = server.set_nodelay(true);
    {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let to_server = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if stalled.load(Ordering::Relaxed) {
                    return std::future::pending::<()>().await;
                }
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(latency) = faults.latency {
                    tokio::time::sleep(latency).await;
                }
                to_upstream.fetch_add(n, Ordering::Relaxed);
                if server_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        let to_client = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(latency) = faults.latency {
                    tokio::time::sleep(latency).await;
                }
                let passed = from_upstream.load(Ordering::Relaxed);
                let allowed = faults
                    .cut_after
                    .map_or(n, |cut| n.min(cut.saturating_sub(passed)));
                let chunk = &buf[..allowed];
                // Counted before they are written: once the proxy has them, a test may
                // read the count.
                let passed_on = match faults.trickle {
                    None => {
                        from_upstream.fetch_add(chunk.len(), Ordering::Relaxed);
                        client_write.write_all(chunk).await.is_ok()
                    }
                    Some(gap) => {
                        let mut ok = true;
                        for byte in chunk {
                            from_upstream.fetch_add(1, Ordering::Relaxed);
                            if client_write
                                .write_all(std::slice::from_ref(byte))
                                .await
                                .is_err()
                            {
                                ok = false;
                                break;
                            }
                            tokio::time::sleep(gap).await;
                        }
                        ok
                    }
                };
                if !passed_on {
                    return;
                }
                if allowed < n || faults.cut_after.is_some_and(|cut| passed + allowed >= cut) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = to_server => {}
            _ = to_client => {}
            _ = stop.cancelled() => {}
        }
    }
    if reset.load(Ordering::Relaxed) {
        reset_now(client);
        reset_now(server);
    }
}

/// Real packet loss: drops `percent` % of the TCP packets to and from `port` on this host,
/// except connection set-up (SYN), whose loss only delays a connect by whole seconds (an
/// nftables table of its own, removed on drop). Needs root, as the tests run in CI. (This
/// kernel has no netem, `CONFIG_NET_SCH_NETEM`; nftables' `numgen random` drops for real,
/// and TCP's retransmissions do the rest.)
pub struct PacketLoss {
    table: String,
}

impl PacketLoss {
    pub fn start(port: u16, percent: u32) -> PacketLoss {
        let table = format!("shotover_loss_{port}");
        let rules = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    tcp dport {port} tcp flags & syn == 0 numgen random mod 100 < {percent} drop\n    tcp sport {port} tcp flags & syn == 0 numgen random mod 100 < {percent} drop\n  }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&rules));
        PacketLoss { table }
    }
}

impl Drop for PacketLoss {
    fn drop(&mut self) {
        nft(&["delete", "table", "inet", &self.table], None);
    }
}

fn nft(args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running nft (nftables; the fault tests need it and root)");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("nft's stdin")
            .write_all(text.as_bytes())
            .expect("writing nft rules");
    }
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
