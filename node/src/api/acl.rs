//! `cell0.v1.Acl`: bootstrap, policies and tokens.
//!
//! Who may call what is decided by the layer in [`super::auth`], not here.
//! This service draws each new token's accessor, secret and salt, proposes
//! only the salted hash, and hands the secret to the caller once: the
//! secret is in no log entry, row, snapshot, log line or audit line.

use cell0_consensus::{Consensus, Consistency};
use cell0_proto::v1;
use cell0_proto::v1::acl_server::Acl;
use cell0_state::acl::{
    self, ACCESSOR_BYTES, Access, AccessorId, AclCommand, AclOutcome, BearerToken, Policy, Resource, Rule, SALT_BYTES,
    SECRET_BYTES, SecretHash, Token,
};
use tonic::{Request, Response, Status};

use super::auth::Principal;
use super::{ApiError, RequestGate, auth};
use crate::scheduling::now_ms;

/// The Acl service of one node.
pub struct AclApi {
    consensus: Consensus,
    gate: RequestGate,
    enabled: bool,
}

impl AclApi {
    /// The service over `consensus`; `enabled`: whether this node runs with
    /// ACLs on (off: every call fails with `ACL_DISABLED`).
    pub fn new(consensus: Consensus, gate: RequestGate, enabled: bool) -> Self {
        Self {
            consensus,
            gate,
            enabled,
        }
    }

    fn check_enabled(&self) -> Result<(), ApiError> {
        if self.enabled {
            Ok(())
        } else {
            Err(ApiError::AclDisabled)
        }
    }

    /// Proposes `command` and maps refusals to errors.
    async fn apply(&self, command: AclCommand) -> Result<AclOutcome, ApiError> {
        let response = self.consensus.propose(command.into_command()).await?;
        match AclCommand::outcome(response).map_err(|e| super::agents::invalid("", e))? {
            AclOutcome::AlreadyBootstrapped => Err(ApiError::AclAlreadyBootstrapped),
            AclOutcome::UnknownPolicy { name } => Err(ApiError::AclPolicyNotFound { name }),
            AclOutcome::Full { what } => Err(ApiError::AclFull { what }),
            AclOutcome::AccessorTaken => Err(ApiError::Internal("a random accessor id was taken; retry".into())),
            other => Ok(other),
        }
    }
}

/// A new token's secret and the row that stores only its hash.
fn new_token(description: String, policies: Vec<String>, management: bool) -> (BearerToken, Token) {
    let bearer = BearerToken {
        accessor: AccessorId(rand::random::<[u8; ACCESSOR_BYTES]>()),
        secret: rand::random::<[u8; SECRET_BYTES]>(),
    };
    let token = Token {
        accessor: bearer.accessor,
        description,
        policies,
        management,
        secret: SecretHash::new(rand::random::<[u8; SALT_BYTES]>(), &bearer.secret),
        created_ms: now_ms(),
    };
    (bearer, token)
}

fn token_to_proto(t: Token) -> v1::AclToken {
    v1::AclToken {
        accessor: t.accessor.to_string(),
        description: t.description,
        policies: t.policies,
        management: t.management,
        created_ms: t.created_ms,
    }
}

fn created(bearer: &BearerToken, token: Token) -> v1::AclTokenCreated {
    v1::AclTokenCreated {
        token: Some(token_to_proto(token)),
        secret: bearer.expose(),
    }
}

/// The wire form of a resource.
pub fn resource_to_proto(r: Resource) -> v1::AclResource {
    match r {
        Resource::Kv => v1::AclResource::Kv,
        Resource::Agents => v1::AclResource::Agents,
        Resource::Tasks => v1::AclResource::Tasks,
        Resource::Nodes => v1::AclResource::Nodes,
        Resource::Models => v1::AclResource::Models,
        Resource::Operator => v1::AclResource::Operator,
        Resource::Acl => v1::AclResource::Acl,
    }
}

/// The wire form of an access.
pub fn access_to_proto(a: Access) -> v1::AclAccess {
    match a {
        Access::Deny => v1::AclAccess::Deny,
        Access::Read => v1::AclAccess::Read,
        Access::Write => v1::AclAccess::Write,
    }
}

/// The resource of a wire value; `None` for unspecified or unknown values.
pub fn resource_from_proto(value: i32) -> Option<Resource> {
    match v1::AclResource::try_from(value).ok()? {
        v1::AclResource::Kv => Some(Resource::Kv),
        v1::AclResource::Agents => Some(Resource::Agents),
        v1::AclResource::Tasks => Some(Resource::Tasks),
        v1::AclResource::Nodes => Some(Resource::Nodes),
        v1::AclResource::Models => Some(Resource::Models),
        v1::AclResource::Operator => Some(Resource::Operator),
        v1::AclResource::Acl => Some(Resource::Acl),
        v1::AclResource::Unspecified => None,
    }
}

/// The access of a wire value; `None` for unspecified or unknown values.
pub fn access_from_proto(value: i32) -> Option<Access> {
    match v1::AclAccess::try_from(value).ok()? {
        v1::AclAccess::Deny => Some(Access::Deny),
        v1::AclAccess::Read => Some(Access::Read),
        v1::AclAccess::Write => Some(Access::Write),
        v1::AclAccess::Unspecified => None,
    }
}

fn policy_to_proto(p: Policy) -> v1::AclPolicy {
    v1::AclPolicy {
        name: p.name,
        description: p.description,
        rules: p
            .rules
            .into_iter()
            .map(|r| v1::AclRule {
                resource: resource_to_proto(r.resource) as i32,
                prefix: r.prefix.into(),
                access: access_to_proto(r.access) as i32,
            })
            .collect(),
    }
}

fn policy_from_proto(p: v1::AclPolicy) -> Result<Policy, ApiError> {
    let rules = p
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let resource = resource_from_proto(r.resource).ok_or_else(|| {
                ApiError::invalid(
                    &format!("policy.rules[{i}].resource"),
                    "must be one of kv, agents, tasks, nodes, models, operator, acl",
                )
            })?;
            let access = access_from_proto(r.access).ok_or_else(|| {
                ApiError::invalid(&format!("policy.rules[{i}].access"), "must be deny, read or write")
            })?;
            Ok(Rule {
                resource,
                prefix: r.prefix.to_vec(),
                access,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Policy {
        name: p.name,
        description: p.description,
        rules,
    })
}

#[tonic::async_trait]
impl Acl for AclApi {
    async fn bootstrap(
        &self,
        _request: Request<v1::AclBootstrapRequest>,
    ) -> Result<Response<v1::AclTokenCreated>, Status> {
        self.gate
            .observe("Acl/Bootstrap", async {
                self.check_enabled()?;
                let (bearer, token) = new_token("bootstrap management token".into(), Vec::new(), true);
                self.apply(AclCommand::Bootstrap { token: token.clone() }).await?;
                tracing::info!(
                    accessor = %token.accessor,
                    trace_id = %auth::current_trace_id(),
                    "ACL bootstrap: made the first management token"
                );
                Ok(Response::new(created(&bearer, token)))
            })
            .await
    }

    async fn set_policy(
        &self,
        request: Request<v1::SetPolicyRequest>,
    ) -> Result<Response<v1::SetPolicyResponse>, Status> {
        self.gate
            .observe("Acl/SetPolicy", async {
                self.check_enabled()?;
                let policy = request
                    .into_inner()
                    .policy
                    .ok_or_else(|| ApiError::invalid("policy", "is required"))?;
                self.apply(AclCommand::SetPolicy {
                    policy: policy_from_proto(policy)?,
                })
                .await?;
                Ok(Response::new(v1::SetPolicyResponse {}))
            })
            .await
    }

    async fn delete_policy(
        &self,
        request: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        self.gate
            .observe("Acl/DeletePolicy", async {
                self.check_enabled()?;
                let name = request.into_inner().name;
                let existed = matches!(
                    self.apply(AclCommand::DeletePolicy { name }).await?,
                    AclOutcome::PolicyDeleted { existed: true }
                );
                Ok(Response::new(v1::DeletePolicyResponse { existed }))
            })
            .await
    }

    async fn list_policies(
        &self,
        _request: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        self.gate
            .observe("Acl/ListPolicies", async {
                self.check_enabled()?;
                let policies = self.consensus.read(Consistency::Linearizable, acl::policies).await?;
                Ok(Response::new(v1::ListPoliciesResponse {
                    policies: policies.into_iter().map(policy_to_proto).collect(),
                }))
            })
            .await
    }

    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::AclTokenCreated>, Status> {
        self.gate
            .observe("Acl/CreateToken", async {
                self.check_enabled()?;
                let req = request.into_inner();
                if req.policies.is_empty() {
                    return Err(ApiError::invalid(
                        "policies",
                        "must name at least one policy (a token without policies may do nothing)",
                    ));
                }
                let (bearer, token) = new_token(req.description, req.policies, false);
                self.apply(AclCommand::CreateToken { token: token.clone() }).await?;
                Ok(Response::new(created(&bearer, token)))
            })
            .await
    }

    async fn delete_token(
        &self,
        request: Request<v1::DeleteTokenRequest>,
    ) -> Result<Response<v1::DeleteTokenResponse>, Status> {
        self.gate
            .observe("Acl/DeleteToken", async {
                self.check_enabled()?;
                let text = request.into_inner().accessor;
                let accessor = AccessorId::parse(&text)
                    .ok_or_else(|| ApiError::invalid("accessor", "must be 32 hex digits (cell0 acl token ls)"))?;
                let existed = matches!(
                    self.apply(AclCommand::DeleteToken { accessor }).await?,
                    AclOutcome::TokenDeleted { existed: true }
                );
                Ok(Response::new(v1::DeleteTokenResponse { existed }))
            })
            .await
    }

    async fn list_tokens(
        &self,
        _request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        self.gate
            .observe("Acl/ListTokens", async {
                self.check_enabled()?;
                let tokens = self.consensus.read(Consistency::Linearizable, acl::tokens).await?;
                Ok(Response::new(v1::ListTokensResponse {
                    tokens: tokens.into_iter().map(token_to_proto).collect(),
                }))
            })
            .await
    }

    async fn who_am_i(&self, request: Request<v1::WhoAmIRequest>) -> Result<Response<v1::AclToken>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        self.gate
            .observe("Acl/WhoAmI", async {
                self.check_enabled()?;
                let principal = principal.ok_or(ApiError::Internal("no verified token on the call".into()))?;
                let accessor = principal.accessor;
                let token = self
                    .consensus
                    .read(Consistency::Serializable, move |txn| acl::token(txn, &accessor))
                    .await?
                    .ok_or(ApiError::TokenUnknown)?;
                Ok(Response::new(token_to_proto(token)))
            })
            .await
    }
}
