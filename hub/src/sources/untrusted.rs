//! Untrusted text (App documents, fleet files, manifests from git) is parsed and rendered only on
//! tokio's blocking pool and under a time budget, so no commit or request can stall the async
//! threads that serve every RPC and agent stream.

use std::time::Duration;

use crate::{Error, Result};

/// Cuts `text` to at most `max` bytes on a character boundary, marked: what someone else sent is
/// kept only to a bound.
pub(crate) fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push_str(" …(cut)");
    }
}

/// The time budget of parsing one App document or fleet file.
pub const PARSE_BUDGET: Duration = Duration::from_secs(5);
/// The time budget of rendering one cluster variant.
pub const RENDER_BUDGET: Duration = Duration::from_secs(30);

/// Runs `f` on the blocking pool; past `budget` the caller gets an error naming `what` (the
/// thread finishes on its own: every parse is linear in input that is already size-bounded).
pub async fn run<T: Send + 'static>(
    what: &str,
    budget: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(budget, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(Error::Internal(format!(
            "{what}: blocking task failed: {e}"
        ))),
        Err(_) => Err(Error::Render(format!(
            "{what} took longer than {}s",
            budget.as_secs()
        ))),
    }
}
