//! Customization: variable substitution over arbitrary text, and customizations (selectors,
//! variables, merge patches) from arbitrary JSON applied to objects.
#![no_main]

use std::collections::BTreeMap;

use flotilla_bundle::customize::{self, ClusterFacts, Customization};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let facts = ClusterFacts {
        name: "eu-1".into(),
        labels: BTreeMap::from([("region".to_string(), "eu".to_string())]),
    };
    let (custom_text, body) = text.split_once('\n').unwrap_or((text, text));
    let customizations: Vec<Customization> = serde_json::from_str(custom_text).unwrap_or_default();
    let vars = customize::variables(&facts, &customizations);
    let _ = customize::placeholders(body);
    let _ = customize::substitute("f.yaml", body, &vars);
    let used = customize::placeholders(body);
    let _ = customize::variant_key(&used, &facts, &customizations);
    if let Ok(mut objects) = serde_json::from_str::<Vec<serde_json::Value>>(body) {
        let _ = customize::apply_patches(&mut objects, &facts, &customizations);
    }
});
