//! The NBD protocol: a pure codec ([`proto`]), the server that exposes
//! targets to hypervisors ([`server`]), and the client that lets one node
//! read another ([`client`]).

pub mod client;
pub mod proto;
pub mod server;
