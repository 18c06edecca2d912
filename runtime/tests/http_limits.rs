//! core-api's HTTP deadlines and limits, attacked with raw sockets against the real binary:
//! a half-sent request head, idle sockets filling the connection limit, a client that never
//! reads a large screen, a burst over the in-flight limit, a request over its deadline; and
//! the admin routes kept off the public port, with `/readyz` naming stores, not driver errors.

mod support;

use std::time::{Duration, Instant};

use testkit::{TcpProxy, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{Stack, http_get};

const BIG_WIDGETS: usize = 150;

fn config(http: &str) -> String {
    let big: Vec<String> = (0..BIG_WIDGETS)
        .map(|i| format!("\"deals.big-{i}\""))
        .collect();
    format!(
        "pipeline: t\nsources: [{{name: deals}}]\n\
         screens:\n  - {{name: deals, widgets: [\"deals.top\"]}}\n  - {{name: big, widgets: [{}]}}\n\
         http: {http}\n",
        big.join(", ")
    )
}

struct Api {
    child: tokio::process::Child,
    public: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start(stack: &Stack, redis_url: &str, db_url: &str) -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let public = format!("127.0.0.1:{}", testkit::free_port().expect("port"));
        let admin = format!("127.0.0.1:{}", testkit::free_port().expect("port"));
        let child =
            support::core_api_command(stack, dir.path(), &public, &admin, redis_url, db_url)
                .spawn()
                .expect("start core-api");
        let api = Api {
            child,
            public,
            admin,
            _dir: dir,
        };
        assert!(support::wait_ready(&api.admin).await, "core-api ready");
        api
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

async fn seed(stack: &Stack) {
    let core = stack.pool(&stack.core_url).await;
    // ~60 KB each: the big screen is about 9 MB, more than the socket buffers hold.
    let content = format!("{{\"blob\": \"{}\"}}", "x".repeat(60_000));
    sqlx::query(
        "INSERT INTO widgets (widget_key, widget_type, source, data_version, content)
         SELECT 'deals.big-' || i, 'card', 'deals', 1, $1::jsonb FROM generate_series(0, $2) i
         UNION ALL SELECT 'deals.top', 'card', 'deals', 1, '{\"t\": 1}'::jsonb",
    )
    .bind(&content)
    .bind(BIG_WIDGETS as i32 - 1)
    .execute(&core)
    .await
    .expect("seed");
}

/// True when the peer closed the connection (EOF or reset) within `limit`.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let start = Instant::now();
    while start.elapsed() < limit {
        match tokio::time::timeout(limit - start.elapsed(), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. a 408 before the close
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_and_the_limits_shed_instead_of_queueing() {
    let stack = Stack::with_config(&config(
        "{headerTimeout: 1s, requestTimeout: 2s, writeTimeout: 1s, maxConnections: 8, maxRequests: 4}",
    ))
    .await;
    seed(&stack).await;
    let api = Api::start(&stack, &stack.redis.url(), &stack.core_url).await;

    // The admin routes live on the admin port only.
    let r = http_get(&api.public, "/metrics", &[])
        .await
        .expect("answer");
    assert_eq!(r.status, 404, "no /metrics on the public port");
    let r = http_get(&api.public, "/readyz", &[]).await.expect("answer");
    assert_eq!(r.status, 404, "no /readyz on the public port");
    let r = http_get(&api.admin, "/metrics", &[]).await.expect("answer");
    assert_eq!(r.status, 200);

    // Half a request head: closed within the header timeout.
    let mut half = TcpStream::connect(&api.public).await.expect("connect");
    half.write_all(b"GET /v1/screens/deals HTTP/1.1\r\nHost: t\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    assert!(
        closed_within(&mut half, Duration::from_secs(3)).await,
        "a half-sent head is cut off"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "not before the timeout"
    );

    // An idle keep-alive connection is closed after the same timeout.
    let mut idle = TcpStream::connect(&api.public).await.expect("connect");
    idle.write_all(b"GET /v1/screens/deals HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut idle, Duration::from_secs(3)).await,
        "idle keep-alive closed"
    );

    // Idle sockets fill the connection limit: a normal request gets a fast 503, and the
    // admin port (the kubelet's probes) is not affected.
    let mut hogs = Vec::new();
    for _ in 0..8 {
        hogs.push(TcpStream::connect(&api.public).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = http_get(&api.public, "/v1/screens/deals", &[])
        .await
        .expect("an answer");
    assert_eq!(r.status, 503, "shed at the connection limit: {}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.body.contains("overloaded"), "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let r = http_get(&api.admin, "/healthz", &[])
        .await
        .expect("healthz");
    assert_eq!(r.status, 200, "the admin port has its own limit");
    // The hogs are cut off by the header timeout; then requests are served again.
    let served = eventually(Duration::from_secs(5), || async {
        http_get(&api.public, "/v1/screens/deals", &[])
            .await
            .filter(|r| r.status == 200)
    })
    .await;
    assert!(
        served.is_some(),
        "served again once the idle sockets are gone"
    );
    drop(hogs);

    // A client that asks for a 9 MB screen and never reads it is cut off after the write
    // timeout, freeing its place.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let mut stalled = socket
        .connect(api.public.parse().expect("addr"))
        .await
        .expect("connect");
    stalled
        .write_all(b"GET /v1/screens/big HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_secs(4)).await; // request, then 1 s without progress
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stalled connection was closed by the server"
    );
    assert!(
        got < 9_000_000,
        "it was cut off before the whole screen was written ({got} bytes)"
    );

    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_in_flight_limit_are_shed_and_slow_ones_time_out() {
    let stack = Stack::with_config(&config(
        "{headerTimeout: 5s, requestTimeout: 500ms, writeTimeout: 5s, maxConnections: 64, maxRequests: 2}",
    ))
    .await;
    seed(&stack).await;
    let redis = TcpProxy::start(stack.redis.port()).await.expect("proxy");
    let pg = TcpProxy::start(stack.pg.port()).await.expect("proxy");
    let db_url = stack.core_url.replace(
        &format!(":{}/", stack.pg.port()),
        &format!(":{}/", pg.port()),
    );
    let api = Api::start(
        &stack,
        &format!("redis://127.0.0.1:{}/", redis.port()),
        &db_url,
    )
    .await;
    let db = stack.pool(&stack.core_url).await;

    // Redis stops answering: each request now waits 250 ms for it before Postgres.
    redis.blackhole();
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let addr = api.public.clone();
            tokio::spawn(async move { http_get(&addr, "/v1/screens/deals", &[]).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for b in burst {
        let r = b.await.expect("join").expect("an answer");
        if r.status == 503 {
            assert_eq!(r.header("retry-after"), Some("1"));
        }
        statuses.push((r.status, r.body));
    }
    assert!(
        statuses
            .iter()
            .any(|(s, b)| *s == 503 && b.contains("overloaded")),
        "some of the burst is shed: {statuses:?}"
    );
    assert!(
        statuses.iter().any(|(s, _)| *s == 200),
        "the rest is served: {statuses:?}"
    );

    // Postgres made slow too (a lock held on the widgets table): a request that cannot be
    // answered within the request timeout gets a 503, it does not hang.
    let mut lock = db.begin().await.expect("begin");
    sqlx::query("LOCK TABLE widgets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    // The limit is the port's, not each route's: three requests to three routes at once, all
    // slow (Redis gone, the table locked), with `maxRequests: 2`: one is shed.
    let mixed: Vec<_> = [
        "/v1/screens/deals",
        "/v1/widgets?keys=deals.top",
        "/v1/screens/big",
    ]
    .into_iter()
    .map(|path| {
        let addr = api.public.clone();
        tokio::spawn(async move { http_get(&addr, path, &[]).await })
    })
    .collect();
    let mut shed = 0;
    for m in mixed {
        let r = m.await.expect("join").expect("an answer");
        if r.status == 503 && r.body.contains("overloaded") {
            shed += 1;
        }
    }
    assert!(shed >= 1, "one limit for the whole port");

    let started = Instant::now();
    let r = http_get(&api.public, "/v1/widgets?keys=deals.big-1", &[])
        .await
        .expect("an answer");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    lock.rollback().await.expect("unlock");

    // Neither store answers: not ready, and the body names no host, user or driver error.
    pg.blackhole();
    let not_ready = eventually(Duration::from_secs(20), || async {
        http_get(&api.admin, "/readyz", &[])
            .await
            .filter(|r| r.status == 503)
    })
    .await
    .expect("not ready");
    assert_eq!(
        not_ready.json(),
        serde_json::json!({"ready": false, "failing": ["core-api"]})
    );
    pg.restore();
    redis.restore();
    api.stop().await;
}
