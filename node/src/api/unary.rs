//! gRPC unary calls answered without tonic's generic server path: the
//! request's one message is read and decoded here, the handler's answer
//! encoded here, and the response body is one data frame and the
//! `grpc-status` trailer.
//!
//! tonic's path (`tonic::server::Grpc::unary`) decodes through a stream
//! adapter built for any number of messages, converts the request's headers
//! and the answer's metadata back and forth, and wraps the answer's body in
//! an encoder stream behind two more boxed layers, each polled for every
//! frame. Answering here saved about 4 % of the instructions a follower
//! spends serving a put (docs/benchmarks.md). The Kv service's unary
//! methods come here ([`super::dispatch`]).
//!
//! What a caller sees is what tonic answered, except for malformed
//! requests, which get INVALID_ARGUMENT naming what is wrong:
//! - the response: headers `:status 200` and `content-type:
//!   application/grpc`, one length-prefixed message, trailer `grpc-status:
//!   0`; an error is a trailers-only response (`Status::into_http`);
//! - a request message is at most [`MAX_REQUEST_MESSAGE_BYTES`] (tonic's
//!   default), uncompressed (no compression is offered, as before), and
//!   exactly one per call.
//!
//! The same framing serves the layers that read a call's one message
//! themselves (the access layer's key check, site forwarding):
//! [`read_body`], [`message_of`] and [`answer_raw`].
//!
//! Invariant: the handler runs only for a request that decoded whole; it
//! gets the message and nothing else (no Kv method reads request
//! metadata; the layers above have read what they need).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tonic::Status;
use tonic::codegen::http;

use super::ApiError;

/// Most bytes of one request message: tonic's default receive limit, which
/// applied here before.
pub const MAX_REQUEST_MESSAGE_BYTES: usize = 4 << 20;

/// A message's prefix on the wire: a compression flag and a 4-byte length.
const PREFIX_BYTES: usize = 5;

/// Most bytes of a call's body read whole: one message of at most
/// [`MAX_REQUEST_MESSAGE_BYTES`] and its prefix.
pub const MAX_BODY_BYTES: usize = PREFIX_BYTES + MAX_REQUEST_MESSAGE_BYTES;

/// The header naming a request's compression.
const ENCODING_HEADER: &str = "grpc-encoding";

/// Answers one unary call: decodes its message, runs `handler` on it and
/// encodes what it answers.
pub async fn serve<Req, Resp, Fut>(
    request: http::Request<tonic::body::Body>,
    handler: impl FnOnce(Req) -> Fut,
) -> http::Response<tonic::body::Body>
where
    Req: prost::Message + Default,
    Resp: prost::Message,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let answer = match decode::<Req>(request).await {
        Ok(message) => handler(message).await,
        Err(e) => Err(Status::from(e)),
    };
    match answer.and_then(|message| frame(message.encoded_len(), |buf| message.encode_raw(buf))) {
        Ok(frame) => respond(frame),
        Err(status) => status.into_http(),
    }
}

/// A successful answer carrying `message`, already encoded.
pub(super) fn answer_raw(message: &[u8]) -> http::Response<tonic::body::Body> {
    match prefixed(message) {
        Ok(frame) => respond(frame),
        Err(status) => status.into_http(),
    }
}

/// The answer whose one message is `frame` (prefix included).
fn respond(frame: Bytes) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::new(UnaryBody::new(frame)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The request's one message.
async fn decode<M: prost::Message + Default>(request: http::Request<tonic::body::Body>) -> Result<M, ApiError> {
    if let Some(encoding) = request.headers().get(ENCODING_HEADER)
        && encoding.as_bytes() != b"identity"
    {
        return Err(ApiError::invalid(
            ENCODING_HEADER,
            format!("is {encoding:?}; this server takes uncompressed messages only"),
        ));
    }
    let body = read_body(request.into_body()).await?;
    let message = body.slice_ref(message_of(&body)?);
    M::decode(message).map_err(|e| ApiError::invalid("request", format!("is not a valid message: {e}")))
}

/// The whole body of a call with one message, at most [`MAX_BODY_BYTES`].
pub(super) async fn read_body(body: tonic::body::Body) -> Result<Bytes, ApiError> {
    Ok(Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                ApiError::invalid("request", format!("is larger than {MAX_REQUEST_MESSAGE_BYTES} bytes"))
            } else {
                ApiError::invalid("request", format!("could not be read: {e}"))
            }
        })?
        .to_bytes())
}

/// The message in a unary call's body: one prefix and the bytes it counts.
pub(super) fn message_of(body: &[u8]) -> Result<&[u8], ApiError> {
    let Some((prefix, message)) = body.split_at_checked(PREFIX_BYTES) else {
        return Err(ApiError::invalid(
            "request",
            format!("holds {} bytes, less than one message's prefix", body.len()),
        ));
    };
    if prefix[0] != 0 {
        return Err(ApiError::invalid(
            "request",
            "is marked compressed; this server takes uncompressed messages only",
        ));
    }
    let declared = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if message.len() != declared {
        return Err(ApiError::invalid(
            "request",
            format!(
                "declares a message of {declared} bytes but carries {}; a unary call carries exactly one message",
                message.len()
            ),
        ));
    }
    Ok(message)
}

/// A message of `len` bytes, which `write` appends, after its prefix, as
/// one buffer.
fn frame(len: usize, write: impl FnOnce(&mut BytesMut)) -> Result<Bytes, Status> {
    let declared = u32::try_from(len).map_err(|_| {
        Status::from(ApiError::Internal(format!(
            "an answer of {len} bytes is too large to send"
        )))
    })?;
    let mut buf = BytesMut::with_capacity(PREFIX_BYTES + len);
    buf.put_u8(0);
    buf.put_u32(declared);
    write(&mut buf);
    Ok(buf.freeze())
}

/// `message`, already encoded, after its prefix, as one buffer.
pub(super) fn prefixed(message: &[u8]) -> Result<Bytes, Status> {
    frame(message.len(), |buf| buf.put_slice(message))
}

/// A successful unary answer's body: the message, then `grpc-status: 0`.
struct UnaryBody {
    message: Option<Bytes>,
    trailers_sent: bool,
}

impl UnaryBody {
    fn new(message: Bytes) -> Self {
        Self {
            message: Some(message),
            trailers_sent: false,
        }
    }
}

impl http_body::Body for UnaryBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if self.trailers_sent {
            return Poll::Ready(None);
        }
        self.trailers_sent = true;
        let mut trailers = http::HeaderMap::with_capacity(1);
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers_sent
    }
}

#[cfg(test)]
mod tests {
    use cell0_proto::v1;
    use prost::Message;

    use super::*;

    fn framed(message: &[u8]) -> Bytes {
        prefixed(message).expect("a small message")
    }

    fn call(body: Bytes) -> http::Request<tonic::body::Body> {
        http::Request::new(tonic::body::Body::new(http_body_util::Full::new(body)))
    }

    async fn frames(response: http::Response<tonic::body::Body>) -> (Vec<Bytes>, Option<http::HeaderMap>) {
        let mut body = response.into_body();
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame.expect("frame").into_data() {
                Ok(d) => data.push(d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        (data, trailers)
    }

    fn echo_key(r: v1::GetRequest) -> std::future::Ready<Result<v1::GetResponse, Status>> {
        std::future::ready(Ok(v1::GetResponse {
            header: None,
            kv: Some(v1::KeyValue {
                key: r.key,
                ..Default::default()
            }),
        }))
    }

    #[tokio::test]
    async fn a_call_is_answered_with_one_message_and_status_zero() {
        let request = v1::GetRequest {
            key: Bytes::from_static(b"k"),
            consistency: 0,
        };
        let response = serve(call(framed(&request.encode_to_vec())), echo_key).await;
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let (data, trailers) = frames(response).await;
        assert_eq!(data.len(), 1);
        let message = message_of(&data[0]).expect("one message");
        let answer = v1::GetResponse::decode(message).expect("decodes");
        assert_eq!(answer.kv.expect("kv").key, Bytes::from_static(b"k"));
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    }

    #[tokio::test]
    async fn an_error_is_a_trailers_only_response() {
        let request = framed(&v1::GetRequest::default().encode_to_vec());
        let response = serve(call(request), |_: v1::GetRequest| {
            std::future::ready(Err::<v1::GetResponse, _>(Status::from(ApiError::invalid(
                "key", "is empty",
            ))))
        })
        .await;
        let status = Status::from_header_map(response.headers()).expect("status in the headers");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("key"), "{}", status.message());
    }

    #[tokio::test]
    async fn malformed_requests_are_refused_before_the_handler() {
        let ok = v1::GetRequest::default().encode_to_vec();
        let mut two = framed(&ok).to_vec();
        two.extend_from_slice(&framed(&ok));
        let mut compressed = framed(&ok).to_vec();
        compressed[0] = 1;
        let mut short = framed(b"\x0a\x05ab").to_vec();
        short.truncate(6);
        for (body, says) in [
            (Bytes::new(), "less than one message's prefix"),
            (Bytes::from(two), "exactly one message"),
            (Bytes::from(compressed), "compressed"),
            (Bytes::from(short), "exactly one message"),
            (framed(b"\x0a\x05ab"), "not a valid message"),
        ] {
            let response = serve(call(body), |_: v1::GetRequest| async {
                panic!("the handler must not run");
                #[allow(unreachable_code)]
                Ok(v1::GetResponse::default())
            })
            .await;
            let status = Status::from_header_map(response.headers()).expect("status");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{says}");
            assert!(status.message().contains(says), "{}: {}", says, status.message());
        }
    }

    #[tokio::test]
    async fn a_compressed_call_and_an_oversized_one_are_refused() {
        let mut request = call(framed(&v1::GetRequest::default().encode_to_vec()));
        request
            .headers_mut()
            .insert(ENCODING_HEADER, http::HeaderValue::from_static("gzip"));
        let response = serve(request, echo_key).await;
        let status = Status::from_header_map(response.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(ENCODING_HEADER), "{}", status.message());

        let huge = vec![0u8; MAX_REQUEST_MESSAGE_BYTES + 1];
        let response = serve(call(framed(&huge)), echo_key).await;
        let status = Status::from_header_map(response.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("larger than"), "{}", status.message());
    }
}
