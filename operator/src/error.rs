//! The operator's one error type; [`Error::reason`] labels metrics and Warning events.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stored object does not match the types (e.g. written before the CRD schema existed).
    #[error("the object cannot be read as a WidgetPipeline: {0}")]
    InvalidObject(String),
    /// The spec passed the schema but the runtime would refuse it.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serialize {what}: {message}")]
    Serialize { what: &'static str, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short CamelCase reason for events, conditions and the failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidObject(_) => "InvalidObject",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "Forbidden",
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(kube::Error::SerdeError(_)) => "DecodeFailed",
            Error::Kube(_) => "ApiUnreachable",
            Error::Serialize { .. } => "SerializeFailed",
        }
    }

    /// Errors that only a change of the object can fix: wait for that change, do not retry.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::InvalidObject(_) | Error::InvalidSpec(_))
    }
}
