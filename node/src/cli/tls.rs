//! `cell0 tls`: the cluster CA and node certificates for mutual TLS
//! between nodes (see `cell0_tls::certs`).

use std::path::PathBuf;

use anyhow::Context;

use cell0_tls::{CaFiles, NodeCertRequest, NodeFiles, Validity};
use clap::Subcommand;

/// `cell0 tls ...`.
#[derive(Subcommand)]
pub enum TlsCommand {
    /// The cluster's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
}

/// `cell0 tls ca ...`.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Make a new cluster CA: DIR/ca.pem (give it to every node) and
    /// DIR/ca-key.pem (keep it where node certificates are made).
    Create {
        /// Directory to write into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The cluster's name, in the CA's name.
        #[arg(long, default_value = "cell0")]
        cluster: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 1825)]
        days: u32,
    },
}

/// `cell0 tls cert ...`.
#[derive(Subcommand)]
pub enum CertCommand {
    /// Make a node certificate signed by the CA: DIR/NODE.pem and
    /// DIR/NODE-key.pem, valid for the node's internal port and its calls
    /// to other nodes.
    Create {
        /// The node's name (as `cell0 run --name`).
        #[arg(long)]
        node: String,
        /// The node's site.
        #[arg(long, default_value = "default")]
        site: String,
        /// An extra IP address or DNS name clients use for the node
        /// (repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        /// Directory to write into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// Runs a `cell0 tls` command, saying on stderr what it wrote.
pub fn run(cmd: TlsCommand) -> anyhow::Result<()> {
    match cmd {
        TlsCommand::Ca(CaCommand::Create { dir, cluster, days }) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let files = CaFiles::in_dir(&dir);
            cell0_tls::certs::create_ca(&files, &cluster, Validity::days(days)?)?;
            eprintln!(
                "wrote {} (every node's --tls-ca) and {} (private: keep it to make node certificates)",
                files.cert.display(),
                files.key.display()
            );
        }
        TlsCommand::Cert(CertCommand::Create {
            node,
            site,
            san,
            days,
            ca_dir,
            dir,
        }) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let out = NodeFiles::in_dir(&dir, &node);
            let request = NodeCertRequest {
                node,
                site,
                sans: san,
                validity: Validity::days(days)?,
            };
            cell0_tls::certs::create_node_cert(&CaFiles::in_dir(&ca_dir), &out, &request)?;
            eprintln!(
                "wrote {} (--tls-cert) and {} (--tls-key, private)",
                out.cert.display(),
                out.key.display()
            );
        }
    }
    Ok(())
}
