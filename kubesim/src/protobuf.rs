//! Kubernetes protobuf request bodies: kubesim stores JSON and does not decode them, but it reads
//! the envelope far enough to say which object was refused and how to send it as JSON instead.
//!
//! Decoding the objects themselves needs the upstream `generated.proto` descriptors of every
//! API group, which this repository does not carry (see docs/kubesim.md, "Protobuf bodies").

use crate::error::ApiError;

/// The four bytes every `application/vnd.kubernetes.protobuf` body starts with.
pub(crate) const MAGIC: &[u8; 4] = b"k8s\x00";

/// `runtime.Unknown`, the envelope after the magic: only its type is read.
#[derive(Clone, PartialEq, prost::Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

/// What the body claims to hold, `apps/v1 Deployment`, when the envelope says.
fn object(body: &[u8]) -> Option<String> {
    let unknown = <Unknown as prost::Message>::decode(body.strip_prefix(MAGIC)?).ok()?;
    let meta = unknown.type_meta?;
    match (meta.api_version?, meta.kind?) {
        (v, k) if !v.is_empty() && !k.is_empty() => Some(format!("{v} {k}")),
        _ => None,
    }
}

/// The 415 a protobuf body gets: what it held, why, and the JSON route that works.
pub(crate) fn refused(body: &[u8], accepted: &[&str]) -> ApiError {
    let what = object(body).map_or_else(
        || "a protobuf body".to_string(),
        |o| format!("the protobuf body of this {o}"),
    );
    ApiError::new(
        415,
        "UnsupportedMediaType",
        format!(
            "kubesim does not decode Kubernetes protobuf bodies and refused {what} \
             (kubectl's `create <kind>` and `autoscale` generators send them); send it as JSON \
             by ending the same command with `--dry-run=client -o yaml | kubectl apply -f -` \
             (accepted media types include: {})",
            accepted.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(api_version: &str, kind: &str) -> Vec<u8> {
        let envelope = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
        };
        let mut out = MAGIC.to_vec();
        out.extend(prost::Message::encode_to_vec(&envelope));
        // `raw` (field 2) follows in a real body; the envelope reader skips what it does not name.
        out.extend([0x12, 0x02, 0x0a, 0x00]);
        out
    }

    #[test]
    fn the_refusal_names_the_object_and_the_json_route() {
        for (body, names) in [
            (body("apps/v1", "Deployment"), "this apps/v1 Deployment"),
            (body("v1", "Namespace"), "this v1 Namespace"),
            (body("", "Namespace"), "refused a protobuf body"),
            (MAGIC.to_vec(), "refused a protobuf body"),
            (b"k8s\x00\xff\xff".to_vec(), "refused a protobuf body"),
        ] {
            let err = refused(&body, &["application/json", "application/yaml"]);
            let status = err.status();
            let message = status["message"].as_str().unwrap();
            assert_eq!(err.code, 415);
            assert!(message.contains(names), "{message}");
            assert!(
                message.contains("--dry-run=client -o yaml | kubectl apply -f -"),
                "{message}"
            );
            assert!(message.contains("application/json, application/yaml"));
        }
    }
}
