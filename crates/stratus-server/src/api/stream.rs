//! `GET /api/v1/stream` (scope `telemetry:read`): the live event bus as Server-Sent Events.
//!
//! Each event is one `data:` line holding the JSON of [`crate::events::Event`] (telemetry,
//! alarm, device_status, firmware). Filters: `?device=D` (repeatable, or a comma list) keeps
//! events of those devices; `?key=K` (repeatable, or a comma list) keeps telemetry events that
//! have one of those keys, trimmed to them (other event types pass). A `: heartbeat` comment
//! goes out every 15 s. A reader that falls behind the bus (it did not read while
//! [`crate::events::DEFAULT_CAPACITY`] events went by) gets a final `event: dropped` with
//! `{"dropped": N}` and the stream ends: it never slows ingestion. A reader whose credential
//! stops holding (its token expires or is revoked, its client's secret is rotated, its client
//! is deleted) gets a final `event: revoked` with `{"reason": …}` within a second and the
//! stream ends.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiState, Caller, ErrorBody};
use crate::auth::{now_secs, Auth, Principal, SCOPE_TELEMETRY_READ};
use crate::events::Event;
use crate::metrics::Metrics;

/// The routes of this module.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(stream_events))
}

/// What a reader wants.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Filter {
    devices: HashSet<String>,
    keys: HashSet<String>,
}

impl Filter {
    /// Parses `device=` and `key=` (repeatable, comma lists) from a query string.
    pub fn parse(query: Option<&str>) -> Result<Filter, ApiError> {
        let mut f = Filter::default();
        let Some(q) = query.filter(|q| !q.is_empty()) else {
            return Ok(f);
        };
        let url = reqwest::Url::parse(&format!("http://stream/?{q}"))
            .map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
        for (name, value) in url.query_pairs() {
            let set = match name.as_ref() {
                "device" => &mut f.devices,
                "key" => &mut f.keys,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown parameter {other:?} (device and key filter the stream)"
                    )))
                }
            };
            set.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned),
            );
        }
        Ok(f)
    }

    /// The event as this reader should see it, if at all.
    pub fn apply(&self, event: &Event) -> Option<serde_json::Value> {
        if !self.devices.is_empty() && !event.device().is_some_and(|d| self.devices.contains(d)) {
            return None;
        }
        match event {
            Event::Telemetry { device, ts, values } if !self.keys.is_empty() => {
                let kept: serde_json::Map<_, _> = values
                    .iter()
                    .filter(|(k, _)| self.keys.contains(k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if kept.is_empty() {
                    return None;
                }
                Some(json!({"type": "telemetry", "device": device, "ts": ts, "values": kept}))
            }
            other => serde_json::to_value(other).ok(),
        }
    }
}

/// Counts the reader while it is connected.
struct Reader(Arc<Metrics>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.stream_readers.dec();
    }
}

/// Live telemetry, alarms, device status and firmware progress (Server-Sent Events).
#[utoipa::path(
    get,
    path = "/api/v1/stream",
    tag = "stream",
    params(
        ("device" = Option<String>, Query, description = "Only these devices (repeatable or a comma list)"),
        ("key" = Option<String>, Query, description = "Only telemetry with these keys, trimmed to them (repeatable or a comma list)"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: one `data:` JSON object per event", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks telemetry:read", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn stream_events(
    State(state): State<ApiState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(SCOPE_TELEMETRY_READ)?;
    let filter = Filter::parse(query.as_deref())?;
    let rx = state.broker.events.subscribe();
    let metrics = state.broker.metrics.clone();
    metrics.stream_readers.inc();
    let reader = Reader(metrics);
    let guard = Guard {
        auth: state.auth.clone(),
        principal: caller.0,
    };
    Ok(
        Sse::new(events(rx, filter, reader, Some(guard))).keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("heartbeat"),
        ),
    )
}

/// What a reader proved, checked while its stream lasts.
struct Guard {
    auth: Arc<Auth>,
    principal: Principal,
}

/// How often a stream checks its reader's credential.
const GUARD_TICK: Duration = Duration::from_millis(500);

fn events(
    rx: tokio::sync::broadcast::Receiver<Arc<Event>>,
    filter: Filter,
    reader: Reader,
    guard: Option<Guard>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let tick = tokio::time::interval(GUARD_TICK);
    stream::unfold(
        Some((rx, filter, reader, guard, tick)),
        |state| async move {
            let (mut rx, filter, reader, guard, mut tick) = state?;
            loop {
                let received = tokio::select! {
                    r = rx.recv() => r,
                    _ = tick.tick(), if guard.is_some() => {
                        let lapse = guard.as_ref().and_then(|g| {
                            let p = &g.principal;
                            g.auth.lapse(&p.id, p.kind, &p.proof, now_secs())
                        });
                        if let Some(lapse) = lapse {
                            tracing::info!(why = lapse.describe(), "stream reader's credential no longer holds; closed");
                            let e = SseEvent::default()
                                .event("revoked")
                                .data(json!({"reason": lapse.describe()}).to_string());
                            return Some((Ok(e), None));
                        }
                        continue;
                    }
                };
                match received {
                    Ok(event) => {
                        if let Some(json) = filter.apply(&event) {
                            let e = SseEvent::default().data(json.to_string());
                            return Some((Ok(e), Some((rx, filter, reader, guard, tick))));
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        reader.0.stream_dropped.inc();
                        tracing::info!(missed = n, "stream reader fell behind; dropped");
                        let e = SseEvent::default().event("dropped").data(
                            json!({"dropped": n, "reason": "the reader fell behind"}).to_string(),
                        );
                        return Some((Ok(e), None));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn telemetry(device: &str, values: serde_json::Value) -> Event {
        let serde_json::Value::Object(values) = values else {
            panic!()
        };
        Event::Telemetry {
            device: device.into(),
            ts: 1,
            values,
        }
    }

    #[test]
    fn filters_pick_devices_and_trim_keys() {
        let f = Filter::parse(Some("device=a,b&device=c&key=t")).unwrap();
        assert_eq!(f.devices.len(), 3);
        assert_eq!(
            f.apply(&telemetry("a", json!({"t": 1, "h": 2}))),
            Some(json!({"type": "telemetry", "device": "a", "ts": 1, "values": {"t": 1}}))
        );
        assert_eq!(
            f.apply(&telemetry("a", json!({"h": 2}))),
            None,
            "no such key"
        );
        assert_eq!(
            f.apply(&telemetry("z", json!({"t": 2}))),
            None,
            "other device"
        );
        let status = Event::DeviceStatus {
            device: "c".into(),
            online: true,
            transport: None,
            last_seen: None,
        };
        assert!(f.apply(&status).is_some(), "keys filter only telemetry");
        let all = Filter::parse(None).unwrap();
        assert!(all
            .apply(&telemetry("q", serde_json::Value::Object(Map::new())))
            .is_some());
        assert!(Filter::parse(Some("bogus=1")).is_err());
        let alarm = Event::Alarm {
            alarm: json!({"device": "b", "id": "x"}),
        };
        assert!(f.apply(&alarm).is_some());
        assert!(Filter::parse(Some("device=q"))
            .unwrap()
            .apply(&alarm)
            .is_none());
    }

    #[tokio::test]
    async fn a_lagging_reader_gets_a_dropped_notice_and_the_end() {
        use futures_util::StreamExt;
        let bus = crate::events::EventBus::new(4);
        let metrics = Arc::new(Metrics::new());
        metrics.stream_readers.inc();
        let s = events(
            bus.subscribe(),
            Filter::default(),
            Reader(metrics.clone()),
            None,
        );
        for i in 0..10 {
            bus.publish(telemetry(&format!("d{i}"), json!({"t": i})));
        }
        let items: Vec<_> = s.collect().await;
        assert_eq!(items.len(), 1, "only the notice");
        assert_eq!(metrics.stream_dropped.get(), 1);
        assert_eq!(metrics.stream_readers.get(), 0, "the reader is gone");
    }
}
