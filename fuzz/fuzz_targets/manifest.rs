//! Manifest parsing with its limits: any text either parses into checked objects or is an error
//! naming the file; never a panic, never unbounded work.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = flotilla_bundle::nesting::check(text, 128);
        if let Ok(manifests) = flotilla_bundle::manifest::parse_documents("f.yaml", text) {
            let objects: Vec<_> = manifests.into_iter().map(|m| m.object).collect();
            let _ = flotilla_bundle::canonical_bytes(&flotilla_bundle::normalize(objects));
        }
    }
});
