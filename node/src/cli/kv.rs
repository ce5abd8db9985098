//! `cell0 kv ...`: the key-value commands.

use cell0_proto::v1::kv_client::KvClient;
use cell0_proto::v1::{self, Consistency};
use clap::Subcommand;
use serde::Serialize;
use tokio_stream::StreamExt;

use super::{Output, connect, print_json, print_table, rpc_error};

/// Key-value commands.
#[derive(Subcommand)]
pub enum KvCommand {
    /// Set KEY to VALUE.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Also print the pair KEY held before this write.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Print the value of KEY.
    Get {
        /// The key.
        key: String,
        /// Read the answering node's replica without a leader round trip.
        #[arg(long)]
        serializable: bool,
    },
    /// Remove KEY.
    Del {
        /// The key.
        key: String,
    },
    /// List keys starting with PREFIX.
    Ls {
        /// Key prefix (default: every key).
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many keys (max 10000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Read the answering node's replica without a leader round trip.
        #[arg(long)]
        serializable: bool,
    },
    /// Print changes of keys starting with PREFIX as they happen.
    Watch {
        /// Key prefix (default: every key).
        #[arg(default_value = "")]
        prefix: String,
        /// Start at this revision (default: new changes only).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// End with an error when the node loses its leader (it is cut off
        /// from the quorum) instead of waiting silently.
        #[arg(long)]
        require_leader: bool,
    },
}

#[derive(Serialize)]
struct KvView {
    key: String,
    value: String,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

fn view(kv: v1::KeyValue) -> KvView {
    KvView {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
    }
}

fn consistency(serializable: bool) -> i32 {
    if serializable {
        Consistency::Serializable as i32
    } else {
        Consistency::Linearizable as i32
    }
}

/// Runs one kv command against `endpoint`.
pub async fn run(endpoint: &str, output: Output, cmd: KvCommand) -> anyhow::Result<()> {
    let mut client = KvClient::new(connect(endpoint).await?);
    match cmd {
        KvCommand::Put { key, value, prev_kv } => {
            let r = client
                .put(v1::PutRequest {
                    key: key.into_bytes().into(),
                    value: value.into_bytes().into(),
                    prev_kv,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let revision = r.header.map_or(0, |h| h.revision);
            let prev = r.prev_kv.map(view);
            match output {
                Output::Json if prev_kv => print_json(&serde_json::json!({ "revision": revision, "prev_kv": prev })),
                Output::Json => print_json(&serde_json::json!({ "revision": revision })),
                Output::Table => {
                    println!("OK (revision {revision})");
                    if prev_kv {
                        match prev {
                            Some(p) => println!("previous: {} (revision {})", p.value, p.mod_revision),
                            None => println!("previous: none (the key was new)"),
                        }
                    }
                    Ok(())
                }
            }
        }
        KvCommand::Get { key, serializable } => {
            let r = client
                .get(v1::GetRequest {
                    key: key.clone().into_bytes().into(),
                    consistency: consistency(serializable),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let Some(kv) = r.kv else {
                anyhow::bail!("key {key:?} not found");
            };
            match output {
                Output::Json => print_json(&view(kv)),
                Output::Table => {
                    println!("{}", String::from_utf8_lossy(&kv.value));
                    Ok(())
                }
            }
        }
        KvCommand::Del { key } => {
            let r = client
                .delete(v1::DeleteRequest {
                    key: key.clone().into_bytes().into(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let deleted = r.prev_kv.is_some();
            match output {
                Output::Json => print_json(&serde_json::json!({ "deleted": deleted })),
                Output::Table => {
                    println!(
                        "{}",
                        if deleted {
                            "deleted"
                        } else {
                            "not found (nothing deleted)"
                        }
                    );
                    Ok(())
                }
            }
        }
        KvCommand::Ls {
            prefix,
            limit,
            serializable,
        } => {
            let r = client
                .range(v1::RangeRequest {
                    prefix: prefix.into_bytes().into(),
                    limit,
                    start_after: Default::default(),
                    consistency: consistency(serializable),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let views: Vec<KvView> = r.kvs.into_iter().map(view).collect();
            match output {
                Output::Json => print_json(&serde_json::json!({ "kvs": views, "more": r.more })),
                Output::Table => {
                    let rows: Vec<Vec<String>> = views
                        .into_iter()
                        .map(|v| vec![v.key, v.value, v.mod_revision.to_string()])
                        .collect();
                    print_table(&["KEY", "VALUE", "REVISION"], &rows);
                    if r.more {
                        println!("(more keys match; raise --limit)");
                    }
                    Ok(())
                }
            }
        }
        KvCommand::Watch {
            prefix,
            from,
            require_leader,
        } => {
            let mut stream = client
                .watch(v1::WatchRequest {
                    prefix: prefix.into_bytes().into(),
                    start_revision: from,
                    require_leader,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            while let Some(msg) = stream.next().await {
                for ev in msg.map_err(rpc_error)?.events {
                    let kind = if ev.r#type == v1::event::EventType::Delete as i32 {
                        "DELETE"
                    } else {
                        "PUT"
                    };
                    let kv = view(ev.kv.unwrap_or_default());
                    match output {
                        Output::Json => println!(
                            "{}",
                            serde_json::to_string(&serde_json::json!({ "type": kind, "kv": kv }))?
                        ),
                        Output::Table => println!("{} {} {} {}", kv.mod_revision, kind, kv.key, kv.value),
                    }
                }
            }
            Ok(())
        }
    }
}
