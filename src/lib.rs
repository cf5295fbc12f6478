//! dlsm: Decoupled Live Storage Migration on a distributed device-mapper.
//!
//! Every host runs a node ([`node`]) that owns volumes and serves them over
//! NBD ([`nbd`]). A volume is a small mapping table of stacked targets
//! ([`target`]). The CLI ([`cli`]) is a thin client of the node's control
//! API. See `DESIGN.md` in the repository for the architecture and its
//! invariants.

pub mod api;
pub mod api_client;
pub mod bufpool;
pub mod cli;
pub mod cluster;
pub mod crash;
pub mod demo;
pub mod migrate;
pub mod nbd;
pub mod node;
pub mod retry;
pub mod size;
pub mod target;
pub mod tls;
pub mod vhost;
