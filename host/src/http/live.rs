//! `GET /v1/events/stream`: the global feed as Server-Sent Events.
//!
//! A producer task reads the subscription into a buffer of at most
//! [`BUFFER_BYTES`] per subscriber, which the response body drains. A
//! subscriber that leaves the buffer full for the stall timeout has stopped
//! reading (hyper no longer polls its body, so ending the body would not
//! free anything): its connection is closed and counted; it resumes with
//! `Last-Event-ID`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::extract::ApiQuery;
use super::{ApiError, ApiState, header_text};
use crate::auth::Caller;
use crate::cloudevents;
use crate::metrics::Metrics;
use crate::server::ConnectionHandle;
use crate::store::{EventFilter, Subscription};

/// Bytes of event data buffered per subscriber (an event larger than this
/// is buffered alone).
const BUFFER_BYTES: usize = 256 * 1024;
/// The stall timeout off [`crate::server::serve`] (no [`ConnectionHandle`]).
const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
pub(super) struct LiveQuery {
    after: Option<u64>,
    /// Comma-separated event types.
    #[serde(rename = "type")]
    event_types: Option<String>,
    stream_prefix: Option<String>,
    #[serde(default)]
    schema: super::Schema,
}

/// An event on its way to the body, holding its share of the buffer.
type Buffered = (SseEvent, OwnedSemaphorePermit);

/// `GET /v1/events/stream`: the global feed as Server-Sent Events, from
/// `Last-Event-ID` (or `?after=`) on, history first, then live. Each event's
/// `id` is its global position and its `data` a structured-mode CloudEvent.
/// A store failure ends the stream with an `error` event; the client
/// resumes with `Last-Event-ID`. The stream ends when the host shuts down.
pub(super) async fn live_events(
    State(state): State<Arc<ApiState>>,
    ApiQuery(query): ApiQuery<LiveQuery>,
    connection: Option<Extension<ConnectionHandle>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // A token holds at most so many streams at once.
    let permit = match caller.filter(|Extension(caller)| caller.authenticated) {
        Some(Extension(caller)) => Some(state.auth.open_stream(&caller.name).ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "the token `{}` holds {} live streams, the most it may; close one first",
                    caller.name,
                    state.auth.config().max_streams_per_caller
                ),
            )
        })?),
        None => None,
    };
    let after = match header_text(&headers, "last-event-id")?.filter(|id| !id.is_empty()) {
        Some(id) => id.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                format!("Last-Event-ID must be a global position, got `{id}`"),
            )
        })?,
        None => query.after.unwrap_or(0),
    };
    let filter = EventFilter {
        event_types: query
            .event_types
            .iter()
            .flat_map(|types| types.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        stream_prefix: query.stream_prefix.filter(|p| !p.is_empty()),
    };
    let (sender, mut receiver) = mpsc::unbounded_channel::<Buffered>();
    let producer = Producer {
        shape: (query.schema, state.commands.clone()),
        sender,
        buffer: Arc::new(Semaphore::new(BUFFER_BYTES)),
        stall_timeout: connection.as_ref().map_or(DEFAULT_STALL_TIMEOUT, |c| c.sse_stall_timeout()),
    };
    let subscription = Subscription::new(state.commands.store().clone(), after).with_filter(filter);
    tokio::spawn(producer.run(
        subscription,
        state.stopping.clone(),
        state.metrics.clone(),
        connection.map(|Extension(c)| c),
    ));
    let open = state.metrics.live_stream_opened();
    let events = futures_util::stream::poll_fn(move |cx| {
        let _held = (&open, &permit);
        receiver.poll_recv(cx).map(|buffered| buffered.map(|(event, _share)| Ok::<_, Infallible>(event)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

/// Fills one subscriber's buffer.
struct Producer {
    /// The schema asked for, and who upcasts.
    shape: (super::Schema, Arc<crate::pipeline::CommandService>),
    sender: mpsc::UnboundedSender<Buffered>,
    buffer: Arc<Semaphore>,
    stall_timeout: Duration,
}

/// Why the producer stopped.
enum End {
    /// Shutdown, a store failure, or the subscriber went away.
    Done,
    /// The buffer stayed full for the stall timeout.
    Stalled,
}

impl Producer {
    async fn run(
        self,
        subscription: Subscription,
        stopping: watch::Receiver<bool>,
        metrics: Metrics,
        connection: Option<ConnectionHandle>,
    ) {
        if let End::Stalled = self.feed(subscription, stopping).await {
            tracing::warn!(
                stall_timeout_ms = self.stall_timeout.as_millis() as u64,
                "dropped a live feed subscriber that stopped reading (it resumes with Last-Event-ID)"
            );
            metrics.live_stream_dropped();
            if let Some(connection) = connection {
                connection.close();
            }
        }
    }

    async fn feed(&self, mut subscription: Subscription, mut stopping: watch::Receiver<bool>) -> End {
        loop {
            let batch = tokio::select! {
                batch = subscription.next_batch() => Some(batch),
                _ = stopping.wait_for(|stopping| *stopping) => None,
                _ = self.sender.closed() => return End::Done,
            };
            let Some(batch) = batch else {
                return self.drained().await;
            };
            let (schema, commands) = &self.shape;
            let batch = batch
                .map_err(super::ApiError::from)
                .and_then(|events| schema.shape(commands, events).map_err(super::ApiError::from));
            match batch {
                Ok(batch) => {
                    for event in batch {
                        let id = SseEvent::default().id(event.position.to_string());
                        if let Err(end) = self.push(id, cloudevents::to_cloudevent(&event).to_string()).await {
                            return end;
                        }
                    }
                }
                Err(error) => {
                    let data = json!({"error": {"code": error.code, "message": error.message}});
                    if let Err(end) = self.push(SseEvent::default().event("error"), data.to_string()).await {
                        return end;
                    }
                    return self.drained().await;
                }
            }
        }
    }

    /// Buffer one event once there is room for its data.
    async fn push(&self, event: SseEvent, data: String) -> Result<(), End> {
        let share = data.len().clamp(1, BUFFER_BYTES) as u32;
        let room = tokio::select! {
            room = tokio::time::timeout(self.stall_timeout, self.buffer.clone().acquire_many_owned(share)) => room,
            _ = self.sender.closed() => return Err(End::Done),
        };
        match room {
            Ok(Ok(share)) => self.sender.send((event.data(data), share)).map_err(|_| End::Done),
            Ok(Err(_closed)) => Err(End::Done),
            Err(_elapsed) => Err(End::Stalled),
        }
    }

    /// After the last event: wait (at most the stall timeout) until the
    /// subscriber has taken everything buffered, so that a stalled one does
    /// not hold up shutdown.
    async fn drained(&self) -> End {
        let everything = self.buffer.acquire_many(BUFFER_BYTES as u32);
        match tokio::time::timeout(self.stall_timeout, everything).await {
            Err(_elapsed) if !self.sender.is_closed() => End::Stalled,
            _ => End::Done,
        }
    }
}
