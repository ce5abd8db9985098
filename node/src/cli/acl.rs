//! `cell0 acl ...`: bootstrap, policies and tokens.
//!
//! A rule is written `RESOURCE[:PREFIX]=ACCESS`: `kv:app/=write`,
//! `kv=read` (every key), `agents=write`, `operator=write`; resources are
//! kv, agents, tasks, nodes, models, operator and acl, accesses deny, read
//! and write.

use cell0_proto::v1;
use cell0_proto::v1::acl_client::AclClient;
use cell0_state::acl::{Access, Resource};
use clap::Subcommand;
use serde::Serialize;

use super::{Output, connect, print_json, print_list, rpc_error};
use crate::api::acl::{access_from_proto, access_to_proto, resource_from_proto, resource_to_proto};

/// ACL commands.
#[derive(Subcommand)]
pub enum AclCommand {
    /// Make the first management token (once in the cluster's life; needs
    /// no token). Keep the printed secret: it is shown only now.
    Bootstrap,
    /// Show the token this command runs with (--token, CELL0_TOKEN).
    Whoami,
    /// Create, list and delete policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Create, list and delete tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// Policy commands.
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Create or replace policy NAME.
    Set {
        /// The policy's name (letters, digits, '-', '_', '.').
        name: String,
        /// A rule, `RESOURCE[:PREFIX]=ACCESS` (repeat for more), e.g.
        /// `kv:app/=write`, `kv=read`, `agents=read`.
        #[arg(long = "rule", required = true)]
        rules: Vec<String>,
        /// For people.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List policies.
    Ls,
    /// Delete policy NAME (tokens naming it lose its rules).
    Rm {
        /// The policy's name.
        name: String,
    },
}

/// Token commands.
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token carrying policies; prints its secret once.
    Create {
        /// A policy the token carries (repeat for more).
        #[arg(long = "policy", required = true)]
        policies: Vec<String>,
        /// For people.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets).
    Ls,
    /// Delete the token with ACCESSOR (its secret stops working).
    Rm {
        /// The token's accessor, as `cell0 acl token ls` shows it.
        accessor: String,
    },
}

/// Parses `RESOURCE[:PREFIX]=ACCESS`.
pub fn parse_rule(text: &str) -> anyhow::Result<v1::AclRule> {
    let (target, access) = text
        .rsplit_once('=')
        .ok_or_else(|| anyhow::anyhow!("rule {text:?}: expected RESOURCE[:PREFIX]=ACCESS, e.g. kv:app/=write"))?;
    let (resource, prefix) = target.split_once(':').unwrap_or((target, ""));
    let resource = Resource::parse(resource).ok_or_else(|| {
        anyhow::anyhow!(
            "rule {text:?}: unknown resource {resource:?} (kv, agents, tasks, nodes, models, operator, acl)"
        )
    })?;
    let access = Access::parse(access)
        .ok_or_else(|| anyhow::anyhow!("rule {text:?}: unknown access {access:?} (deny, read, write)"))?;
    if resource != Resource::Kv && target.contains(':') {
        anyhow::bail!("rule {text:?}: only kv rules take a prefix");
    }
    Ok(v1::AclRule {
        resource: resource_to_proto(resource) as i32,
        prefix: prefix.as_bytes().to_vec().into(),
        access: access_to_proto(access) as i32,
    })
}

fn show_rule(r: &v1::AclRule) -> String {
    let resource = resource_from_proto(r.resource);
    let name = resource.map_or("?", Resource::as_str);
    let access = access_from_proto(r.access).map_or("?", Access::as_str);
    if resource == Some(Resource::Kv) && !r.prefix.is_empty() {
        format!("{name}:{}={access}", String::from_utf8_lossy(&r.prefix))
    } else {
        format!("{name}={access}")
    }
}

#[derive(Serialize)]
struct TokenView {
    accessor: String,
    description: String,
    policies: Vec<String>,
    management: bool,
    created_ms: u64,
}

fn token_view(t: v1::AclToken) -> TokenView {
    TokenView {
        accessor: t.accessor,
        description: t.description,
        policies: t.policies,
        management: t.management,
        created_ms: t.created_ms,
    }
}

#[derive(Serialize)]
struct PolicyView {
    name: String,
    description: String,
    rules: Vec<String>,
}

fn print_created(output: Output, created: v1::AclTokenCreated) -> anyhow::Result<()> {
    let token = created.token.map(token_view);
    match output {
        Output::Json => print_json(&serde_json::json!({ "token": token, "secret": created.secret })),
        Output::Table => {
            if let Some(t) = token {
                println!("accessor: {}", t.accessor);
                println!(
                    "policies: {}",
                    if t.management {
                        "(management)".into()
                    } else {
                        t.policies.join(", ")
                    }
                );
            }
            println!("secret:   {}", created.secret);
            eprintln!("Keep the secret safe: it is shown only now. Use it as CELL0_TOKEN.");
            Ok(())
        }
    }
}

/// Runs one acl command against `endpoint`.
pub async fn run(endpoint: &str, output: Output, cmd: AclCommand) -> anyhow::Result<()> {
    let mut client = AclClient::new(connect(endpoint).await?);
    match cmd {
        AclCommand::Bootstrap => {
            let created = client
                .bootstrap(v1::AclBootstrapRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_created(output, created)
        }
        AclCommand::Whoami => {
            let t = client
                .who_am_i(v1::WhoAmIRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_list(
                output,
                vec![token_view(t)],
                &["ACCESSOR", "POLICIES", "DESCRIPTION"],
                token_row,
            )
        }
        AclCommand::Policy(PolicyCommand::Set {
            name,
            rules,
            description,
        }) => {
            let rules = rules
                .iter()
                .map(|r| parse_rule(r))
                .collect::<anyhow::Result<Vec<_>>>()?;
            client
                .set_policy(v1::SetPolicyRequest {
                    policy: Some(v1::AclPolicy {
                        name: name.clone(),
                        description,
                        rules,
                    }),
                })
                .await
                .map_err(rpc_error)?;
            match output {
                Output::Json => print_json(&serde_json::json!({ "policy": name })),
                Output::Table => {
                    println!("policy {name} set");
                    Ok(())
                }
            }
        }
        AclCommand::Policy(PolicyCommand::Ls) => {
            let r = client
                .list_policies(v1::ListPoliciesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let views = r
                .policies
                .into_iter()
                .map(|p| PolicyView {
                    rules: p.rules.iter().map(show_rule).collect(),
                    name: p.name,
                    description: p.description,
                })
                .collect();
            print_list(output, views, &["NAME", "RULES", "DESCRIPTION"], |p| {
                vec![p.name, p.rules.join(" "), p.description]
            })
        }
        AclCommand::Policy(PolicyCommand::Rm { name }) => {
            let r = client
                .delete_policy(v1::DeletePolicyRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_removed(output, "policy", &name, r.existed)
        }
        AclCommand::Token(TokenCommand::Create { policies, description }) => {
            let created = client
                .create_token(v1::CreateTokenRequest { description, policies })
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_created(output, created)
        }
        AclCommand::Token(TokenCommand::Ls) => {
            let r = client
                .list_tokens(v1::ListTokensRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_list(
                output,
                r.tokens.into_iter().map(token_view).collect(),
                &["ACCESSOR", "POLICIES", "DESCRIPTION"],
                token_row,
            )
        }
        AclCommand::Token(TokenCommand::Rm { accessor }) => {
            let r = client
                .delete_token(v1::DeleteTokenRequest {
                    accessor: accessor.clone(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_removed(output, "token", &accessor, r.existed)
        }
    }
}

fn token_row(t: TokenView) -> Vec<String> {
    let policies = if t.management {
        "(management)".to_string()
    } else {
        t.policies.join(",")
    };
    vec![t.accessor, policies, t.description]
}

fn print_removed(output: Output, what: &str, name: &str, existed: bool) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&serde_json::json!({ "deleted": existed })),
        Output::Table => {
            if existed {
                println!("{what} {name} deleted");
            } else {
                println!("no {what} {name}; nothing deleted");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_show_the_same_way() {
        for text in [
            "kv:app/=write",
            "kv=read",
            "agents=deny",
            "operator=write",
            "kv:a=b=read",
        ] {
            let rule = parse_rule(text).unwrap();
            assert_eq!(show_rule(&rule), text);
        }
        for bad in ["kv", "kv:x", "nodes:x=read", "disks=read", "kv=all"] {
            let err = parse_rule(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
