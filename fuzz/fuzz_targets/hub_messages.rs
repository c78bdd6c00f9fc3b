//! What an agent decodes from the hub: stream messages (protobuf) and bundle bytes.
#![no_main]

use flotilla_proto::v1::{BundleChunk, HubMessage};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let _ = HubMessage::decode(data);
    let _ = BundleChunk::decode(data);
    let _ = flotilla_agent::fleet::decode_bundle("sha256:x", data);
});
