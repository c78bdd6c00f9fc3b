//! The App document, as ApplyApp and the fleet repository receive it: parse and validate any text.
#![no_main]

use flotilla_hub::apps::AppDocument;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(doc) = AppDocument::parse(text) {
            let _ = doc.strategy();
        }
        let _ = AppDocument::parse_all(text);
    }
});
