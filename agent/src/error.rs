//! The agent library's error type.

/// Everything that can go wrong in the agent library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent cannot continue without operator action (a new token, a fixed flag); the message
    /// says what to do.
    #[error("{0}")]
    NeedsOperator(String),

    /// The certificate expired (a hub outage longer than its life): the agent keeps enforcing its
    /// apps and waits for a bootstrap token bound to its name; the message says how to give one.
    #[error("{0}")]
    NeedsBootstrap(String),

    /// The hub refused a request; `what` names the request.
    #[error("{what}: {detail}")]
    Rejected {
        what: &'static str,
        code: tonic::Code,
        detail: String,
    },

    /// The hub could not be reached (retryable).
    #[error("hub unreachable: {0}")]
    Unreachable(String),

    /// Key or certificate handling failed.
    #[error("{context}: {reason}")]
    Credentials { context: String, reason: String },

    /// Filesystem IO on a named path.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A bundle is unusable; the message names file and document.
    #[error("{0}")]
    Bundle(String),

    /// The cluster does not serve a kind.
    #[error("no API resource for {api_version} {kind} in {cluster} (is its CRD installed?)")]
    NoResource {
        api_version: String,
        kind: String,
        /// "cluster eu-1", or "the cluster".
        cluster: String,
    },

    /// A Kubernetes API call failed; `context` names the object.
    #[error("{context}: {detail}")]
    Kube { context: String, detail: String },

    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),

    /// The local cache failed.
    #[error("local cache: {0}")]
    Cache(String),

    /// Building the channel failed.
    #[error(transparent)]
    Channel(#[from] flotilla_proto::Error),
}

/// `Result` with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn kube(context: &str, err: kube::Error) -> Self {
        let detail = match &err {
            kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
            other => other.to_string(),
        };
        Error::Kube {
            context: context.to_string(),
            detail,
        }
    }

    /// Classifies a failed RPC: transport failures are retryable, refusals are not.
    pub(crate) fn from_status(what: &'static str, status: &tonic::Status) -> Self {
        let detail = flotilla_proto::describe_status(status);
        match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Internal
            | tonic::Code::ResourceExhausted => Error::Unreachable(format!("{what}: {detail}")),
            code => Error::Rejected { what, code, detail },
        }
    }

    /// Whether retrying later may succeed without operator action.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unreachable(_))
    }
}
