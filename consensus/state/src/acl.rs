//! Access control: policies, tokens and the authorizer (Consul and Nomad
//! style).
//!
//! Tables (in the state column family):
//! - `acl_policies`: policy name (UTF-8) -> [`Policy`], counted in `meta`
//!   (`acl_policies`, at most [`MAX_POLICIES`]).
//! - `acl_tokens`: accessor id (16 bytes) -> [`Token`], counted in `meta`
//!   (`acl_tokens`, at most [`MAX_TOKENS`]).
//! - `meta` row `acl_bootstrapped`: 1 once the first management token exists.
//!
//! Invariants:
//! - A token's secret is never stored and never in the log. The node that
//!   proposes a token draws the accessor, the secret and a salt, and the
//!   command carries only the salt and SHA-256(salt || secret)
//!   ([`SecretHash`]); apply draws nothing. A client presents
//!   `c0.<accessor hex>.<secret hex>` ([`BearerToken`]): the accessor finds
//!   the row, the hash proves the secret.
//! - Bootstrap succeeds once in a cluster's life: the first
//!   [`AclCommand::Bootstrap`] applied stores its token, every later one is
//!   answered [`AclOutcome::AlreadyBootstrapped`] and stores nothing.
//! - Deny by default. An [`Authorizer`] is a pure function of a token and
//!   its policies. For keys the most specific rule (longest matching
//!   prefix) decides; between equally specific rules, and for every other
//!   resource, deny wins over everything and write over read. Write implies
//!   read. A prefix is allowed only if every key under it is.
//! - A token may name a policy deleted later; it simply loses those rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{Counted, get_row};
use crate::error::{Result, StateError};
use crate::kv::{META_TABLE, meta_u64, put_meta_u64};
use crate::txn::{Txn, prefix_end};

const POLICIES_TABLE: &str = "acl_policies";
const TOKENS_TABLE: &str = "acl_tokens";
const BOOTSTRAPPED_KEY: &[u8] = b"acl_bootstrapped";
const POLICIES: Counted = Counted {
    table: POLICIES_TABLE,
    count_key: b"acl_policies",
};
const TOKENS: Counted = Counted {
    table: TOKENS_TABLE,
    count_key: b"acl_tokens",
};

/// Most policies in a cluster.
pub const MAX_POLICIES: usize = 4096;
/// Most tokens in a cluster.
pub const MAX_TOKENS: usize = 65_536;
/// Most rules in one policy.
pub const MAX_RULES: usize = 256;
/// Most policies one token names.
pub const MAX_TOKEN_POLICIES: usize = 32;
/// Longest policy name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 256;
/// Bytes of an accessor id.
pub const ACCESSOR_BYTES: usize = 16;
/// Bytes of a token secret.
pub const SECRET_BYTES: usize = 32;
/// Bytes of a secret's salt.
pub const SALT_BYTES: usize = 16;

/// What a rule governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Resource {
    /// Keys and values, by key prefix.
    Kv,
    /// Agents (run, stop, migrate, list).
    Agents,
    /// Agents' tasks and memory.
    Tasks,
    /// Nodes (list, drain, eligibility) and cluster status.
    Nodes,
    /// The model registry and inference.
    Models,
    /// Operator actions: join, remove, snapshot.
    Operator,
    /// Policies and tokens.
    Acl,
}

impl Resource {
    /// Every resource, in a fixed order.
    pub const ALL: [Resource; 7] = [
        Resource::Kv,
        Resource::Agents,
        Resource::Tasks,
        Resource::Nodes,
        Resource::Models,
        Resource::Operator,
        Resource::Acl,
    ];

    /// The name used in rules and messages (`kv`, `agents`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Kv => "kv",
            Resource::Agents => "agents",
            Resource::Tasks => "tasks",
            Resource::Nodes => "nodes",
            Resource::Models => "models",
            Resource::Operator => "operator",
            Resource::Acl => "acl",
        }
    }

    /// The resource named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// What a rule grants. Ordered: deny < read < write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Access {
    /// Nothing, overriding grants of equal specificity.
    Deny,
    /// Reads.
    Read,
    /// Reads and writes.
    Write,
}

impl Access {
    /// `deny`, `read` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Deny => "deny",
            Access::Read => "read",
            Access::Write => "write",
        }
    }

    /// The access named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [Access::Deny, Access::Read, Access::Write]
            .into_iter()
            .find(|a| a.as_str() == name)
    }

    /// Two grants of equal specificity combined: deny wins, then the larger.
    fn merge(self, other: Access) -> Access {
        if self == Access::Deny || other == Access::Deny {
            Access::Deny
        } else {
            self.max(other)
        }
    }
}

/// One grant of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// What it governs.
    pub resource: Resource,
    /// For [`Resource::Kv`], the key prefix it covers (empty: every key);
    /// empty for every other resource.
    pub prefix: Vec<u8>,
    /// What it grants.
    pub access: Access,
}

/// A named set of rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Unique name: letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// For people.
    pub description: String,
    /// The grants.
    pub rules: Vec<Rule>,
}

crate::row_v1!(Policy, "acl policy");

/// A token's public id: 16 random bytes, shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AccessorId(pub [u8; ACCESSOR_BYTES]);

impl std::fmt::Display for AccessorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl AccessorId {
    /// Parses 32 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        unhex::<ACCESSOR_BYTES>(text).map(AccessorId)
    }
}

/// A salted hash of a token secret: what is stored instead of the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretHash {
    /// Random, drawn with the secret.
    pub salt: [u8; SALT_BYTES],
    /// SHA-256(salt || secret).
    pub digest: [u8; 32],
}

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

impl SecretHash {
    /// The hash of `secret` with `salt`.
    pub fn new(salt: [u8; SALT_BYTES], secret: &[u8; SECRET_BYTES]) -> Self {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(secret);
        Self {
            salt,
            digest: h.finalize().into(),
        }
    }

    /// Whether `secret` is the one this hash was made from.
    pub fn matches(&self, secret: &[u8; SECRET_BYTES]) -> bool {
        // The digest of a 256-bit random secret leaks nothing useful through
        // the comparison's timing; compare all bytes anyway.
        let other = Self::new(self.salt, secret).digest;
        self.digest.iter().zip(other).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// A token as stored: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Its public id.
    pub accessor: AccessorId,
    /// For people.
    pub description: String,
    /// The policies it carries, by name.
    pub policies: Vec<String>,
    /// Whether it may do everything (the bootstrap token).
    pub management: bool,
    /// The salted hash of its secret.
    pub secret: SecretHash,
    /// When it was made (proposing node's clock, ms since the epoch).
    pub created_ms: u64,
}

crate::row_v1!(Token, "acl token");

/// A token as a client presents it: `c0.<accessor hex>.<secret hex>`. Its
/// `Debug` shows the accessor only.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken {
    /// Which token.
    pub accessor: AccessorId,
    /// Its secret.
    pub secret: [u8; SECRET_BYTES],
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BearerToken({}, ..)", self.accessor)
    }
}

impl BearerToken {
    /// Parses `c0.<32 hex>.<64 hex>`.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("c0.")?;
        let (accessor, secret) = rest.split_once('.')?;
        Some(Self {
            accessor: AccessorId::parse(accessor)?,
            secret: unhex::<SECRET_BYTES>(secret)?,
        })
    }

    /// The text a client sends. Handle it like a password.
    pub fn expose(&self) -> String {
        format!("c0.{}.{}", self.accessor, hex(&self.secret))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A change to policies or tokens, carried in [`crate::Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AclCommand {
    /// Stores the first management token, once in the cluster's life.
    Bootstrap {
        /// The token (management, no policies).
        token: Token,
    },
    /// Creates or replaces a policy.
    SetPolicy {
        /// The policy.
        policy: Policy,
    },
    /// Deletes a policy.
    DeletePolicy {
        /// Its name.
        name: String,
    },
    /// Creates a token; refused when a policy it names does not exist.
    CreateToken {
        /// The token.
        token: Token,
    },
    /// Deletes a token: its secret stops working at once on every node
    /// that has applied this.
    DeleteToken {
        /// Which token.
        accessor: AccessorId,
    },
}

/// What an [`AclCommand`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AclOutcome {
    /// The bootstrap token is stored.
    Bootstrapped,
    /// Bootstrap already happened; nothing stored.
    AlreadyBootstrapped,
    /// The policy is stored.
    PolicySet,
    /// The policy is gone (`existed`: whether there was one).
    PolicyDeleted {
        /// Whether there was one.
        existed: bool,
    },
    /// The token is stored.
    TokenCreated,
    /// The token is gone (`existed`: whether there was one).
    TokenDeleted {
        /// Whether there was one.
        existed: bool,
    },
    /// A token named a policy that does not exist; nothing stored.
    UnknownPolicy {
        /// The missing policy.
        name: String,
    },
    /// The accessor id is taken; nothing stored.
    AccessorTaken,
    /// The table is full ([`MAX_POLICIES`] or [`MAX_TOKENS`]); nothing
    /// stored.
    Full {
        /// `policies` or `tokens`.
        what: String,
    },
}

impl AclOutcome {
    /// Whether the command changed the tables.
    pub fn changed(&self) -> bool {
        matches!(
            self,
            AclOutcome::Bootstrapped
                | AclOutcome::PolicySet
                | AclOutcome::TokenCreated
                | AclOutcome::PolicyDeleted { existed: true }
                | AclOutcome::TokenDeleted { existed: true }
        )
    }
}

fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(StateError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(StateError::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_NAME_BYTES}", name.len()),
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(StateError::invalid(
            field,
            "may contain only letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

fn check_description(field: &str, text: &str) -> Result<()> {
    if text.len() > MAX_DESCRIPTION_BYTES {
        return Err(StateError::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_DESCRIPTION_BYTES}", text.len()),
        ));
    }
    Ok(())
}

impl Policy {
    /// Checks the name, description and rules; the error names the field.
    pub fn validate(&self) -> Result<()> {
        check_name("policy.name", &self.name)?;
        check_description("policy.description", &self.description)?;
        if self.rules.len() > MAX_RULES {
            return Err(StateError::invalid(
                "policy.rules",
                format!("has {} rules; the limit is {MAX_RULES}", self.rules.len()),
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.prefix.len() > crate::command::MAX_KEY_BYTES {
                return Err(StateError::invalid(
                    &format!("policy.rules[{i}].prefix"),
                    format!(
                        "is {} bytes; the limit is {}",
                        rule.prefix.len(),
                        crate::command::MAX_KEY_BYTES
                    ),
                ));
            }
            if rule.resource != Resource::Kv && !rule.prefix.is_empty() {
                return Err(StateError::invalid(
                    &format!("policy.rules[{i}].prefix"),
                    format!("applies only to kv rules, not to {}", rule.resource.as_str()),
                ));
            }
        }
        Ok(())
    }
}

impl Token {
    /// Checks the description and policy names; the error names the field.
    pub fn validate(&self) -> Result<()> {
        check_description("token.description", &self.description)?;
        if self.policies.len() > MAX_TOKEN_POLICIES {
            return Err(StateError::invalid(
                "token.policies",
                format!(
                    "has {} policies; the limit is {MAX_TOKEN_POLICIES}",
                    self.policies.len()
                ),
            ));
        }
        for (i, name) in self.policies.iter().enumerate() {
            check_name(&format!("token.policies[{i}]"), name)?;
        }
        Ok(())
    }
}

impl AclCommand {
    /// The command carrying this change.
    pub fn into_command(self) -> crate::Command {
        crate::Command::Acl(self)
    }

    /// The outcome in a response to an ACL command.
    pub fn outcome(response: crate::Response) -> Result<AclOutcome> {
        match response {
            crate::Response::Acl(o) => Ok(o),
            crate::Response::Rejected(reason) => Err(StateError::invalid("acl command", reason)),
            other => Err(StateError::UnexpectedResponse {
                expected: "an ACL command",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Checks the command's fields.
    pub fn validate(&self) -> Result<()> {
        match self {
            AclCommand::Bootstrap { token } | AclCommand::CreateToken { token } => token.validate(),
            AclCommand::SetPolicy { policy } => policy.validate(),
            AclCommand::DeletePolicy { name } => check_name("name", name),
            AclCommand::DeleteToken { .. } => Ok(()),
        }
    }

    /// Approximate encoded size, for batching decisions.
    pub fn approx_size(&self) -> usize {
        match self {
            AclCommand::SetPolicy { policy } => {
                64 + policy.description.len() + policy.rules.iter().map(|r| r.prefix.len() + 4).sum::<usize>()
            }
            _ => 256,
        }
    }
}

/// Applies a validated ACL command.
pub(crate) fn apply(txn: &mut dyn Txn, cmd: &AclCommand) -> Result<AclOutcome> {
    match cmd {
        AclCommand::Bootstrap { token } => {
            if bootstrapped(txn)? {
                return Ok(AclOutcome::AlreadyBootstrapped);
            }
            match store_token(txn, token)? {
                AclOutcome::TokenCreated => {
                    put_meta_u64(txn, BOOTSTRAPPED_KEY, 1)?;
                    Ok(AclOutcome::Bootstrapped)
                }
                refused => Ok(refused),
            }
        }
        AclCommand::SetPolicy { policy } => {
            let key = policy.name.as_bytes();
            if txn.get(POLICIES_TABLE, key)?.is_none() && POLICIES.count(txn)? >= MAX_POLICIES as u64 {
                return Ok(AclOutcome::Full {
                    what: "policies".into(),
                });
            }
            POLICIES.put(txn, key, policy)?;
            Ok(AclOutcome::PolicySet)
        }
        AclCommand::DeletePolicy { name } => Ok(AclOutcome::PolicyDeleted {
            existed: POLICIES.delete(txn, name.as_bytes())?,
        }),
        AclCommand::CreateToken { token } => store_token(txn, token),
        AclCommand::DeleteToken { accessor } => Ok(AclOutcome::TokenDeleted {
            existed: TOKENS.delete(txn, &accessor.0)?,
        }),
    }
}

fn store_token(txn: &mut dyn Txn, token: &Token) -> Result<AclOutcome> {
    for name in &token.policies {
        if txn.get(POLICIES_TABLE, name.as_bytes())?.is_none() {
            return Ok(AclOutcome::UnknownPolicy { name: name.clone() });
        }
    }
    if txn.get(TOKENS_TABLE, &token.accessor.0)?.is_some() {
        return Ok(AclOutcome::AccessorTaken);
    }
    if TOKENS.count(txn)? >= MAX_TOKENS as u64 {
        return Ok(AclOutcome::Full { what: "tokens".into() });
    }
    TOKENS.put(txn, &token.accessor.0, token)?;
    Ok(AclOutcome::TokenCreated)
}

/// Whether the first management token exists.
pub fn bootstrapped(txn: &dyn Txn) -> Result<bool> {
    if txn.get(META_TABLE, BOOTSTRAPPED_KEY)?.is_none() {
        return Ok(false);
    }
    Ok(meta_u64(txn, BOOTSTRAPPED_KEY)? == 1)
}

/// The token with `accessor`.
pub fn token(txn: &dyn Txn, accessor: &AccessorId) -> Result<Option<Token>> {
    get_row(txn, TOKENS_TABLE, &accessor.0)
}

/// Every token, by accessor.
pub fn tokens(txn: &dyn Txn) -> Result<Vec<Token>> {
    scan_rows(txn, TOKENS_TABLE)
}

/// Every policy, by name.
pub fn policies(txn: &dyn Txn) -> Result<Vec<Policy>> {
    scan_rows(txn, POLICIES_TABLE)
}

fn scan_rows<T: crate::codec::Row>(txn: &dyn Txn, table: &str) -> Result<Vec<T>> {
    txn.scan(table, b"", None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| crate::codec::decode_row(&v))
        .collect()
}

/// The token with `accessor` and what it may do, if it exists.
pub fn resolve(txn: &dyn Txn, accessor: &AccessorId) -> Result<Option<(Token, Authorizer)>> {
    let Some(token) = token(txn, accessor)? else {
        return Ok(None);
    };
    let mut policies = Vec::with_capacity(token.policies.len());
    for name in &token.policies {
        if let Some(p) = get_row::<Policy>(txn, POLICIES_TABLE, name.as_bytes())? {
            policies.push(p);
        }
    }
    let authorizer = Authorizer::new(token.management, &policies);
    Ok(Some((token, authorizer)))
}

/// What a request touches: a whole resource, one key, or every key under a
/// prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// The resource as a whole (every resource but kv).
    Whole,
    /// One key.
    Key(&'a [u8]),
    /// Every key starting with the prefix.
    Prefix(&'a [u8]),
}

/// What one token may do, compiled from its policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorizer {
    management: bool,
    /// Key prefix -> access, merged across policies.
    kv: BTreeMap<Vec<u8>, Access>,
    /// Every other resource -> access, merged across policies.
    others: BTreeMap<Resource, Access>,
}

impl Authorizer {
    /// The authorizer of a token with `policies` (`management`: allowed
    /// everything).
    pub fn new(management: bool, policies: &[Policy]) -> Self {
        let mut kv: BTreeMap<Vec<u8>, Access> = BTreeMap::new();
        let mut others: BTreeMap<Resource, Access> = BTreeMap::new();
        for rule in policies.iter().flat_map(|p| &p.rules) {
            if rule.resource == Resource::Kv {
                kv.entry(rule.prefix.clone())
                    .and_modify(|a| *a = a.merge(rule.access))
                    .or_insert(rule.access);
            } else {
                others
                    .entry(rule.resource)
                    .and_modify(|a| *a = a.merge(rule.access))
                    .or_insert(rule.access);
            }
        }
        Self { management, kv, others }
    }

    /// Whether this is a management token's authorizer.
    pub fn is_management(&self) -> bool {
        self.management
    }

    /// Whether `access` to `resource` over `scope` is allowed. A key scope
    /// on a resource other than kv is judged as the whole resource.
    pub fn allows(&self, resource: Resource, access: Access, scope: Scope<'_>) -> bool {
        if self.management {
            return true;
        }
        let granted = match (resource, scope) {
            (Resource::Kv, Scope::Key(key)) => self.kv_at(key),
            (Resource::Kv, Scope::Prefix(prefix)) => self.kv_under(prefix),
            // The whole key space is the empty prefix.
            (Resource::Kv, Scope::Whole) => self.kv_under(b""),
            (other, _) => self.others.get(&other).copied().unwrap_or(Access::Deny),
        };
        granted != Access::Deny && granted >= access
    }

    /// The access of the longest rule prefix matching `key`.
    fn kv_at(&self, key: &[u8]) -> Access {
        self.kv
            .iter()
            .filter(|(p, _)| key.starts_with(p))
            .max_by_key(|(p, _)| p.len())
            .map_or(Access::Deny, |(_, a)| *a)
    }

    /// The least access of any key under `prefix`: the access changes only
    /// where a rule's prefix starts or ends, so it is the least of the
    /// access at `prefix` itself and at every such point under it.
    fn kv_under(&self, prefix: &[u8]) -> Access {
        let mut least = self.kv_at(prefix);
        // The rule prefixes under `prefix` (itself excluded) follow it in
        // the map, one after another.
        let after = (std::ops::Bound::Excluded(prefix), std::ops::Bound::Unbounded);
        for rule_prefix in self
            .kv
            .range::<[u8], _>(after)
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(prefix))
        {
            least = least.min(self.kv_at(rule_prefix));
            if let Some(end) = prefix_end(rule_prefix).filter(|e| e.starts_with(prefix)) {
                least = least.min(self.kv_at(&end));
            }
        }
        least
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemTxn;

    fn rule(resource: Resource, prefix: &str, access: Access) -> Rule {
        Rule {
            resource,
            prefix: prefix.as_bytes().to_vec(),
            access,
        }
    }

    fn policy(name: &str, rules: Vec<Rule>) -> Policy {
        Policy {
            name: name.into(),
            description: String::new(),
            rules,
        }
    }

    fn token(accessor: u8, policies: &[&str], management: bool) -> Token {
        Token {
            accessor: AccessorId([accessor; ACCESSOR_BYTES]),
            description: String::new(),
            policies: policies.iter().map(|p| p.to_string()).collect(),
            management,
            secret: SecretHash::new([accessor; SALT_BYTES], &[accessor; SECRET_BYTES]),
            created_ms: 1,
        }
    }

    #[test]
    fn the_longest_prefix_decides_and_deny_wins_at_equal_length() {
        use Access::*;
        let a = Authorizer::new(
            false,
            &[
                policy(
                    "p1",
                    vec![
                        rule(Resource::Kv, "app/", Write),
                        rule(Resource::Kv, "app/secret/", Deny),
                        rule(Resource::Kv, "", Read),
                        rule(Resource::Agents, "", Read),
                    ],
                ),
                policy(
                    "p2",
                    vec![
                        rule(Resource::Kv, "shared/", Write),
                        rule(Resource::Agents, "", Write),
                        rule(Resource::Nodes, "", Write),
                    ],
                ),
                policy(
                    "p3",
                    vec![rule(Resource::Kv, "shared/", Deny), rule(Resource::Nodes, "", Deny)],
                ),
            ],
        );
        let key = |k: &str, access| a.allows(Resource::Kv, access, Scope::Key(k.as_bytes()));
        let under = |k: &str, access| a.allows(Resource::Kv, access, Scope::Prefix(k.as_bytes()));
        assert!(key("app/x", Write));
        assert!(!key("app/secret/x", Read), "the longer deny decides");
        assert!(
            key("other", Read) && !key("other", Write),
            "the empty prefix covers the rest"
        );
        assert!(!key("shared/x", Read), "deny wins at equal length");
        assert!(under("app/public/", Write));
        assert!(!under("app/", Write), "app/secret/ lies under app/");
        assert!(!under("app/", Read));
        assert!(!under("", Read), "some keys are denied");
        assert!(under("b", Read) && !under("b", Write));
        assert!(!under("a", Read), "app/secret/ lies under a");
        assert!(a.allows(Resource::Agents, Write, Scope::Whole), "write wins over read");
        assert!(!a.allows(Resource::Nodes, Read, Scope::Whole), "deny wins");
        assert!(!a.allows(Resource::Operator, Read, Scope::Whole), "deny by default");
        assert!(!a.allows(Resource::Kv, Read, Scope::Whole));
        assert!(Authorizer::new(true, &[]).allows(Resource::Operator, Write, Scope::Whole));
        assert!(!Authorizer::new(false, &[]).allows(Resource::Kv, Read, Scope::Key(b"x")));
    }

    #[test]
    fn a_prefix_is_allowed_only_when_every_key_under_it_is() {
        use Access::*;
        // Read on everything but one key range inside "k", reached only
        // through the rule's end: "k\xff" ends at "l", which is outside "k".
        let a = Authorizer::new(
            false,
            &[policy(
                "p",
                vec![
                    rule(Resource::Kv, "", Read),
                    Rule {
                        resource: Resource::Kv,
                        prefix: b"k\xff".to_vec(),
                        access: Write,
                    },
                ],
            )],
        );
        assert!(a.allows(Resource::Kv, Read, Scope::Prefix(b"k")));
        assert!(!a.allows(Resource::Kv, Write, Scope::Prefix(b"k")));
        assert!(a.allows(Resource::Kv, Write, Scope::Prefix(b"k\xff")));
        assert!(a.allows(Resource::Kv, Write, Scope::Key(b"k\xff\x00")));
    }

    #[test]
    fn bootstrap_happens_once_and_tokens_need_existing_policies() {
        let mut txn = MemTxn::new();
        assert!(!bootstrapped(&txn).unwrap());
        let boot = AclCommand::Bootstrap {
            token: token(1, &[], true),
        };
        assert_eq!(apply(&mut txn, &boot).unwrap(), AclOutcome::Bootstrapped);
        let again = AclCommand::Bootstrap {
            token: token(2, &[], true),
        };
        assert_eq!(apply(&mut txn, &again).unwrap(), AclOutcome::AlreadyBootstrapped);
        assert!(bootstrapped(&txn).unwrap());
        assert!(super::token(&txn, &AccessorId([2; ACCESSOR_BYTES])).unwrap().is_none());

        let create = AclCommand::CreateToken {
            token: token(3, &["readers"], false),
        };
        assert_eq!(
            apply(&mut txn, &create).unwrap(),
            AclOutcome::UnknownPolicy { name: "readers".into() }
        );
        let set = AclCommand::SetPolicy {
            policy: policy("readers", vec![rule(Resource::Kv, "", Access::Read)]),
        };
        assert_eq!(apply(&mut txn, &set).unwrap(), AclOutcome::PolicySet);
        assert_eq!(apply(&mut txn, &create).unwrap(), AclOutcome::TokenCreated);
        assert_eq!(apply(&mut txn, &create).unwrap(), AclOutcome::AccessorTaken);

        let (t, a) = resolve(&txn, &AccessorId([3; ACCESSOR_BYTES])).unwrap().unwrap();
        assert!(t.secret.matches(&[3; SECRET_BYTES]));
        assert!(!t.secret.matches(&[4; SECRET_BYTES]));
        assert!(a.allows(Resource::Kv, Access::Read, Scope::Key(b"x")));

        // Deleting the policy leaves the token without its rules.
        let delete = AclCommand::DeletePolicy { name: "readers".into() };
        assert_eq!(
            apply(&mut txn, &delete).unwrap(),
            AclOutcome::PolicyDeleted { existed: true }
        );
        let (_, a) = resolve(&txn, &AccessorId([3; ACCESSOR_BYTES])).unwrap().unwrap();
        assert!(!a.allows(Resource::Kv, Access::Read, Scope::Key(b"x")));

        let delete = AclCommand::DeleteToken {
            accessor: AccessorId([3; ACCESSOR_BYTES]),
        };
        assert_eq!(
            apply(&mut txn, &delete).unwrap(),
            AclOutcome::TokenDeleted { existed: true }
        );
        assert!(resolve(&txn, &AccessorId([3; ACCESSOR_BYTES])).unwrap().is_none());
        assert_eq!(tokens(&txn).unwrap().len(), 1);
        assert!(policies(&txn).unwrap().is_empty());
    }

    #[test]
    fn stored_rows_hold_no_secret() {
        let mut txn = MemTxn::new();
        let secret = [0xa5; SECRET_BYTES];
        let mut t = token(1, &[], true);
        t.secret = SecretHash::new([7; SALT_BYTES], &secret);
        apply(&mut txn, &AclCommand::Bootstrap { token: t }).unwrap();
        for (_, _, value) in txn.rows() {
            assert!(!value.windows(SECRET_BYTES).any(|w| w == secret));
        }
    }

    #[test]
    fn bearer_tokens_round_trip_and_bad_text_is_refused() {
        let t = BearerToken {
            accessor: AccessorId([0xab; ACCESSOR_BYTES]),
            secret: [0x01; SECRET_BYTES],
        };
        let text = t.expose();
        assert_eq!(BearerToken::parse(&text), Some(t.clone()));
        assert!(!format!("{t:?}").contains(&"01".repeat(SECRET_BYTES)));
        for bad in [
            "",
            "c0.",
            "c1.ab.cd",
            &text[..text.len() - 1],
            &format!("{text}0"),
            &text.replace("c0.", "c0..")[..],
            &format!("c0.{}.{}", "zz".repeat(16), "00".repeat(32)),
            "c0.é.x",
        ] {
            assert_eq!(BearerToken::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = policy("bad name", vec![]);
        assert!(p.validate().unwrap_err().to_string().contains("policy.name"));
        p.name = "ok".into();
        p.rules = vec![rule(Resource::Agents, "x", Access::Read)];
        assert!(p.validate().unwrap_err().to_string().contains("policy.rules[0].prefix"));
        p.rules = vec![rule(Resource::Kv, "", Access::Read); MAX_RULES + 1];
        assert!(p.validate().unwrap_err().to_string().contains("policy.rules"));
        let mut t = token(1, &[], false);
        t.policies = vec!["a b".into()];
        assert!(t.validate().unwrap_err().to_string().contains("token.policies[0]"));
    }
}
