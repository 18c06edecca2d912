//! An example product service: a tiny "deals" API that owns its own table and publishes its
//! widgets through the transactional outbox. This is the pattern product teams copy.
//!
//! ```text
//! DATABASE_URL=postgres://... cargo run -p widget-runtime --example deals
//! curl -X POST localhost:3001/deals -H 'content-type: application/json' \
//!      -d '{"title":"Headphones","priceCents":4999,"discountPercent":40}'
//! ```
//!
//! Every write recomputes the widgets it affects and enqueues them **in the same transaction**,
//! so a widget event exists if and only if the product write committed. Widget versions come
//! from a per-widget row bumped under a row lock: recomputations of one widget are serialized,
//! each sees every earlier committed write, and versions grow in commit order — so the newest
//! version is always the most complete one.

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};
use widget_runtime::{Outbox, WidgetEvent, store};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewDeal {
    title: String,
    price_cents: i64,
    #[serde(default)]
    discount_percent: i32,
}

struct AppError(StatusCode, String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"code": self.0.as_u16(), "message": self.1}})),
        )
            .into_response()
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}"))
    }
}

impl From<widget_runtime::outbox::OutboxError> for AppError {
    fn from(e: widget_runtime::outbox::OutboxError) -> Self {
        AppError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

async fn create_deal(
    State(pool): State<PgPool>,
    Json(d): Json<NewDeal>,
) -> Result<Response, AppError> {
    if d.title.trim().is_empty()
        || d.title.len() > 200
        || d.price_cents < 0
        || !(0..=100).contains(&d.discount_percent)
    {
        return Err(AppError(
            StatusCode::BAD_REQUEST,
            "title must be 1-200 characters, priceCents >= 0, discountPercent 0-100".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO deals (title, price_cents, discount_percent) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(d.title.trim())
    .bind(d.price_cents)
    .bind(d.discount_percent)
    .fetch_one(&mut *tx)
    .await?;
    publish_widgets(&mut tx).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(json!({"id": id}))).into_response())
}

async fn delete_deal(
    State(pool): State<PgPool>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query("DELETE FROM deals WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(AppError(StatusCode::NOT_FOUND, format!("no deal {id}")));
    }
    publish_widgets(&mut tx).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_deals(State(pool): State<PgPool>) -> Result<Json<serde_json::Value>, AppError> {
    let rows: Vec<(i64, String, i64, i32)> =
        sqlx::query_as("SELECT id, title, price_cents, discount_percent FROM deals ORDER BY id")
            .fetch_all(&pool)
            .await?;
    Ok(Json(json!(rows
        .into_iter()
        .map(|(id, title, price, discount)| json!({"id": id, "title": title, "priceCents": price, "discountPercent": discount}))
        .collect::<Vec<_>>())))
}

/// Takes the widget's version row lock and returns the next version.
async fn next_version(
    tx: &mut Transaction<'_, Postgres>,
    widget_key: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO deal_widget_versions (widget_key, version) VALUES ($1, 1)
         ON CONFLICT (widget_key) DO UPDATE SET version = deal_widget_versions.version + 1
         RETURNING version",
    )
    .bind(widget_key)
    .fetch_one(&mut **tx)
    .await
}

/// Recomputes the deals widgets from the committed state and enqueues them in `tx`.
async fn publish_widgets(tx: &mut Transaction<'_, Postgres>) -> Result<(), AppError> {
    let top_version = next_version(tx, "deals.top-picks").await?;
    let top: Vec<(i64, String, i64, i32)> = sqlx::query_as(
        "SELECT id, title, price_cents, discount_percent FROM deals
         ORDER BY discount_percent DESC, id DESC LIMIT 5",
    )
    .fetch_all(&mut **tx)
    .await?;
    let items: Vec<_> = top
        .iter()
        .map(|(id, title, price, discount)| {
            json!({"id": id, "title": title, "price": format!("{}.{:02}", price / 100, price % 100), "badge": format!("-{discount}%")})
        })
        .collect();
    let mut events = vec![WidgetEvent::upsert(
        "deals.top-picks",
        "carousel",
        top_version,
        json!({"title": "Top picks for you", "items": items}),
    )];

    let hot_version = next_version(tx, "deals.hot-deal").await?;
    events.push(match top.first() {
        Some((id, title, _, discount)) => WidgetEvent::upsert(
            "deals.hot-deal",
            "banner",
            hot_version,
            json!({"headline": format!("{title}: {discount}% off"), "deepLink": format!("app://deals/{id}")}),
        ),
        None => WidgetEvent::delete("deals.hot-deal", "banner", hot_version),
    });
    Outbox::enqueue_all(tx, &events).await?;
    Ok(())
}

fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/deals", get(list_deals).post(create_deal))
        .route("/deals/{id}", delete(delete_deal))
        .with_state(pool)
}

async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    // The outbox table comes from the platform's migrations; the rest is the product's own.
    store::migrate(&store::PRODUCT_MIGRATIONS, pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS deals (
             id bigserial PRIMARY KEY, title text NOT NULL, price_cents bigint NOT NULL,
             discount_percent int NOT NULL DEFAULT 0);
         CREATE TABLE IF NOT EXISTS deal_widget_versions (
             widget_key text PRIMARY KEY, version bigint NOT NULL);",
    )
    .execute(pool)
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    widget_runtime::telemetry::init(widget_runtime::telemetry::LogFormat::Text, false);
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| anyhow::anyhow!("set DATABASE_URL to the product database"))?;
    let listen: SocketAddr = std::env::var("DEALS_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:3001".into())
        .parse()?;
    let pool = PgPool::connect(&url).await?;
    migrate(&pool).await?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "deals service listening");
    let cancel = widget_runtime::shutdown::on_signal();
    axum::serve(listener, router(pool))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await?;
    Ok(())
}
