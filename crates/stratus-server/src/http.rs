//! The HTTP listeners (axum on HTTP and, with `[tls]`, HTTPS): health, Prometheus metrics,
//! MQTT over WebSocket at `/mqtt`, the dashboard at `/` ([`crate::dashboard`]), and the JSON
//! error shape of the API. [`listener`] accepts and serves the connections.

pub mod listener;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::api::{ApiError, ApiState};
use crate::broker::Broker;
use crate::mqtt::{run_connection, MqttContext};
use crate::transport::{ChannelReader, ChannelWriter};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The broker hub.
    pub broker: Arc<Broker>,
    /// MQTT settings, for WebSocket connections.
    pub mqtt: Arc<MqttContext>,
    /// Tasks the server waits for at shutdown.
    pub tasks: TaskTracker,
    /// Turns true at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// The API's state.
    pub api: ApiState,
}

/// The router for the HTTP and HTTPS listeners.
pub fn router(state: AppState) -> Router {
    let (api, openapi) = crate::api::routes().split_for_parts();
    let openapi: Arc<str> = openapi.to_json().unwrap_or_default().into();
    let max_body = state.api.max_body;
    let api = api
        .route(
            "/api/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        doc.to_string(),
                    )
                }
            }),
        )
        .merge(crate::dashboard::routes())
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state.api.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/mqtt", get(mqtt_over_websocket))
        .with_state(state)
        .merge(api)
        .fallback(not_found)
}

async fn healthz(State(app): State<AppState>) -> impl IntoResponse {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.broker.started.elapsed().as_secs(),
    }))
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let broker = &app.broker;
    broker
        .metrics
        .uptime_seconds
        .set(broker.started.elapsed().as_secs() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        broker.metrics.render(),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such resource")
}

/// MQTT over WebSocket (MQTT 3.1.1 §6, MQTT 5.0 §6): binary frames carry the MQTT byte
/// stream; the subprotocol is `mqtt` (or the older `mqttv3.1`). An upgrade that does not
/// offer one of them is refused with 400 before the handshake, as Mosquitto and EMQX do: the
/// client must select the subprotocol (MQTT-6.0.0-3), and a WebSocket that carries something
/// else is not an MQTT client.
async fn mqtt_over_websocket(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let ws = ws.protocols(["mqtt", "mqttv3.1"]);
    if ws.selected_protocol().is_none() {
        app.broker.metrics.protocol_error("websocket_subprotocol");
        tracing::debug!(%peer, "WebSocket upgrade without the mqtt subprotocol refused");
        return ApiError::bad_request(
            "MQTT over WebSocket needs the subprotocol mqtt (Sec-WebSocket-Protocol: mqtt)",
        )
        .into_response();
    }
    let max_frame = app.mqtt.limits.max_packet_size.max(64 * 1024);
    ws.max_message_size(max_frame).on_upgrade(move |socket| {
        let tasks = app.tasks.clone();
        tasks.track_future(serve_websocket(app, socket, peer))
    })
}

async fn serve_websocket(app: AppState, socket: WebSocket, peer: SocketAddr) {
    let (mut sink, mut stream) = socket.split();
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(16);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(16);
    let pump = async move {
        loop {
            tokio::select! {
                incoming = stream.next() => match incoming {
                    Some(Ok(WsMessage::Binary(data))) => {
                        if in_tx.send(data).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    // Text frames are a protocol error for MQTT over WebSocket (MQTT-6.0.0-1).
                    Some(Ok(WsMessage::Text(_) | WsMessage::Close(_))) | Some(Err(_)) | None => break,
                },
                outgoing = out_rx.recv() => match outgoing {
                    Some(data) => {
                        if sink.send(WsMessage::Binary(data)).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
        let _ = sink.close().await;
    };
    let driver = run_connection(
        app.mqtt.clone(),
        ChannelReader(in_rx),
        ChannelWriter(out_tx),
        peer,
        None,
        app.shutdown.clone(),
    );
    tokio::join!(pump, driver);
}

/// `app` with `Strict-Transport-Security: max-age=MAX_AGE` on every answer (RFC 6797), for the
/// HTTPS listener (a browser ignores it over plain HTTP); `max_age` 0 adds nothing.
pub fn with_hsts(app: Router, max_age: u64) -> Router {
    if max_age == 0 {
        return app;
    }
    let Ok(value) = HeaderValue::from_str(&format!("max-age={max_age}")) else {
        return app;
    };
    app.layer(axum::middleware::map_response(move |mut r: Response| {
        let value = value.clone();
        async move {
            r.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, value);
            r
        }
    }))
}
