//! Access control of the public port, in one tower layer in front of every
//! service: it gives each call its trace id, authenticates the ACL token,
//! applies the per-token rate limit, authorizes the call against the
//! token's policies, and writes the audit line. No handler checks anything
//! itself.
//!
//! Invariants:
//! - Every path the server routes has a [`Guard`] ([`guard`]); a test
//!   enumerates the service descriptors so a new method without one fails.
//!   Health checks and `Acl/Bootstrap` are open; everything else needs a
//!   token when ACLs are on (reflection: any valid token).
//! - A key-value call is judged on the key or prefix in its request: the
//!   layer decodes the one request message (the body is at most
//!   [`unary::MAX_BODY_BYTES`]) and hands the same bytes on. A request it
//!   cannot decode is judged as touching every key.
//! - A token unknown to this replica is looked up again after a
//!   linearizable read barrier, so a token made through another node works
//!   at once; a deleted token stops working as soon as this replica applies
//!   the delete. Resolved tokens are cached until the ACL table changes.
//! - Audit lines name the token by accessor, never its secret, and keys but
//!   never values.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use cell0_consensus::{Consensus, Consistency};
use cell0_proto::v1;
use cell0_state::acl::{self, Access, AccessorId, Authorizer, BearerToken, Resource, Scope, SecretHash};
use http_body_util::BodyExt;
use prost::Message;
use tonic::Status;
use tonic::codegen::http;

use super::ratelimit::{RateLimits, client_of};
use super::{ApiError, unary};
use crate::audit::{AuditLog, AuditRecord};

/// Most resolved tokens cached per node.
const MAX_CACHED_TOKENS: usize = 4096;

/// Response header carrying the call's trace id (also in logs and the audit
/// line).
///
/// Its value is marked sensitive, which HTTP/2 encodes as a literal never
/// indexed. Indexed, every response's new id went into both ends' HPACK
/// tables, evicting older entries, and the encoder compared each new id
/// with every id the table still held: about 2 % of a follower's CPU under
/// load (docs/benchmarks.md, "What a follower's CPU goes to").
pub const TRACE_ID_HEADER: &str = "cell0-trace-id";
/// [`TRACE_ID_HEADER`] as a header name, checked once at build time rather
/// than parsed on every response.
const TRACE_ID_NAME: http::HeaderName = http::HeaderName::from_static(TRACE_ID_HEADER);

/// The only upload method: its request is a stream, never read here.
const STREAMED_REQUEST: &str = "/cell0.v1.Models/Upload";

/// The bootstrap method: open, and audited.
const BOOTSTRAP: &str = "/cell0.v1.Acl/Bootstrap";

tokio::task_local! {
    /// The trace id of the call being handled (set by the layer).
    pub static TRACE_ID: TraceId;
}

/// The trace id of the call this task handles; a fresh one outside a call
/// (tests).
pub fn current_trace_id() -> TraceId {
    TRACE_ID.try_with(|id| *id).unwrap_or_default()
}

/// A call's trace id: random, shown as 16 hex digits (the
/// [`TRACE_ID_HEADER`] value, logs and the audit line). A number until it
/// is shown: every call has one, and as a string it cost three allocations
/// on each call's path (made, handed to the handler, copied for its span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(u64);

impl TraceId {
    /// A new random trace id.
    pub fn new() -> Self {
        Self(rand::random())
    }

    /// The 16 lowercase hex digits: the header's value, and what `Display`
    /// writes.
    fn hex(self) -> [u8; 16] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = DIGITS[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

impl Default for TraceId {
    /// A new random trace id, as [`TraceId::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The header's digits: one encoding for every place the id shows.
        f.write_str(std::str::from_utf8(&self.hex()).map_err(|_| std::fmt::Error)?)
    }
}

/// What a method needs from the caller's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Nothing: health checks, and ACL bootstrap (which works once).
    Open,
    /// Any valid token: reflection, `Acl/WhoAmI`.
    AnyToken,
    /// `access` to a whole resource.
    Resource(Resource, Access),
    /// `access` to the key or prefix the request names.
    Kv(Access),
}

impl Guard {
    /// Whether a call changes state (and is audited).
    fn mutates(self, path: &str) -> bool {
        path == BOOTSTRAP || matches!(self, Guard::Resource(_, Access::Write) | Guard::Kv(Access::Write))
    }
}

/// The guard of every routed path; `None` for paths no service serves
/// (the server answers those UNIMPLEMENTED).
pub fn guard(path: &str) -> Option<Guard> {
    use Access::{Read, Write};
    use Resource::*;
    if path.starts_with("/grpc.health.v1.Health/") {
        return Some(Guard::Open);
    }
    if path.starts_with("/grpc.reflection.") {
        return Some(Guard::AnyToken);
    }
    let (service, method) = path.strip_prefix("/cell0.v1.")?.split_once('/')?;
    let on = |resource, access| Some(Guard::Resource(resource, access));
    match (service, method) {
        ("Kv", "Put" | "Delete" | "Cas") => Some(Guard::Kv(Write)),
        ("Kv", "Get" | "Range" | "Watch") => Some(Guard::Kv(Read)),
        ("Cluster", "Status" | "Members") => on(Nodes, Read),
        ("Cluster", "Join" | "Remove" | "SaveSnapshot") => on(Operator, Write),
        ("Agents", "Run" | "Stop" | "Migrate") => on(Agents, Write),
        ("Agents", "Get" | "List" | "Watch") => on(Agents, Read),
        ("Nodes", "List") => on(Nodes, Read),
        ("Sites", "List") => on(Nodes, Read),
        ("Nodes", "Drain" | "SetEligibility") => on(Nodes, Write),
        ("Tasks", "Submit") => on(Tasks, Write),
        ("Tasks", "Get" | "Wait" | "List" | "ListMemory") => on(Tasks, Read),
        ("Inference", "Embed" | "Info") => on(Models, Read),
        ("Models", "Upload" | "Add" | "Remove") => on(Models, Write),
        ("Models", "List") => on(Models, Read),
        ("Acl", "Bootstrap") => Some(Guard::Open),
        ("Acl", "WhoAmI") => Some(Guard::AnyToken),
        ("Acl", "SetPolicy" | "DeletePolicy" | "CreateToken" | "DeleteToken") => on(Acl, Write),
        ("Acl", "ListPolicies" | "ListTokens") => on(Acl, Read),
        _ => None,
    }
}

/// What a request names, for authorization (keys) and the audit line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// One key.
    Key(Vec<u8>),
    /// Every key under a prefix.
    Prefix(Vec<u8>),
    /// Anything else, in words (`agent worker-1`).
    Named(String),
}

impl Target {
    fn scope(&self) -> Scope<'_> {
        match self {
            Target::Key(k) => Scope::Key(k),
            Target::Prefix(p) => Scope::Prefix(p),
            Target::Named(_) => Scope::Whole,
        }
    }

    /// As the audit line and messages show it: keys as (lossy) UTF-8, at
    /// most 256 characters.
    fn describe(&self) -> String {
        let text = |b: &[u8]| String::from_utf8_lossy(b).chars().take(256).collect::<String>();
        match self {
            Target::Key(k) => format!("key {:?}", text(k)),
            Target::Prefix(p) => format!("prefix {:?}", text(p)),
            Target::Named(n) => n.chars().take(256).collect(),
        }
    }
}

/// What the request message of `path` names.
fn target(path: &str, message: &[u8]) -> Option<Target> {
    fn decode<M: Message + Default>(message: &[u8]) -> Option<M> {
        M::decode(message).ok()
    }
    let key = |k: Bytes| Some(Target::Key(k.to_vec()));
    let prefix = |p: Bytes| Some(Target::Prefix(p.to_vec()));
    let named = |s: String| Some(Target::Named(s));
    match path {
        "/cell0.v1.Kv/Put" => key(decode::<v1::PutRequest>(message)?.key),
        "/cell0.v1.Kv/Get" => key(decode::<v1::GetRequest>(message)?.key),
        "/cell0.v1.Kv/Delete" => key(decode::<v1::DeleteRequest>(message)?.key),
        "/cell0.v1.Kv/Cas" => key(decode::<v1::CasRequest>(message)?.key),
        "/cell0.v1.Kv/Range" => prefix(decode::<v1::RangeRequest>(message)?.prefix),
        "/cell0.v1.Kv/Watch" => prefix(decode::<v1::WatchRequest>(message)?.prefix),
        "/cell0.v1.Agents/Run" => named(format!("agent {}", decode::<v1::RunAgentRequest>(message)?.spec?.name)),
        "/cell0.v1.Agents/Stop" => named(format!("agent {}", decode::<v1::StopAgentRequest>(message)?.name)),
        "/cell0.v1.Agents/Migrate" => {
            let r = decode::<v1::MigrateAgentRequest>(message)?;
            named(format!("agent {} to node {:016x}", r.name, r.to_node))
        }
        "/cell0.v1.Nodes/Drain" => named(format!("node {:016x}", decode::<v1::DrainNodeRequest>(message)?.node)),
        "/cell0.v1.Nodes/SetEligibility" => named(format!(
            "node {:016x}",
            decode::<v1::SetEligibilityRequest>(message)?.node
        )),
        "/cell0.v1.Tasks/Submit" => named(format!("agent {}", decode::<v1::SubmitTaskRequest>(message)?.agent)),
        "/cell0.v1.Cluster/Join" => named(format!("node {:016x}", decode::<v1::JoinRequest>(message)?.node_id)),
        "/cell0.v1.Cluster/Remove" => named(format!("node {:016x}", decode::<v1::RemoveRequest>(message)?.node_id)),
        "/cell0.v1.Models/Add" => {
            let m = decode::<v1::AddModelRequest>(message)?.manifest?;
            named(format!("model {} version {}", m.name, m.version))
        }
        "/cell0.v1.Models/Remove" => {
            let r = decode::<v1::RemoveModelRequest>(message)?;
            named(format!("model {} version {}", r.name, r.version))
        }
        "/cell0.v1.Acl/SetPolicy" => named(format!(
            "policy {}",
            decode::<v1::SetPolicyRequest>(message)?.policy?.name
        )),
        "/cell0.v1.Acl/DeletePolicy" => named(format!("policy {}", decode::<v1::DeletePolicyRequest>(message)?.name)),
        "/cell0.v1.Acl/DeleteToken" => named(format!("token {}", decode::<v1::DeleteTokenRequest>(message)?.accessor)),
        _ => None,
    }
}

/// The caller, once its token is verified: handlers find it in the
/// request's extensions (`Acl/WhoAmI`).
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's accessor.
    pub accessor: AccessorId,
    /// What it may do.
    pub authorizer: Arc<Authorizer>,
}

#[derive(Debug)]
struct Cached {
    generation: u64,
    secret: SecretHash,
    authorizer: Arc<Authorizer>,
}

/// Resolves tokens against the local replica, with a cache that the ACL
/// table's changes invalidate.
struct Tokens {
    consensus: Consensus,
    acl_changes: cell0_consensus::state::TableWatch,
    cache: Mutex<HashMap<AccessorId, Cached>>,
}

impl Tokens {
    async fn resolve(&self, bearer: &BearerToken) -> Result<Principal, ApiError> {
        // The generation first: a row read after it is at least as new.
        let generation = *self.acl_changes.borrow();
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(&bearer.accessor)
                .filter(|c| c.generation == generation)
                .map(|c| (c.secret.clone(), c.authorizer.clone()))
        };
        let (secret, authorizer) = match cached {
            Some(hit) => hit,
            None => {
                let accessor = bearer.accessor;
                let read = || {
                    self.consensus
                        .read(Consistency::Serializable, move |txn| acl::resolve(txn, &accessor))
                };
                let found = match read().await? {
                    Some(found) => Some(found),
                    None => {
                        // Made through another node a moment ago?
                        self.consensus.read_barrier(Consistency::Linearizable).await?;
                        read().await?
                    }
                };
                let (token, authorizer) = found.ok_or(ApiError::TokenUnknown)?;
                let authorizer = Arc::new(authorizer);
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_CACHED_TOKENS {
                    cache.clear();
                }
                cache.insert(
                    accessor,
                    Cached {
                        generation,
                        secret: token.secret.clone(),
                        authorizer: authorizer.clone(),
                    },
                );
                (token.secret, authorizer)
            }
        };
        if !secret.matches(&bearer.secret) {
            return Err(ApiError::TokenUnknown);
        }
        Ok(Principal {
            accessor: bearer.accessor,
            authorizer,
        })
    }

    async fn bootstrapped(&self) -> Result<bool, ApiError> {
        Ok(self
            .consensus
            .read(Consistency::Serializable, acl::bootstrapped)
            .await?)
    }
}

/// The state of one node's layer.
struct AuthState {
    /// `None` when ACLs are off.
    tokens: Option<Tokens>,
    token_limits: Option<RateLimits<AccessorId>>,
    audit: Option<AuditLog>,
}

impl AuthState {
    /// Decides whether the call may go on, and as whom.
    async fn authorize(
        &self,
        path: &str,
        guard: Guard,
        headers: &http::HeaderMap,
        target: Option<&Target>,
    ) -> Result<Option<Principal>, ApiError> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        if guard == Guard::Open {
            return Ok(None);
        }
        let bearer = match bearer_of(headers) {
            Ok(b) => b,
            Err(BearerProblem::Missing) if !tokens.bootstrapped().await? => {
                return Err(ApiError::TokenRequired(
                    "ACLs are on and not bootstrapped yet: run `cell0 acl bootstrap` to make the first \
                     management token, then send it (CELL0_TOKEN, or `authorization: Bearer ...`)"
                        .into(),
                ));
            }
            Err(problem) => return Err(ApiError::TokenRequired(problem.describe().into())),
        };
        let principal = tokens.resolve(&bearer).await?;
        // Management tokens are not limited: an operator's way in stays open.
        if let Some(limits) = &self.token_limits
            && !principal.authorizer.is_management()
            && let Err(retry_after) = limits.take(principal.accessor, Instant::now())
        {
            metrics::counter!("cell0_rate_limited_total", "per" => "token").increment(1);
            return Err(ApiError::RateLimited {
                rate: limits.rate(),
                per: "token",
                retry_after,
            });
        }
        let (resource, access, scope) = match guard {
            Guard::Open | Guard::AnyToken => return Ok(Some(principal)),
            Guard::Resource(resource, access) => (resource, access, Scope::Whole),
            // A request that could not be decoded touches every key.
            Guard::Kv(access) => (Resource::Kv, access, target.map_or(Scope::Whole, Target::scope)),
        };
        if principal.authorizer.allows(resource, access, scope) {
            return Ok(Some(principal));
        }
        Err(ApiError::PermissionDenied {
            method: path.to_string(),
            resource: resource.as_str(),
            access: access.as_str(),
            on: match scope {
                Scope::Whole => String::new(),
                _ => target.map(|t| format!(" on {}", t.describe())).unwrap_or_default(),
            },
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
enum BearerProblem {
    Missing,
    NotBearer,
    Malformed,
}

impl BearerProblem {
    fn describe(&self) -> &'static str {
        match self {
            BearerProblem::Missing => {
                "ACLs are on: this call needs a token (`authorization: Bearer <secret>`; the CLI sends CELL0_TOKEN \
                 or --token)"
            }
            BearerProblem::NotBearer => "the authorization header must be `Bearer <secret>`",
            BearerProblem::Malformed => "the bearer token is malformed (expected c0.<32 hex>.<64 hex>)",
        }
    }
}

fn bearer_of(headers: &http::HeaderMap) -> Result<BearerToken, BearerProblem> {
    let value = headers.get(http::header::AUTHORIZATION).ok_or(BearerProblem::Missing)?;
    let text = value.to_str().map_err(|_| BearerProblem::NotBearer)?;
    let (scheme, token) = text.split_once(' ').ok_or(BearerProblem::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(BearerProblem::NotBearer);
    }
    BearerToken::parse(token.trim()).ok_or(BearerProblem::Malformed)
}

/// The tower layer of the public server.
#[derive(Clone)]
pub struct AuthLayer {
    state: Arc<AuthState>,
}

impl AuthLayer {
    /// A layer that enforces ACLs when `acl` is on (limiting each token to
    /// `token_rate` per second in bursts of `token_burst`, 0: no limit) and
    /// audits to `audit` when given.
    pub fn new(consensus: &Consensus, acl: bool, token_rate: u32, token_burst: u32, audit: Option<AuditLog>) -> Self {
        let tokens = acl.then(|| Tokens {
            consensus: consensus.clone(),
            acl_changes: consensus.watch_table(cell0_consensus::Table::Acl),
            cache: Mutex::new(HashMap::new()),
        });
        Self {
            state: Arc::new(AuthState {
                tokens,
                token_limits: (acl && token_rate > 0).then(|| RateLimits::new(token_rate, token_burst)),
                audit,
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authed {
            inner,
            state: self.state.clone(),
        }
    }
}

/// A service behind [`AuthLayer`].
#[derive(Clone)]
pub struct Authed<S> {
    inner: S,
    state: Arc<AuthState>,
}

/// The gRPC status code of a response: its `grpc-status` header for an
/// answer without a body (errors), OK otherwise (a stream that fails later
/// still counts as started).
fn code_of<R>(response: &http::Response<R>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, R> tower::Service<http::Request<tonic::body::Body>> for Authed<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // The ready service goes with this call; the clone waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(handle(state, inner, req))
    }
}

async fn handle<S, R>(
    state: Arc<AuthState>,
    mut inner: S,
    req: http::Request<tonic::body::Body>,
) -> Result<http::Response<R>, S::Error>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>>,
    R: Default,
{
    let trace_id = TraceId::new();
    // The path shares the request's buffer: cloning the URI copies none.
    let uri = req.uri().clone();
    let path = uri.path();
    let Some(guard) = guard(path) else {
        return TRACE_ID.scope(trace_id, inner.call(req)).await;
    };
    let audited = state.audit.is_some() && guard.mutates(path);
    let needs_target =
        path != STREAMED_REQUEST && (audited || (state.tokens.is_some() && matches!(guard, Guard::Kv(_))));
    let client = client_of(&req);
    let (mut req, target) = if needs_target {
        match buffered(req).await {
            Ok((req, bytes)) => {
                let target = unary::message_of(&bytes).ok().and_then(|m| target(path, m));
                (req, target)
            }
            Err(e) => {
                return Ok(finish(
                    &state,
                    path,
                    client,
                    None,
                    None,
                    trace_id,
                    Status::from(e).into_http(),
                    true,
                )
                .await);
            }
        }
    } else {
        (req, None)
    };
    match state.authorize(path, guard, req.headers(), target.as_ref()).await {
        Err(e) => {
            let response = Status::from(e).into_http();
            Ok(finish(&state, path, client, None, target.as_ref(), trace_id, response, true).await)
        }
        Ok(principal) => {
            let accessor = principal.as_ref().map(|p| p.accessor);
            if let Some(p) = principal {
                req.extensions_mut().insert(p);
            }
            let response = TRACE_ID.scope(trace_id, inner.call(req)).await?;
            Ok(finish(
                &state,
                path,
                client,
                accessor,
                target.as_ref(),
                trace_id,
                response,
                audited,
            )
            .await)
        }
    }
}

/// Adds the trace id to `response` and writes the audit line when `audit`.
#[allow(clippy::too_many_arguments)]
async fn finish<R>(
    state: &AuthState,
    path: &str,
    client: Option<IpAddr>,
    accessor: Option<AccessorId>,
    target: Option<&Target>,
    trace_id: TraceId,
    mut response: http::Response<R>,
    audit: bool,
) -> http::Response<R> {
    if let Ok(mut v) = http::HeaderValue::from_bytes(&trace_id.hex()) {
        // A value that never repeats: HPACK sends it as a literal that
        // neither end adds to its header table (see [`TRACE_ID_HEADER`]).
        v.set_sensitive(true);
        response.headers_mut().insert(TRACE_ID_NAME, v);
    }
    if audit && let Some(log) = &state.audit {
        log.record(AuditRecord {
            principal: accessor.map_or_else(|| "anonymous".to_string(), |a| format!("token:{a}")),
            client,
            method: path.to_string(),
            target: target.map(Target::describe),
            result: code_of(&response),
            trace_id: trace_id.to_string(),
        })
        .await;
    }
    response
}

/// Reads the whole body of a request with a single message, and rebuilds
/// the request with the same bytes.
async fn buffered(
    req: http::Request<tonic::body::Body>,
) -> Result<(http::Request<tonic::body::Body>, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = unary::read_body(body).await?;
    let body = tonic::body::Body::new(http_body_util::Full::new(bytes.clone()).map_err(|e| match e {}));
    Ok((http::Request::from_parts(parts, body), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_every_public_service_has_a_guard() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(cell0_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for file in set.file.iter().filter(|f| f.package() == "cell0.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/cell0.v1.{}/{}", service.name(), method.name());
                    assert!(guard(&path).is_some(), "{path} has no guard");
                    seen += 1;
                }
            }
        }
        assert!(seen > 30, "only {seen} methods found");
        assert_eq!(guard("/grpc.health.v1.Health/Check"), Some(Guard::Open));
        assert_eq!(guard("/cell0.v1.Kv/Nope"), None);
        assert_eq!(guard("/cell0.internal.v1.Raft/Append"), None);
    }

    #[tokio::test]
    async fn each_response_carries_its_own_trace_id_never_indexed_by_hpack() {
        use tower::{Service, ServiceExt};
        let mut authed = Authed {
            inner: tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(()))
            }),
            state: Arc::new(AuthState {
                tokens: None,
                token_limits: None,
                audit: None,
            }),
        };
        let mut ids = Vec::new();
        for _ in 0..2 {
            let req = http::Request::builder()
                .uri("/cell0.v1.Kv/Get")
                .body(tonic::body::Body::empty())
                .unwrap();
            let response = authed.ready().await.unwrap().call(req).await.unwrap();
            let id = response.headers().get(TRACE_ID_HEADER).expect("a trace id header");
            assert!(
                id.is_sensitive(),
                "HTTP/2 must send the trace id as a literal never indexed"
            );
            assert_eq!(id.len(), 16);
            ids.push(id.clone());
        }
        assert_ne!(ids[0], ids[1], "every call gets its own trace id");
    }

    #[test]
    fn a_trace_id_shows_as_sixteen_hex_digits_in_the_header_and_in_logs() {
        for n in [0, 0xab, 0x0123_4567_89ab_cdef, u64::MAX] {
            let id = TraceId(n);
            let shown = id.to_string();
            assert_eq!(shown.len(), 16);
            assert_eq!(u64::from_str_radix(&shown, 16).unwrap(), n);
            assert_eq!(&id.hex(), shown.as_bytes(), "header and logs agree for {n:#x}");
        }
        assert_ne!(TraceId::new(), TraceId::new());
    }

    #[test]
    fn bearer_headers_are_parsed_strictly() {
        let token = BearerToken {
            accessor: AccessorId([1; 16]),
            secret: [2; 32],
        };
        let headers = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(bearer_of(&http::HeaderMap::new()), Err(BearerProblem::Missing));
        assert_eq!(
            bearer_of(&headers(&format!("Bearer {}", token.expose()))),
            Ok(token.clone())
        );
        assert_eq!(
            bearer_of(&headers(&format!("bearer {}", token.expose()))),
            Ok(token.clone())
        );
        assert_eq!(
            bearer_of(&headers(&format!("Basic {}", token.expose()))),
            Err(BearerProblem::NotBearer)
        );
        assert_eq!(bearer_of(&headers("Bearer c0.12.34")), Err(BearerProblem::Malformed));
    }

    #[test]
    fn key_value_requests_name_their_key_or_prefix() {
        let frame = |m: Vec<u8>| unary::prefixed(&m).expect("a small message");
        let put = frame(
            v1::PutRequest {
                key: "app/x".into(),
                value: "secret value".into(),
                prev_kv: false,
            }
            .encode_to_vec(),
        );
        let m = unary::message_of(&put).unwrap();
        assert_eq!(target("/cell0.v1.Kv/Put", m), Some(Target::Key(b"app/x".to_vec())));
        let range = frame(
            v1::RangeRequest {
                prefix: "app/".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(
            target("/cell0.v1.Kv/Range", unary::message_of(&range).unwrap()),
            Some(Target::Prefix(b"app/".to_vec()))
        );
        // A compressed or truncated frame is not read.
        let mut compressed = put.to_vec();
        compressed[0] = 1;
        assert!(unary::message_of(&compressed).is_err());
        assert!(unary::message_of(&put[..put.len() - 1]).is_err());
        assert!(unary::message_of(&[]).is_err());
        // The value never appears in what is shown.
        assert!(!Target::Key(b"app/x".to_vec()).describe().contains("secret"));
    }
}
