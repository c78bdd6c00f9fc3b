//! Webhook bodies and headers: signature checks and payload parsing on arbitrary bytes.
#![no_main]

use flotilla_hub::sources::webhook::{normalize_url, payload_urls, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(0);
    let (header, body) = data.split_at(split);
    let mut headers = axum_headers(header);
    let _ = verify(&headers, body, b"secret");
    headers.clear();
    if let Ok(payload) = serde_json::from_slice::<serde_json::Value>(body) {
        for url in payload_urls(&payload) {
            let _ = normalize_url(&url);
        }
    }
});

fn axum_headers(raw: &[u8]) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    let value = String::from_utf8_lossy(raw);
    for name in ["x-hub-signature-256", "x-gitea-signature", "x-gitlab-token"] {
        if let Ok(v) = value.parse() {
            headers.insert(name, v);
        }
    }
    headers
}
