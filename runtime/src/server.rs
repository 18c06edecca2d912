//! Serving HTTP with deadlines and limits, for core-api and every admin port (the operator's
//! too). `axum::serve` sets no timer, so hyper's header-read timeout is off and nothing bounds
//! idle keep-alive connections, half-sent request heads, clients that stop reading, the
//! number of connections or the requests in flight: a few hundred slow sockets would exhaust
//! the file descriptors, and with them the liveness probe.
//!
//! Here every connection gets:
//! - a header deadline (`headerTimeout`): a request head must arrive whole within it, and an
//!   idle keep-alive connection is closed after it (hyper starts the timer when it waits for
//!   the next head);
//! - a write deadline (`writeTimeout`): a client that stops reading is cut off once a write
//!   has made no progress for that long;
//! - a place under `maxConnections`; past it a new connection gets an immediate 503 with
//!   `Retry-After` and is closed;
//!
//! and every request a deadline (`requestTimeout`) and a place under `maxRequests` in flight;
//! past it the request is shed at once with a 503 and `Retry-After` (never queued).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use crate::config::HttpConfig;

/// Connections over the limit being answered with a 503 at one time.
const MAX_TURN_AWAYS: usize = 64;

/// Largest request head accepted (request line and headers); a larger one gets a 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Limits of the admin ports (/healthz, /readyz, /metrics): probes and one scraper.
pub fn admin_limits() -> HttpConfig {
    HttpConfig {
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        write_timeout: Duration::from_secs(10),
        max_connections: 64,
        max_requests: 32,
    }
}

/// Serves `app` on `listener` until `cancel` fires, then lets requests in flight finish (at
/// most `requestTimeout` more) and closes idle connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &HttpConfig,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    // Around the whole router, not `Router::layer` (which wraps each route on its own, so the
    // limit would be per route): one semaphore for every request of this port.
    let app = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refused))
        .load_shed()
        .concurrency_limit(limits.max_requests)
        .timeout(limits.request_timeout)
        .service(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let turn_aways = Arc::new(Semaphore::new(MAX_TURN_AWAYS));
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors, or a connection reset while queued: back off
                    // instead of spinning on the error.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            // Turned away with a 503, a bounded number at a time; past that, just closed.
            if let Ok(turning) = turn_aways.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    turn_away(stream, Duration::from_secs(1)).await;
                    drop(turning);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(limits.write_timeout));
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(Box::pin(io)), service));
        tokio::spawn(async move {
            // A connection ends in an error when a deadline cut it off or the client went
            // away; either way there is nobody to tell.
            let _ = conn.await;
            drop(place);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.request_timeout + Duration::from_secs(1)) => {}
    }
    Ok(())
}

/// The answer to a request that was shed or overran its deadline.
async fn refused(error: tower::BoxError) -> Response {
    let (code, message) = if error.is::<tower::load_shed::error::Overloaded>() {
        ("overloaded", "too many requests in flight; retry shortly")
    } else if error.is::<tower::timeout::error::Elapsed>() {
        ("timeout", "the request took too long; retry shortly")
    } else {
        (
            "unavailable",
            "the request could not be served; retry shortly",
        )
    };
    unavailable(code, message)
}

fn unavailable(code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut res = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// A connection over the limit: a 503 written at once, then the request read and dropped for
/// a moment before closing, so the client reads the answer instead of a reset (closing a
/// socket with unread data resets it). `limit` bounds the whole exchange.
async fn turn_away(mut stream: TcpStream, limit: Duration) {
    const BODY: &str =
        r#"{"error":{"code":"overloaded","message":"too many connections; retry shortly"}}"#;
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(limit, async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
