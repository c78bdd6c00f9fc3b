//! The hub's one error type, and the one place it becomes a `tonic::Status`.

use tonic::{Code, Status};

/// Everything that can go wrong in the hub library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed; `field` names it.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// The bootstrap token is unknown, expired or used up. Never carries the token itself.
    #[error("bootstrap token rejected: {0}")]
    Token(String),

    /// The caller has no valid client certificate for this RPC.
    #[error("{0}")]
    Unauthenticated(String),

    /// The caller is authenticated but may not do this.
    #[error("{0}")]
    PermissionDenied(String),

    /// A cluster with this name already holds a live registration.
    #[error(
        "cluster {0:?} is already registered; deregister it first or use `flotilla cluster rebuild`"
    )]
    AlreadyRegistered(String),

    /// No such cluster.
    #[error("cluster {0:?} not found")]
    ClusterNotFound(String),

    /// The hub data directory is missing, incomplete or already initialized.
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },

    /// Certificate generation or parsing failed.
    #[error("certificate {context}: {source}")]
    Pki {
        context: &'static str,
        #[source]
        source: rcgen::Error,
    },

    /// The embedded store failed.
    #[error("store: {0}")]
    Store(#[from] sled::Error),

    /// A stored record could not be decoded (a bug or a corrupted database).
    #[error("store record {key}: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },

    /// An app's stored record does not decode (a version skew, a hand edit): that app is held
    /// (nothing of it applied or pruned) until an operator replaces or deletes the record.
    #[error(
        "app record {key:?} (store tree {tree}) cannot be read: {source}. Its objects are left as they are on every cluster. Fix: apply the app's document again (`flotilla app apply -f FILE`) or delete the app (`flotilla app delete {app}`)"
    )]
    Unreadable {
        tree: &'static str,
        key: String,
        /// The app the record belongs to (`key` may name one of its cluster slots).
        app: String,
        #[source]
        source: serde_json::Error,
    },

    /// Filesystem IO on a named path.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A git source cannot be fetched, resolved or read.
    #[error("source: {0}")]
    Source(String),

    /// Rendering an app failed; the message names the file and document.
    #[error("render: {0}")]
    Render(String),

    /// No such app.
    #[error("app {0:?} not found")]
    AppNotFound(String),

    /// The request is valid but the state does not allow it (e.g. resuming a finished rollout).
    #[error("{0}")]
    FailedPrecondition(String),

    /// An invariant the hub relies on did not hold (e.g. no system randomness).
    #[error("internal: {0}")]
    Internal(String),

    /// Serving failed.
    #[error("serve: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// `Result` with the hub's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<sled::transaction::TransactionError<Error>> for Error {
    fn from(err: sled::transaction::TransactionError<Error>) -> Self {
        match err {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => Error::Store(e),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::Token(_) | Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::AlreadyRegistered(_) => Code::AlreadyExists,
            Error::ClusterNotFound(_) | Error::AppNotFound(_) => Code::NotFound,
            Error::Source(_) | Error::Render(_) | Error::FailedPrecondition(_) => {
                Code::FailedPrecondition
            }
            // Names the record and the fix; it carries no secret (app documents hold none).
            Error::Unreadable { .. } => Code::DataLoss,
            Error::DataDir { .. }
            | Error::Pki { .. }
            | Error::Store(_)
            | Error::Corrupt { .. }
            | Error::Io { .. }
            | Error::Internal(_)
            | Error::Transport(_) => {
                // Internal details stay in the hub's log; the caller gets a stable message.
                tracing::error!(error = %err, "internal error while serving a request");
                return Status::internal("internal hub error; see the hub log");
            }
        };
        Status::new(code, err.to_string())
    }
}
