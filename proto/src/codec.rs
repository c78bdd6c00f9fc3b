//! The protobuf codec of every `flotilla.v1` service, with small starting buffers.
//!
//! tonic's default starts each stream's encode and decode buffer at 8 KiB. A hub holds one agent
//! stream per cluster, mostly idle, whose messages are a few hundred bytes: at 10,000 clusters the
//! defaults alone are 160 MiB. Buffers still grow to whatever one message needs (a bundle chunk).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where each stream's buffers start: larger than most control messages.
const START: usize = 1024;
/// tonic's own: past this much encoded output a stream yields to flush.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`START`]-byte buffers (named in `build.rs` as the generated services'
/// codec).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(START, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(START, YIELD_THRESHOLD))
    }
}
