//! Errors: `ApiError` is what a request gets back (a Kubernetes `Status`); `Error` is the library's.

use serde_json::{Value, json};

/// A failed API request, rendered as a `meta.k8s.io/v1 Status` with the server's codes and reasons.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(group_resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{group_resource} \"{name}\" not found"),
        );
        e.details = Some(
            json!({"name": name, "kind": kind_of(group_resource), "group": group_of(group_resource)}),
        );
        e
    }

    pub fn not_found_path(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub fn already_exists(group_resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{group_resource} \"{name}\" already exists"),
        );
        e.details = Some(
            json!({"name": name, "kind": kind_of(group_resource), "group": group_of(group_resource)}),
        );
        e
    }

    pub fn conflict(group_resource: &str, name: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {group_resource} \"{name}\": {}",
                message.into()
            ),
        );
        e.details = Some(
            json!({"name": name, "kind": kind_of(group_resource), "group": group_of(group_resource)}),
        );
        e
    }

    /// A server-side apply conflict: `causes` name each conflicting field and its manager.
    pub fn apply_conflict(message: String, causes: Vec<Value>) -> Self {
        let mut e = Self::new(409, "Conflict", message);
        e.details = Some(json!({"causes": causes}));
        e
    }

    pub fn invalid(kind: &str, name: &str, causes: Vec<(String, String)>) -> Self {
        let text: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {}", text.join(", ")),
        );
        e.details = Some(json!({
            "name": name, "kind": kind,
            "causes": causes.iter().map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f})).collect::<Vec<_>>()
        }));
        e
    }

    pub fn invalid_patch(message: impl Into<String>) -> Self {
        Self::new(
            422,
            "Invalid",
            format!(
                "the server rejected our request due to an error in our request: {}",
                message.into()
            ),
        )
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    /// 415 naming what this request accepts (a create is not a patch).
    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {} (got {content_type:?})",
                accepted.join(", ")
            ),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_many_requests() -> Self {
        Self::new(
            429,
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later (injected by kubesim)",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn conflict_namespace_terminating(ns: &str) -> Self {
        Self::new(
            403,
            "Forbidden",
            format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        )
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

fn kind_of(group_resource: &str) -> &str {
    group_resource.split('.').next().unwrap_or(group_resource)
}

fn group_of(group_resource: &str) -> &str {
    group_resource.split_once('.').map_or("", |(_, g)| g)
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

/// Errors of the kubesim library (setting clusters up and serving them).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating TLS material: {0}")]
    Tls(String),
    #[error("kube config: {0}")]
    KubeConfig(String),
    #[error("invalid option: {0}")]
    Invalid(String),
}

/// `Result` with kubesim's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
