//! A pooled HTTP/1.1 client (keep-alive, like a real client app or gateway) with a deadline per
//! request: a request that takes longer counts as not served.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        Http {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build(connector),
            timeout: Duration::from_secs(2),
        }
    }

    /// GET `path` on `addr` (`host:port`), optionally as a user (the gateway's `x-user-id`).
    /// The status and body, or `None` if nothing answered within the deadline.
    pub async fn get(&self, addr: &str, path: &str, user: Option<&str>) -> Option<(u16, Bytes)> {
        let mut req = http::Request::get(format!("http://{addr}{path}"));
        if let Some(u) = user {
            req = req.header("x-user-id", u);
        }
        let req = req.body(Empty::new()).ok()?;
        let call = async {
            let resp = self.client.request(req).await.ok()?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .ok()
            .flatten()
    }
}
