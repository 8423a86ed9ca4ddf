//! `GET /api/v1/events`: the dashboards' live feed, as server-sent events.
//!
//! Each stream only forwards the rollout board that [`crate::hub::rollouts`] computes once for
//! every viewer: a stream costs a watch receiver and its socket, never a store query. Streams
//! are capped (`limits.max_event_streams`), send a keep-alive comment every
//! [`KEEP_ALIVE`] so proxies and dead peers are noticed, and end when the server shuts down.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::app::{AppError, AppState};
use crate::hub::rollouts::Viewer;

/// How often a quiet stream sends a comment line.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

struct Feed {
    board: watch::Receiver<Arc<str>>,
    shutdown: CancellationToken,
    _viewer: Viewer,
}

pub async fn events(
    State(app): State<AppState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AppError> {
    let cap = app.config.limits.max_event_streams;
    let viewer = app.hub.rollouts.enter(cap).ok_or_else(|| {
        AppError::Busy(format!(
            "{cap} event streams are open (limits.max_event_streams); retry later"
        ))
    })?;
    let mut board = app.hub.rollouts.watch();
    // The board as it stands goes out first (once it has been computed at all).
    board.mark_changed();
    let feed = Feed {
        board,
        shutdown: app.shutdown.clone(),
        _viewer: viewer,
    };
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        loop {
            tokio::select! {
                _ = feed.shutdown.cancelled() => return None,
                changed = feed.board.changed() => changed.ok()?,
            }
            let text = feed.board.borrow_and_update().clone();
            if !text.is_empty() {
                let event = Event::default().event("rollouts").data(&*text);
                return Some((Ok(event), feed));
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
