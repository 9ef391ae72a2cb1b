//! One module per subcommand of `lb`.

pub mod bench;
pub mod demo;
pub mod list;
pub mod replay;
pub mod run;

/// What a subcommand returns on failure: a message for the user.
pub type CmdResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The tables of the services a configuration file lists (its static services: no Kubernetes feed,
/// no health checks), read as `lb run` reads the file: a SNAT address left to the node
/// (`node.snat_v4: node`, `snat_v6: node`) is the node's first address of the family from the
/// Kubernetes settings (`kubernetes.node_addresses`, else `$NODE_IPS`).
pub fn file_tables(
    path: &std::path::Path,
) -> Result<std::sync::Arc<lb_core::service::Tables>, Box<dyn std::error::Error + Send + Sync>> {
    let mut settings = lb_examples::config::file::load(path).map_err(|e| e.naming(path))?.settings;
    settings.fill_from_env(|k| std::env::var(k).ok());
    let config = lb_core::config::Config {
        node: settings.node.clone(),
        services: settings.services.iter().map(|s| s.config.clone()).collect(),
    };
    Ok(lb_core::service::TableBuilder::new().build(&config)?)
}
