//! A switchable TCP proxy for failover and network-fault tests.
//!
//! Clients connect to the proxy instead of the server. Switching the target (or just cutting the
//! open connections) is what a client sees when a server fails over behind a DNS name, a
//! Sentinel or a load balancer: its connections break and reconnects land somewhere else.
//! Blackholing is what it sees when a host fails or the network partitions: nothing is
//! refused or reset, bytes are accepted and never answered, new connections hang the same way.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{Error, Result};

/// Which connections are blackholed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    None,
    All,
    /// Those open when it started; new ones are forwarded.
    Open,
}

/// Forwards every connection to `127.0.0.1:<target>`. Dropping it stops listening and closes
/// every open connection.
pub struct TcpProxy {
    port: u16,
    /// The target port. Every change, also one that keeps the same port, cuts the open
    /// connections: each connection task watches this channel and drops both of its sockets.
    target: watch::Sender<u16>,
    blackholed: watch::Sender<Hole>,
    /// Added to every chunk of bytes in each direction.
    latency: watch::Sender<Duration>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a random loopback port and forwards to `127.0.0.1:<target_port>`.
    pub async fn start(target_port: u16) -> Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Io(format!("proxy bind: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Io(format!("proxy local addr: {e}")))?
            .port();
        let (target, rx) = watch::channel(target_port);
        let (blackholed, hole) = watch::channel(Hole::None);
        let (latency, delay) = watch::channel(Duration::ZERO);
        let accept = tokio::spawn(accept_loop(listener, rx, hole, delay));
        Ok(TcpProxy {
            port,
            target,
            blackholed,
            latency,
            accept,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port new connections currently go to.
    pub fn target(&self) -> u16 {
        *self.target.borrow()
    }

    /// Sends new connections to `127.0.0.1:<port>` and closes every open one, so clients
    /// reconnect and reach the new server.
    pub fn set_target(&self, port: u16) {
        self.target.send_replace(port);
    }

    /// Closes every open connection (both sides); new connections still go to the same target.
    /// Connections are closed by their tasks, so a client notices it a moment later, not
    /// necessarily before this returns.
    pub fn close_connections(&self) {
        self.target.send_modify(|_| {});
    }

    /// Delays every chunk of bytes by `latency` in each direction (so a request and its
    /// reply take at least twice that longer), on open and new connections; zero ends it.
    pub fn set_latency(&self, latency: Duration) {
        self.latency.send_replace(latency);
    }

    /// From now on bytes in both directions are read and dropped, on open connections and on
    /// new ones (accepted, never connected through). Nothing is closed or reset: a client
    /// notices only by its own deadlines, as with a failed host or a partition.
    pub fn blackhole(&self) {
        self.blackholed.send_replace(Hole::All);
    }

    /// Blackholes the connections open now and forwards new ones: a server that died behind
    /// an address that now leads to a healthy one (a failover), whose old connections are
    /// never reset. What a client's old connections then hold must not keep it from the new.
    pub fn blackhole_open_connections(&self) {
        self.blackholed.send_replace(Hole::Open);
    }

    /// Ends the blackhole: the connections it swallowed are closed (their server side is long
    /// gone after a real partition, so the client's next packet meets a reset) and new
    /// connections are forwarded again.
    pub fn restore(&self) {
        self.blackholed.send_replace(Hole::None);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Dropping `target` right after this ends every connection task too.
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    rx: watch::Receiver<u16>,
    hole: watch::Receiver<Hole>,
    delay: watch::Receiver<Duration>,
) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // E.g. out of file descriptors: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (mut rx, mut hole, delay) = (rx.clone(), hole.clone(), delay.clone());
        // Read the target and mark this version seen in one step: any later change, also one
        // made while this connection is still being set up, closes it.
        let target = *rx.borrow_and_update();
        let blackholed = *hole.borrow_and_update() == Hole::All;
        tokio::spawn(async move {
            tokio::select! {
                _ = connection(inbound, target, blackholed, &mut hole, &delay) => {}
                // A new target, `close_connections`, or the proxy was dropped (`Err`).
                _ = rx.changed() => {}
            }
        });
    }
}

/// Forwards one connection until it ends or is blackholed; a blackholed connection swallows
/// what both sides send until the blackhole ends, then is closed.
async fn connection(
    mut inbound: TcpStream,
    target: u16,
    blackholed: bool,
    hole: &mut watch::Receiver<Hole>,
    delay: &watch::Receiver<Duration>,
) {
    let mut outbound = None;
    if !blackholed {
        // When the target refuses the connection, the client's connection is simply closed,
        // as when the server is down.
        let Ok(mut out) = TcpStream::connect(("127.0.0.1", target)).await else {
            return;
        };
        // The proxy must not add latency to small request/response protocols like RESP.
        if inbound.set_nodelay(true).is_err() || out.set_nodelay(true).is_err() {
            return;
        }
        tokio::select! {
            _ = copy_both_ways(&mut inbound, &mut out, delay) => return,
            // Only a blackhole that starts after this connection was made takes it.
            _ = async {
                while hole.changed().await.is_ok() {
                    if *hole.borrow_and_update() != Hole::None {
                        return;
                    }
                }
                std::future::pending::<()>().await
            } => {}
        }
        outbound = Some(out);
    }
    tokio::select! {
        _ = swallow(&mut inbound, outbound.as_mut()) => {}
        _ = hole.wait_for(|h| *h == Hole::None) => {}
    }
}

/// Like `tokio::io::copy_bidirectional`, with the configured latency before each write.
async fn copy_both_ways(a: &mut TcpStream, b: &mut TcpStream, delay: &watch::Receiver<Duration>) {
    let ((mut ar, mut aw), (mut br, mut bw)) = (a.split(), b.split());
    let _ = tokio::try_join!(pump(&mut ar, &mut bw, delay), pump(&mut br, &mut aw, delay));
}

async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    delay: &watch::Receiver<Duration>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close, as copy_bidirectional does: the other direction may still flow.
            return to.shutdown().await;
        }
        let d = *delay.borrow();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Reads and drops everything both sides send, until the client side closes.
async fn swallow(inbound: &mut TcpStream, outbound: Option<&mut TcpStream>) {
    let (mut a, mut b) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut outbound = outbound;
    loop {
        tokio::select! {
            r = inbound.read(&mut a) => if matches!(r, Ok(0) | Err(_)) { return },
            r = async {
                match outbound.as_mut() {
                    Some(o) => o.read(&mut b).await,
                    None => std::future::pending().await,
                }
            } => if matches!(r, Ok(0) | Err(_)) { outbound = None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every read with `<name>:` followed by what it read.
    async fn tagged_echo(name: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        let mut reply = format!("{name}:").into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        if s.write_all(&reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    async fn ask(conn: &mut TcpStream, msg: &str) -> String {
        conn.write_all(msg.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("reply in time")
            .expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// True when the peer closed the connection (EOF or reset) within a few seconds.
    async fn is_closed(conn: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    async fn connect(proxy: &TcpProxy) -> TcpStream {
        TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .expect("connect to proxy")
    }

    #[tokio::test]
    async fn forwards_traffic_both_ways() {
        let a = tagged_echo("a").await;
        let proxy = TcpProxy::start(a).await.expect("proxy");
        let mut c = connect(&proxy).await;
        assert_eq!(ask(&mut c, "hello").await, "a:hello");
        // Much more than the socket buffers, written while reading, to see nothing gets stuck.
        const BIG: usize = 4 << 20;
        let (mut r, mut w) = c.into_split();
        let writer = tokio::spawn(async move { w.write_all(&vec![b'x'; BIG]).await });
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < BIG {
            let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf))
                .await
                .expect("data in time")
                .expect("read big");
            assert!(n > 0, "closed early");
            got += buf[..n].iter().filter(|&&b| b == b'x').count();
        }
        assert_eq!(got, BIG);
        writer.await.expect("join").expect("write big");
    }

    #[tokio::test]
    async fn set_target_closes_old_connections_and_sends_new_ones_to_the_new_server() {
        let (a, b) = (tagged_echo("a").await, tagged_echo("b").await);
        let proxy = TcpProxy::start(a).await.expect("proxy");
        let mut old = connect(&proxy).await;
        assert_eq!(ask(&mut old, "1").await, "a:1");

        proxy.set_target(b);
        assert_eq!(proxy.target(), b);
        assert!(is_closed(&mut old).await, "old connection is closed");
        let mut new = connect(&proxy).await;
        assert_eq!(ask(&mut new, "2").await, "b:2");
    }

    #[tokio::test]
    async fn close_connections_keeps_the_target() {
        let a = tagged_echo("a").await;
        let proxy = TcpProxy::start(a).await.expect("proxy");
        let mut old = connect(&proxy).await;
        assert_eq!(ask(&mut old, "1").await, "a:1");
        proxy.close_connections();
        assert!(is_closed(&mut old).await, "connection is closed");
        let mut new = connect(&proxy).await;
        assert_eq!(ask(&mut new, "2").await, "a:2");
    }

    #[tokio::test]
    async fn a_refused_target_closes_the_client_connection() {
        let dead = crate::free_port().expect("port");
        let proxy = TcpProxy::start(dead).await.expect("proxy");
        let mut c = connect(&proxy).await;
        assert!(is_closed(&mut c).await, "closed when the target is down");
    }

    #[tokio::test]
    async fn drop_stops_listening_and_closes_connections() {
        let a = tagged_echo("a").await;
        let proxy = TcpProxy::start(a).await.expect("proxy");
        let port = proxy.port();
        let mut c = connect(&proxy).await;
        assert_eq!(ask(&mut c, "1").await, "a:1");
        drop(proxy);
        assert!(is_closed(&mut c).await, "open connection is closed");
        // The accept task is aborted, not stopped in place: give the runtime a moment.
        let refused = crate::eventually(Duration::from_secs(5), || async {
            TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
                .then_some(())
        })
        .await;
        assert!(refused.is_some(), "proxy port no longer accepts");
    }

    /// Nothing comes back for a while and the connection is not closed either.
    async fn hangs(conn: &mut TcpStream, msg: &str) -> bool {
        if conn.write_all(msg.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_millis(700), conn.read(&mut buf))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_blackhole_swallows_open_and_new_connections_until_restored() {
        let a = tagged_echo("a").await;
        let proxy = TcpProxy::start(a).await.expect("proxy");
        let mut open = connect(&proxy).await;
        assert_eq!(ask(&mut open, "1").await, "a:1");

        proxy.blackhole();
        // The switch reaches the connection task asynchronously.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            hangs(&mut open, "2").await,
            "an open connection gets no answer"
        );
        assert!(hangs(&mut open, "3").await, "and is not closed");
        let mut new = connect(&proxy).await;
        assert!(
            hangs(&mut new, "4").await,
            "a new connection is accepted and hangs"
        );

        proxy.restore();
        assert!(
            is_closed(&mut open).await,
            "swallowed connections are closed"
        );
        assert!(is_closed(&mut new).await, "including those made meanwhile");
        let mut after = connect(&proxy).await;
        assert_eq!(ask(&mut after, "5").await, "a:5");
    }

    #[tokio::test]
    async fn latency_delays_each_direction() {
        let a = tagged_echo("a").await;
        let proxy = TcpProxy::start(a).await.expect("proxy");
        let mut c = connect(&proxy).await;
        let fast = Instant::now();
        assert_eq!(ask(&mut c, "1").await, "a:1");
        let fast = fast.elapsed();
        proxy.set_latency(Duration::from_millis(150));
        let slow = Instant::now();
        assert_eq!(ask(&mut c, "2").await, "a:2");
        let slow = slow.elapsed();
        assert!(
            slow >= Duration::from_millis(300),
            "a round trip takes both delays: {slow:?} (without: {fast:?})"
        );
        proxy.set_latency(Duration::ZERO);
        let again = Instant::now();
        assert_eq!(ask(&mut c, "3").await, "a:3");
        assert!(
            again.elapsed() < Duration::from_millis(150),
            "{:?}",
            again.elapsed()
        );
    }

    /// The use it is made for: a Redis client behind the proxy follows a failover.
    #[tokio::test]
    async fn redis_client_reconnects_to_the_new_server() {
        let old = crate::RedisServer::start().await.expect("redis a");
        let new = crate::RedisServer::start().await.expect("redis b");
        for (server, value) in [(&old, "old"), (&new, "new")] {
            let mut c = server.connection().await.expect("conn");
            let _: () = redis::cmd("SET")
                .arg("who")
                .arg(value)
                .query_async(&mut c)
                .await
                .expect("set");
        }
        let proxy = TcpProxy::start(old.port()).await.expect("proxy");
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}/", proxy.port())).expect("url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let who: String = redis::cmd("GET")
            .arg("who")
            .query_async(&mut c)
            .await
            .expect("get");
        assert_eq!(who, "old");

        proxy.set_target(new.port());
        // The cut is asynchronous: a command sent right away may still get through.
        let cut = crate::eventually(Duration::from_secs(5), || {
            let mut c = c.clone();
            async move {
                let get = redis::cmd("GET").arg("who").clone();
                get.query_async::<String>(&mut c)
                    .await
                    .is_err()
                    .then_some(())
            }
        })
        .await;
        assert!(cut.is_some(), "the old connection is cut");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("reconnect");
        let who: String = redis::cmd("GET")
            .arg("who")
            .query_async(&mut c)
            .await
            .expect("get");
        assert_eq!(who, "new");
    }
}
